"""``python -m sa_train bench``: what SA buys, measured side by side in one run.

Three models of one shape run interleaved (A B C A B C ...), so machine noise hits all of them alike:
the config's SA model, its dense twin (same shape, every layer its own group) and Hugging Face's
``LlamaForCausalLM`` (what a user would otherwise train). Each runs at its best setting, eager or
compiled, and the report says which. Suites:

- ``train``: a full optimizer step (forward, backward, fused AdamW); tokens/s and MFU against this
  machine's matmul peak measured in the same run (and the table peak on known GPUs);
- ``decode``: greedy generation of ``--new`` tokens after prompts of ``--prompts`` tokens at batches
  ``--batches``; tokens/s end to end (prefill included) and KV-cache bytes held;
- ``data``: tokenisation MB/s of the shipped corpus and the loader's share of a training step.

Weights are random: speed does not depend on them. ``--json FILE`` writes every figure and the ratios.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm import tqdm

from sa_train.config import SAConfig
from sa_train.cost import dense_twin, kv_cache_bytes_per_token, training_flops_per_token
from sa_train.data.datamodule import SHIPPED_CORPUS
from sa_train.errors import ConfigError
from sa_train.measure import (
    interleaved,
    machine,
    machine_line,
    measure_data_pipeline,
    peak_flops,
    spread,
    synchronize,
    write_profile,
)
from sa_train.model import SAModel, next_token_loss
from sa_train.optim import build_optimizer
from sa_train.run_config import read_training_config
from sa_train.tools import tool_parser

VARIANTS = ("sa", "dense", "hf")
T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]  # the source checkout: its shipped configs and corpus


def hf_llama(config: SAConfig) -> torch.nn.Module:
    """HF ``LlamaForCausalLM`` of the dense twin's shape (SDPA), configured by the export's table."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sa_train.export.hf_names import hf_config_fields

    return LlamaForCausalLM(LlamaConfig(**hf_config_fields(config), attn_implementation="sdpa"))


def build(variant: str, config: SAConfig, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    if variant == "sa":
        return SAModel(config).to(device)
    if variant == "dense":
        return SAModel(dense_twin(config)).to(device)
    return hf_llama(config).to(device)


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids) if isinstance(model, SAModel) else model(input_ids=ids).logits


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on GPU, as the 350M configs train; fp32 on CPU, as the tiny ones do."""
    return torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")


def train_step_timer(
    variant: str, config: SAConfig, batch: int, seq_len: int, device: torch.device, compiled: bool
) -> Callable[[int], float]:
    """A timer of ``n`` full optimizer steps, after two warm-up steps (compilation, allocator)."""
    model = build(variant, config, device).train()
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len + 1), device=device)

    def loss_of(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with autocast(device):
            logits = logits_of(model, inputs)
        return next_token_loss(logits, targets)

    loss_fn = torch.compile(loss_of) if compiled else loss_of

    def steps(n: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(n):
            loss_fn(ids[:, :-1], ids[:, 1:]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return time.perf_counter() - start

    steps(2)
    return steps


def train_suite(
    config: SAConfig,
    batch: int,
    seq_len: int,
    device: torch.device,
    rounds: int,
    modes: Sequence[bool],
    profile: Path | None = None,
) -> dict[str, Any]:
    """Tokens/s of a training step per variant at its best mode, the ratios, and MFU; with ``profile``,
    a profile of each variant's best mode (:func:`write_profile`)."""
    steps_per_round = 3
    timers: dict[str, Callable[[], float]] = {}
    with tqdm(total=len(VARIANTS) * len(modes), desc="train: build and warm up", leave=False) as progress:
        for variant in VARIANTS:
            for compiled in modes:
                timer = train_step_timer(variant, config, batch, seq_len, device, compiled)
                timers[f"{variant}/{'compiled' if compiled else 'eager'}"] = lambda t=timer: t(
                    steps_per_round
                )
                progress.update()
    with tqdm(total=rounds * len(timers), desc="train: timing", leave=False) as progress:
        times = interleaved(timers, rounds, progress)
    tokens = batch * seq_len * steps_per_round
    rates = {name: tokens / statistics.median(seconds) for name, seconds in times.items()}
    peak = peak_flops(device)
    flops = {
        "sa": training_flops_per_token(config, seq_len, causal=True),
        "dense": training_flops_per_token(dense_twin(config), seq_len, causal=True),
    }
    flops["hf"] = flops["dense"]
    result: dict[str, Any] = {
        "batch": batch,
        "seq_len": seq_len,
        "peak_flops": peak,
        "raw_tokens_per_sec": rates,
    }
    for variant in VARIANTS:
        mode, rate = max(
            ((name.split("/")[1], value) for name, value in rates.items() if name.startswith(f"{variant}/")),
            key=lambda item: item[1],
        )
        result[variant] = {
            "tokens_per_sec": rate,
            "mode": mode,
            "spread": spread(times[f"{variant}/{mode}"]),
            "mfu": rate * flops[variant] / peak["measured"],
            "mfu_table": rate * flops[variant] / peak["table"] if peak["table"] else None,
        }
        write_profile(profile, f"train-{variant}-{mode}", device, timers[f"{variant}/{mode}"])
    result["sa_vs_dense"] = result["sa"]["tokens_per_sec"] / result["dense"]["tokens_per_sec"]
    result["sa_vs_hf"] = result["sa"]["tokens_per_sec"] / result["hf"]["tokens_per_sec"]
    result["mfu_dense"] = result["dense"]["mfu"]
    result["flop_ratio"] = flops["dense"] / flops["sa"]
    return result


