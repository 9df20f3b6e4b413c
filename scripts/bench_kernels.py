"""Throughput of the SA kernels against PyTorch's flash SDPA (causal, bf16, CUDA only).

Two tables. Per kernel: TFLOP/s of the anchor alone and of SDPA flash. Per group of ``--group-size``
layers sharing one q, k (anchor + shared layers, every output in the loss): milliseconds for the
forward and for forward + backward, fused kernels against SDPA run once per layer (the other exact way
to share attention). The fused group's backward runs 4G + 3 matmuls of T×T×D to the 7G of G separate
backwards (``sa_train.kernels.backward``); the second table is where that shows, or does not.

The group table also times forward + backward replayed as one CUDA graph, which leaves out the host:
each kernel operator costs Python time to dispatch (on the 2-core CI machine, with Triton's launches
stubbed out, about 0.45 ms for a group of four's forward and 0.9 ms for its forward + backward). Where the
graphed time is far below the plain one, the plain figure measures the host, not the kernels.

``--tiles backward=32,128,8,3`` adds a column to the group table: the fused group again, with
those kernels forced to those tiles (block_m, block_n, warps, stages), timed beside the default choice
in the same run. ``scripts/tile_memory.py --registers`` shows which configurations spill registers.
"""

import argparse
import sys
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sa_train.kernels import anchor_attention, shared_attention
from sa_train.kernels.tiles import Tiles, forced_tiles

BACKWARD_FLOP_RATIO = 2.5  # a lone layer's backward runs five T×T matmuls to the forward's two


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=2048, help="heads = hidden // head_dim")
    parser.add_argument("--group-size", type=int, default=4, help="layers per SA group in the group table")
    parser.add_argument("--rep-ms", type=int, default=200, help="timing budget per measurement")
    parser.add_argument(
        "--tiles",
        nargs="+",
        default=[],
        type=_forced,
        metavar="KERNEL=M,N,WARPS,STAGES",
        help="also time the fused group with these kernels (forward, delta, backward) at these tiles",
    )
    return parser.parse_args()


def _forced(text: str) -> tuple[str, Tiles]:
    kernel, _, numbers = text.partition("=")
    if kernel not in ("forward", "delta", "backward"):
        raise argparse.ArgumentTypeError(f"--tiles {text!r}: the kernel is one of forward, delta, backward")
    try:
        return kernel, Tiles(*(int(x) for x in numbers.split(",")))
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"--tiles {text!r}: write KERNEL=M,N,WARPS,STAGES") from None


def _causal_fwd_flops(b: int, h: int, t: int, d: int) -> float:
    """QK^T and PV over the causal half of the T×T score matrix."""
    return 2 * 2 * b * h * t * t * d / 2


def _time_ms(fn: Callable[[], object], grads: list[torch.Tensor], rep_ms: int) -> float:
    """triton's do_bench flushes L2 between runs; imported here because triton is optional."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=max(rep_ms // 4, 10), rep=rep_ms, grad_to_none=grads)


def _time_graphed_ms(fn: Callable[[], object], grads: list[torch.Tensor], rep_ms: int) -> float:
    """GPU time alone: ``fn`` captured in a CUDA graph and replayed (no L2 flush, no host work)."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=rep_ms, grad_to_none=grads)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def _inputs(b: int, h: int, t: int, d: int, layers: int) -> list[torch.Tensor]:
    """q, k and one v per layer, bf16 leaves on CUDA."""
    return [
        torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(2 + layers)
    ]


