"""Training throughput at 350M on one CUDA device: SA (triton, torch backends), dense, HF Llama.

Times full training steps (bf16 autocast forward, backward, fused AdamW) of each model, eager and
compiled, after warm-up (compilation included there), in interleaved rounds so clock and thermal drift
hit every variant alike; reports the median round as tokens/s and as MFU, the model FLOPs per token
(``sa_train.cost.training_flops_per_token``, causal scores) times tokens/s over the device's bf16 peak.

    python scripts/bench_gpu_training.py                      # everything, batch 8 x 2048
    python scripts/bench_gpu_training.py --cases sa-triton dense --modes compiled

Without a CUDA device it says so and measures nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from sa_train import SAConfig, SAModel
from sa_train.cost import training_flops_per_token
from sa_train.export.hf_names import hf_config_fields

ROOT = Path(__file__).resolve().parents[1]

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name().
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1}

CASES = {  # name: (config file, attention backend; None = HF LlamaForCausalLM of that shape)
    "sa-triton": ("configs/sa-350m.yaml", "triton"),
    "sa-torch": ("configs/sa-350m.yaml", "torch"),
    "dense": ("configs/dense-350m.yaml", "auto"),
    "hf-llama": ("configs/dense-350m.yaml", None),
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
    return parser.parse_args()


def _config(path: str, backend: str) -> SAConfig:
    with open(ROOT / path) as f:
        fields = yaml.safe_load(f)["model"]["config"]
    return SAConfig(**{**fields, "attention_backend": backend})


def _hf_llama(config: SAConfig) -> torch.nn.Module:
    """LlamaForCausalLM with the dense config's shape, SDPA attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**hf_config_fields(config), attn_implementation="sdpa"))


def _model(case: str) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor], SAConfig]:
    """(module, ids -> logits, the config whose FLOPs it spends)."""
    path, backend = CASES[case]
    config = _config(path, backend or "auto")
    torch.manual_seed(0)
    if backend is None:
        model = _hf_llama(config).cuda()
        return model, lambda ids: model(input_ids=ids).logits, config
    model = SAModel(config).cuda()
    return model, model, config


def _step_fn(
    forward: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer, ids: torch.Tensor
) -> Callable[[], None]:
    def step() -> None:
        with torch.autocast("cuda", torch.bfloat16):
            logits = forward(ids[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _peak_tflops(override: float | None) -> float | None:
    if override is not None:
        return override
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def main() -> int:
    args = _parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu_training: no CUDA device, nothing measured.")
        return 0
    from sa_train.training import build_optimizer

    peak = _peak_tflops(args.peak_tflops)
    steps: dict[str, Callable[[], None]] = {}
    flops: dict[str, float] = {}
    for case in args.cases:
        try:
            model, forward, config = _model(case)
        except ImportError as err:
            print(f"{case}: skipped ({err})")
            continue
        optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1), device="cuda")
        for mode in args.modes:
            name = f"{case} {mode}"
            steps[name] = _step_fn(torch.compile(forward) if mode == "compiled" else forward, optimizer, ids)
            flops[name] = training_flops_per_token(config, args.seq_len, causal=True)

    for name, step in list(steps.items()):
        try:
            for _ in range(args.warmup):
                step()
            torch.cuda.synchronize()
        except (RuntimeError, torch.OutOfMemoryError) as err:  # one failing variant leaves the others
            print(f"{name}: dropped, warm-up failed: {str(err).splitlines()[0][:300]}")
            del steps[name]
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / args.steps)

    tokens = args.batch * args.seq_len
    peak_label = f"{peak:.0f} TFLOP/s bf16 peak" if peak else "bf16 peak unknown (--peak-tflops)"
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}; batch {args.batch} x {args.seq_len}, "
        f"bf16 autocast, fused AdamW; median of {args.rounds} rounds x {args.steps} steps; {peak_label}"
    )
    print(f"{'variant':22s} {'step ms':>9s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s}")
    for name, values in times.items():
        step_s = statistics.median(values)
        achieved = tokens / step_s * flops[name] / 1e12
        mfu = f"{achieved / peak:6.1%}" if peak else f"{'n/a':>6s}"
        print(f"{name:22s} {step_s * 1e3:9.1f} {tokens / step_s:10.0f} {achieved:8.1f} {mfu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