def hf_generate(model: torch.nn.Module, ids: torch.Tensor, new: int) -> None:
    """HF's fastest greedy path: a static cache (and the model's forward compiled, when it is)."""
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        cache_implementation="static",
        pad_token_id=0,
    )


def decode_timers(
    variant: str, config: SAConfig, device: torch.device, compiled: bool
) -> Callable[[torch.Tensor, int], tuple[float, int | None]]:
    """A timer of one greedy generation of ``new`` tokens after prompts ``ids`` (prefill included):
    (seconds, peak CUDA bytes allocated during the call, None on CPU).

    SA and its twin compile their decode step (:meth:`SAModel.compiled_decode_step`); HF compiles its
    forward, as its static-cache guide does. A model is built once, so its compiled code serves every
    batch and prompt length (one recompilation per new shape, done in the untimed warm-up call).
    """
    model = build(variant, config, device).eval()
    if variant == "hf" and compiled:
        model.forward = torch.compile(model.forward, fullgraph=True)

    def run(ids: torch.Tensor, new: int) -> tuple[float, int | None]:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode(), autocast(device):
            if isinstance(model, SAModel):
                model.generate(ids, max_new_tokens=new, compile=compiled)
            else:
                hf_generate(model, ids, new)
        synchronize(device)
        seconds = time.perf_counter() - start
        return seconds, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    return run