def _bench_kernels(b: int, h: int, t: int, d: int, rep_ms: int) -> dict[str, tuple[float, float]]:
    """TFLOP/s (fwd, fwd+bwd) of the anchor alone and of SDPA flash at one shape."""
    q, k, v = leaves = _inputs(b, h, t, d, 1)
    dout = torch.randn_like(q)
    scale = d**-0.5
    forwards: dict[str, Callable[[], torch.Tensor]] = {
        "anchor": lambda: anchor_attention(q, k, v, scale)[0],
        "sdpa-flash": lambda: _sdpa(q, k, v, scale),
    }
    flops = _causal_fwd_flops(b, h, t, d)
    results = {}
    for name, forward in forwards.items():
        with torch.no_grad():
            fwd_ms = _time_ms(forward, [], rep_ms)
        both_ms = _time_ms(lambda f=forward: f().backward(dout), leaves, rep_ms)
        results[name] = (flops / fwd_ms / 1e9, flops * (1 + BACKWARD_FLOP_RATIO) / both_ms / 1e9)
    return results


def _bench_group(
    b: int, h: int, t: int, d: int, layers: int, rep_ms: int, forced: dict[str, Tiles]
) -> dict[str, tuple[float, ...]]:
    """Milliseconds (fwd, fwd+bwd, fwd+bwd graphed) of a whole group: fused kernels, and SDPA once per
    layer; with ``forced`` tiles, the fused kernels again at those tiles ("sa-forced")."""
    leaves = _inputs(b, h, t, d, layers)
    q, k, vs = leaves[0], leaves[1], leaves[2:]
    douts = [torch.randn_like(q) for _ in range(layers)]
    scale = d**-0.5

    def fused() -> list[torch.Tensor]:
        out, lse, links = anchor_attention(q, k, vs[0], scale, followers=layers - 1)
        return [
            out,
            *(shared_attention(q, k, lse, link, v, scale) for link, v in zip(links, vs[1:], strict=True)),
        ]

    def per_layer() -> list[torch.Tensor]:
        return [_sdpa(q, k, v, scale) for v in vs]

    def forced_fused() -> list[torch.Tensor]:
        with forced_tiles(**forced):
            return fused()

    runs = {"sa-fused": fused, "sdpa-per-layer": per_layer}
    if forced:
        runs["sa-forced"] = forced_fused
    results = {}
    for name, forward in runs.items():
        with torch.no_grad():
            fwd_ms = _time_ms(forward, [], rep_ms)

        def step(f: Callable[[], list[torch.Tensor]] = forward) -> None:
            outs = f()
            with forced_tiles(**forced) if f is forced_fused else nullcontext():
                torch.autograd.backward(outs, douts)

        results[name] = (fwd_ms, _time_ms(step, leaves, rep_ms), _time_graphed_ms(step, leaves, rep_ms))
    return results


def _table(
    title: str, names: list[str], rows: Callable[[int, int], dict[str, tuple[float, ...]]], args
) -> None:
    print(title)
    width = 33 if "graphed" in title else 21
    print(f"{'D':>4} {'T':>6} " + " ".join(f"{n:>{width}}" for n in names))
    for d in args.head_dims:
        for t in args.seq_lens:
            res = rows(d, t)
            cells = " ".join(" | ".join(f"{x:>9.2f}" for x in res[n]) for n in names)
            print(f"{d:>4} {t:>6} {cells}", flush=True)


def main() -> int:
    args = _parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device, nothing measured.")
        return 0
    print(f"causal bf16, batch {args.batch}, hidden {args.hidden}, on {torch.cuda.get_device_name()}")
    _table(
        "per kernel, TFLOP/s (fwd | fwd+bwd)",
        ["anchor", "sdpa-flash"],
        lambda d, t: _bench_kernels(args.batch, args.hidden // d, t, d, args.rep_ms),
        args,
    )
    forced = dict(args.tiles)
    if forced:
        print("sa-forced: " + ", ".join(f"{kernel} at {tiles}" for kernel, tiles in forced.items()))
    _table(
        f"group of {args.group_size} layers, ms (fwd | fwd+bwd | fwd+bwd graphed)",
        ["sa-fused", "sdpa-per-layer", *(["sa-forced"] if forced else [])],
        lambda d, t: _bench_group(args.batch, args.hidden // d, t, d, args.group_size, args.rep_ms, forced),
        args,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
