"""Training throughput at 350M on one CUDA device: SA (triton, torch backends), dense, HF Llama.

Times full training steps (bf16 autocast forward, backward, fused AdamW) of each model, eager and
compiled, after warm-up (compilation included there, and timed): a first round right after each variant's
warm-up, then interleaved rounds so clock and thermal drift hit every variant alike; reports the median
round as tokens/s and as MFU, the model FLOPs per token
(``sa_train.cost.training_flops_per_token``, causal scores) times tokens/s over the device's bf16 peak.

    python scripts/bench_gpu_training.py                      # everything, batch 8 x 2048
    python scripts/bench_gpu_training.py --cases sa-triton dense --modes compiled
    python scripts/bench_gpu_training.py --json out.json      # also every figure as JSON

Without a CUDA device it says so and measures nothing. ``--device cpu`` runs the same steps on CPU in
fp32, with the Triton kernels in the interpreter (TRITON_INTERPRET=1) and MFU against a matmul measured
now: with small ``--sa-config``/``--dense-config`` files, a smoke run of this script
(``scripts/gpu_run.py --dry-run``), not a measurement. The JSON is rewritten after the warm-up and after
each round, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sa_train import SAConfig, SAModel
from sa_train.cost import training_flops_per_token
from sa_train.export.hf_names import hf_config_fields
from sa_train.model import next_token_loss
from sa_train.run_config import read_training_config

ROOT = Path(__file__).resolve().parents[1]

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name().
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1}

CASES = {  # name: (which config, attention backend; None = HF LlamaForCausalLM of that shape)
    "sa-triton": ("sa", "triton"),
    "sa-torch": ("sa", "torch"),
    "dense": ("dense", "auto"),
    "hf-llama": ("dense", None),
}


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (compiles)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds")
    parser.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    parser.add_argument("--peak-tflops", type=float, help="bf16 peak of this device, if not in the table")
    parser.add_argument("--sa-config", type=Path, default=ROOT / "configs/sa-350m.yaml")
    parser.add_argument("--dense-config", type=Path, default=ROOT / "configs/dense-350m.yaml")
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], help="cuda (the default where there is one); cpu: a smoke run"
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    return parser.parse_args()


def _config(path: Path, backend: str) -> SAConfig:
    config = read_training_config(path, prog="scripts/bench_gpu_training.py").config
    return SAConfig(**{**config.to_dict(), "attention_backend": backend})


def _hf_llama(config: SAConfig) -> torch.nn.Module:
    """LlamaForCausalLM with the dense config's shape, SDPA attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**hf_config_fields(config), attn_implementation="sdpa"))


def _model(
    case: str, paths: dict[str, Path], device: str
) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor], SAConfig]:
    """(module, ids -> logits, the config whose FLOPs it spends)."""
    which, backend = CASES[case]
    config = _config(paths[which], backend or "auto")
    torch.manual_seed(0)
    if backend is None:
        model = _hf_llama(config).to(device)
        return model, lambda ids: model(input_ids=ids).logits, config
    model = SAModel(config).to(device)
    return model, model, config


def _step_fn(
    forward: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer, ids: torch.Tensor
) -> Callable[[], None]:
    """bf16 autocast on CUDA; fp32 on CPU, as the tiny configs train."""
    cuda = ids.device.type == "cuda"

    def step() -> None:
        with torch.autocast(ids.device.type, torch.bfloat16, enabled=cuda):
            logits = forward(ids[:, :-1])
        next_token_loss(logits, ids[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _peak_tflops(override: float | None, device: str) -> float | None:
    """TFLOP/s: the override, the table's bf16 peak of a known GPU, or on CPU a fp32 matmul measured now."""
    if override is not None:
        return override
    if device == "cpu":
        from sa_train.measure import measure_matmul_flops

        return measure_matmul_flops() / 1e12
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    args = _parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    if device is None or (device == "cuda" and not torch.cuda.is_available()):
        print("bench_gpu_training: no CUDA device, nothing measured.")
        return 0
    from sa_train.training import build_optimizer

    peak = _peak_tflops(args.peak_tflops, device)
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU (fp32, not a measurement)"
    paths = {"sa": args.sa_config, "dense": args.dense_config}
    steps: dict[str, Callable[[], None]] = {}
    flops: dict[str, float] = {}
    report: dict[str, Any] = {
        "device": where,
        "torch": torch.__version__,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "peak_tflops": peak,
        "configs": {which: str(path) for which, path in paths.items()},
        "rounds_done": 0,
        "steps_per_round": args.steps,
        "variants": {},
        "skipped": {},
    }

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))

    for case in args.cases:
        try:
            model, forward, config = _model(case, paths, device)
        except ImportError as err:
            print(f"{case}: skipped ({err})")
            report["skipped"][case] = str(err)
            continue
        optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1), device=device)
        for mode in args.modes:
            name = f"{case} {mode}"
            steps[name] = _step_fn(torch.compile(forward) if mode == "compiled" else forward, optimizer, ids)
            flops[name] = training_flops_per_token(config, args.seq_len, causal=True)

    times: dict[str, list[float]] = {}
    tokens = args.batch * args.seq_len

    def timed_round(name: str) -> None:
        start = time.perf_counter()
        for _ in range(args.steps):
            steps[name]()
        _synchronize(device)
        times[name].append((time.perf_counter() - start) / args.steps)
        step_s = statistics.median(times[name])
        achieved = tokens / step_s * flops[name] / 1e12
        report["variants"][name].update(
            step_ms=step_s * 1e3,
            tokens_per_sec=tokens / step_s,
            tflops=achieved,
            mfu=achieved / peak if peak else None,
            step_ms_rounds=[t * 1e3 for t in times[name]],
        )

    # Each variant is warmed up and timed once before the next is built into its compiled form, so a run
    # cut short (a time box) keeps a figure of every variant it reached; the other rounds interleave.
    for name, step in list(steps.items()):
        start = time.perf_counter()
        try:
            for _ in range(args.warmup):
                step()
            _synchronize(device)
        except Exception as err:  # one failing variant (a compile error, OOM) leaves the others
            print(f"{name}: dropped, warm-up failed: {str(err).splitlines()[0][:300]}", flush=True)
            report["skipped"][name] = str(err).splitlines()[0][:300]
            del steps[name]
            continue
        warmup_s = time.perf_counter() - start
        report["variants"][name] = {"warmup_s": warmup_s}
        print(f"{name}: warm-up ({args.warmup} steps, compilation included) {warmup_s:.1f} s", flush=True)
        times[name] = []
        if args.rounds:
            timed_round(name)
        save()
    report["rounds_done"] = min(args.rounds, 1)
    for round_ in range(1, args.rounds):
        for name in steps:
            timed_round(name)
        report["rounds_done"] = round_ + 1
        save()

    peak_label = f"{peak:.0f} TFLOP/s peak" if peak else "peak unknown (--peak-tflops)"
    precision = "bf16 autocast" if device == "cuda" else "fp32"
    print(
        f"{where}, torch {torch.__version__}; batch {args.batch} x {args.seq_len}, "
        f"{precision}, fused AdamW; median of {args.rounds} rounds x {args.steps} steps; {peak_label}"
    )
    print(f"{'variant':22s} {'step ms':>9s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s}")
    for name in times:
        row = report["variants"][name]
        if "step_ms" not in row:
            continue
        mfu = f"{row['mfu']:6.1%}" if row["mfu"] is not None else f"{'n/a':>6s}"
        print(f"{name:22s} {row['step_ms']:9.1f} {row['tokens_per_sec']:10.0f} {row['tflops']:8.1f} {mfu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