def decode_suite(
    config: SAConfig,
    batches: Sequence[int],
    prompts: Sequence[int],
    new: int,
    device: torch.device,
    rounds: int,
    modes: Sequence[bool],
    profile: Path | None = None,
) -> dict[str, Any]:
    """New tokens/s per variant, batch and prompt length: end to end (prefill included) and decode only,
    each variant at its best mode; the KV bytes held and, on CUDA, the peak memory. With ``profile``, a
    profile of each variant's best mode at the headline setting (batch 4, the shortest prompt).

    Decode only is (new − 1) tokens per row over the time of a ``new``-token generation less that of a
    one-token generation (prefill and the first token) of the same prompts, both timed in each round.
    """
    config = dataclasses.replace(config, max_seq_len=max(config.max_seq_len, max(prompts) + new))
    runners = {
        f"{variant}/{'compiled' if compiled else 'eager'}": decode_timers(variant, config, device, compiled)
        for variant in VARIANTS
        for compiled in modes
    }
    settings = [(b, p) for b in batches for p in prompts]
    names = [f"b{batch}_p{prompt}" for batch, prompt in settings]
    headline_name = f"b4_p{min(prompts)}" if f"b4_p{min(prompts)}" in names else names[0]
    results: dict[str, Any] = {"new_tokens": new, "settings": {}}
    element = 2 if device.type == "cuda" else 4
    total = len(settings) * len(runners) * (rounds + 1)
    with tqdm(total=total, desc="decode (the first round compiles)", leave=False) as progress:
        for batch, prompt in settings:
            ids = torch.randint(0, config.vocab_size, (batch, prompt), device=device)
            timers = {
                name: lambda run=run, ids=ids: (run(ids, new), run(ids, 1)) for name, run in runners.items()
            }
            for timer in timers.values():  # warm-up: compilation for this shape
                timer()
                progress.update()
            times = interleaved(timers, rounds, progress)
            row: dict[str, Any] = {"tokens_per_sec": {}, "decode_tokens_per_sec": {}, "mode": {}}
            row["peak_memory_bytes"] = {}
            for variant in VARIANTS:
                best = None
                for name, calls in times.items():
                    if not name.startswith(f"{variant}/"):
                        continue
                    full = statistics.median(seconds for (seconds, _), _ in calls)
                    one = statistics.median(seconds for _, (seconds, _) in calls)
                    if best is None or full < best[1]:
                        best = (name.split("/")[1], full, one, max(peak or 0 for (_, peak), _ in calls))
                assert best is not None
                mode, full, one, peak = best
                row["mode"][variant] = mode
                row["tokens_per_sec"][variant] = batch * new / full
                row["decode_tokens_per_sec"][variant] = batch * (new - 1) / max(full - one, 1e-9)
                row["peak_memory_bytes"][variant] = peak if device.type == "cuda" else None
                if f"b{batch}_p{prompt}" == headline_name:
                    name = f"decode-{variant}-{mode}"
                    write_profile(profile, name, device, timers[f"{variant}/{mode}"])
            rates, decode_rates = row["tokens_per_sec"], row["decode_tokens_per_sec"]
            row["sa_vs_hf"] = rates["sa"] / rates["hf"]
            row["sa_vs_dense"] = rates["sa"] / rates["dense"]
            row["decode_sa_vs_hf"] = decode_rates["sa"] / decode_rates["hf"]
            row["decode_sa_vs_dense"] = decode_rates["sa"] / decode_rates["dense"]
            row["kv_cache_bytes"] = {
                "sa": batch * (prompt + new) * kv_cache_bytes_per_token(config, element),
                "dense": batch * (prompt + new) * kv_cache_bytes_per_token(dense_twin(config), element),
            }
            results["settings"][f"b{batch}_p{prompt}"] = row
    headline = results["settings"][headline_name]
    longest = results["settings"].get(f"b4_p{max(prompts)}") or headline
    for key in ("sa_vs_hf", "decode_sa_vs_hf"):
        results[key] = headline[key]
    for key in ("sa_vs_dense", "decode_sa_vs_dense"):
        results[key] = longest[key]
    return results


