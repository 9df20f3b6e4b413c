"""CPU training speed of SA against its dense twin, beside the FLOP ratio that predicts it.

Times full training steps (forward, backward, the training's fused AdamW) of the models of two
configs, interleaved round by round so machine noise hits all alike, and reports median step times,
the speed-up over dense and the ratio of training FLOPs per token (``sa_train.cost``). It also times
the other exact SA path, SDPA in every layer with the anchor's q and k: the measurement behind
``attention.TorchBackend``'s choice.

    python scripts/bench_cpu_training.py --sa configs/sa-tiny.yaml --dense configs/dense-tiny.yaml
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from sa_train import SAConfig, SAModel
from sa_train.attention import AttentionBackend, GroupWeights, TorchBackend
from sa_train.cost import training_flops_per_token
from sa_train.model import next_token_loss
from sa_train.run_config import read_training_config
from sa_train.training import build_optimizer


class RecomputeWithSDPA(TorchBackend):
    """Exact too: every shared layer reruns fused SDPA with its anchor's q and k (no P kept)."""

    name = "sdpa-recompute"

    def anchor(self, q, k, v, followers, bias=None):  # type: ignore[no-untyped-def]
        out, _ = super().anchor(q, k, v, followers=0, bias=bias)
        return out, GroupWeights(q=q, k=k) if followers else None

    def shared(self, weights: GroupWeights, layer: int, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(weights.q, weights.k, v, is_causal=True, enable_gqa=True)


def model_config(path: str) -> SAConfig:
    return read_training_config(Path(path), prog="scripts/bench_cpu_training.py").config


def step_timer(
    config: SAConfig, batch: int, seq_len: int, backend: AttentionBackend, compile: bool
) -> Callable[[], float]:
    torch.manual_seed(0)
    model = SAModel(config)
    model.backend = backend
    if compile:
        model.compile()
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len + 1))

    def step() -> float:
        start = time.perf_counter()
        logits = model(ids[:, :-1])
        next_token_loss(logits, ids[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step()  # warm-up: allocator, thread pools, compilation
    step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sa", default="configs/sa-tiny.yaml", help="config of the SA model")
    parser.add_argument("--dense", default="configs/dense-tiny.yaml", help="config of its dense twin")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=15, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (slow start)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    sa, dense = model_config(args.sa), model_config(args.dense)
    variants = {
        "dense (SDPA)": step_timer(dense, args.batch, args.seq_len, TorchBackend(), args.compile),
        "SA, P once per group (torch backend)": step_timer(
            sa, args.batch, args.seq_len, TorchBackend(), args.compile
        ),
        "SA, SDPA recomputed per layer": step_timer(
            sa, args.batch, args.seq_len, RecomputeWithSDPA(), args.compile
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, step in variants.items():
            times[name].append(step())

    medians = {name: statistics.median(values) for name, values in times.items()}
    dense_time = medians["dense (SDPA)"]
    mode = "compiled" if args.compile else "eager"
    print(f"batch {args.batch} x seq {args.seq_len}, {args.threads} threads, {mode}, {args.rounds} rounds")
    print(f"{'variant':44s} {'median step':>12s} {'speed-up vs dense':>18s}")
    for name, median in medians.items():
        print(f"{name:44s} {median * 1e3:10.1f}ms {dense_time / median:17.3f}x")
    for causal in (False, True):
        ratio = training_flops_per_token(dense, args.seq_len, causal) / training_flops_per_token(
            sa, args.seq_len, causal
        )
        label = "FLOP ratio dense/SA, " + ("causal scores" if causal else "full T x T scores")
        print(f"{label:44s} {'':>12s} {ratio:17.3f}x")


if __name__ == "__main__":
    main()