def format_report(report: dict[str, Any]) -> str:
    lines = [machine_line(report["machine"])]
    train = report.get("train")
    if train:
        lines.append(f"\ntrain: batch {train['batch']} x {train['seq_len']}, full optimizer step")
        lines.append(f"  {'model':<8}{'tokens/s':>12}{'mode':>10}{'spread':>8}{'MFU':>8}")
        for variant in VARIANTS:
            row = train[variant]
            rate, spread = row["tokens_per_sec"], row["spread"]
            lines.append(f"  {variant:<8}{rate:>12,.0f}{row['mode']:>10}{spread:>8.0%}{row['mfu']:>8.2f}")
        lines.append(
            f"  SA / dense {train['sa_vs_dense']:.3f}x (FLOP ratio {train['flop_ratio']:.3f}x), "
            f"SA / HF {train['sa_vs_hf']:.3f}x; MFU against {train['peak_flops']['measured'] / 1e9:,.0f} "
            "GFLOP/s measured"
        )
    decode = report.get("decode")
    if decode:
        lines.append(
            f"\ndecode: greedy, {decode['new_tokens']} new tokens; new tokens/s end to end (prefill "
            "included) | decode only"
        )
        header = f"  {'setting':<10}" + "".join(f"{name:>15}" for name in ("SA", "dense", "HF"))
        lines.append(header + f"{'SA/HF':>13}{'SA/dense':>13}  modes")
        for name, row in decode["settings"].items():
            rates, decode_rates = row["tokens_per_sec"], row["decode_tokens_per_sec"]
            cells = "".join(f"{rates[v]:>8,.0f} |{decode_rates[v]:>5,.0f}" for v in VARIANTS)
            ratios = "".join(
                f"{row[key]:>7.2f} |{row[f'decode_{key}']:>4.2f}" for key in ("sa_vs_hf", "sa_vs_dense")
            )
            modes = "/".join(row["mode"][v][0] for v in VARIANTS)
            lines.append(f"  {name:<10}{cells}{ratios}  {modes}")
        lines.append("  modes: SA/dense/HF, c = compiled, e = eager")
    data = report.get("data")
    if data:
        share = data["loader_share_of_step"]
        lines.append(
            f"\ndata: tokenise {data['tokenise_mb_per_sec']:.1f} MB/s of text; loader "
            f"{data['loader_ms_per_batch']:.2f} ms/batch" + (f" = {share:.1%} of an SA step" if share else "")
        )
    return "\n".join(lines)


def positive_list(option: str, text: str) -> list[int]:
    """A comma-separated list of positive integers, e.g. ``1,4,16``."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ConfigError(
            f"{option}={text!r} must be positive whole numbers separated by commas, e.g. 1,4,16."
        )
    return values


def main(argv: Sequence[str]) -> None:
    parser = tool_parser("bench", __doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=("train", "decode", "data", "all"), default="all")
    parser.add_argument(
        "--config", type=Path, help="training config (default: sa-tiny on CPU, sa-350m on CUDA)"
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--batch", type=int, help="training micro-batch (default: the config's data.batch_size)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds per variant (5)")
    parser.add_argument("--no-compile", action="store_true", help="eager only (compiling takes minutes)")
    parser.add_argument("--batches", default="1,4,16", help="decode batch sizes (1,4,16)")
    parser.add_argument("--prompts", default="192,960", help="decode prompt lengths (192,960)")
    parser.add_argument("--new", type=int, default=64, help="decode new tokens (64)")
    parser.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    parser.add_argument(
        "--profile", type=Path, help="folder for a torch.profiler table and trace of each model's best mode"
    )
    args = parser.parse_args(argv)
    for name in ("batch", "rounds", "new"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name}={value} must be at least 1.")
    batches, prompts = positive_list("--batches", args.batches), positive_list("--prompts", args.prompts)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: this machine has no CUDA GPU; run the benchmark with --device cpu.")
    default = ROOT / "configs" / ("sa-350m.yaml" if device.type == "cuda" else "sa-tiny.yaml")
    shape = read_training_config(args.config or default, prog="python -m sa_train bench")
    config, seq_len, batch = shape.config, shape.seq_len, args.batch or shape.batch_size
    report: dict[str, Any] = {"machine": machine(device), "config": config.to_dict()}
    modes = (False,) if args.no_compile else (False, True)
    if args.suite in ("train", "all"):
        report["train"] = train_suite(config, batch, seq_len, device, args.rounds, modes, args.profile)
    if args.suite in ("decode", "all"):
        report["decode"] = decode_suite(
            config, batches, prompts, args.new, device, args.rounds, modes, args.profile
        )
    if args.suite in ("data", "all"):
        train = report.get("train")
        step = batch * seq_len / train["sa"]["tokens_per_sec"] if train else None
        report["data"] = measure_data_pipeline(SHIPPED_CORPUS, batch, seq_len, step)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
