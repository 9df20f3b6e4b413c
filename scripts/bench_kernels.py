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
in the same run; ``--backward-warps 8`` adds one with the backward at its default tiles but 8 warps (the
tiles differ by head size, so this is the way to time the 8-warp variant at D = 64 and 128 in one run).
``scripts/tile_memory.py --registers`` shows which configurations spill registers.

``--json FILE`` writes every figure, rewritten after each row (a run cut short keeps its rows).
``--device cpu`` runs the same code in the Triton interpreter (TRITON_INTERPRET=1) at whatever shapes
are given, timed with a plain clock and without the CUDA-graph column: a smoke run
(``scripts/gpu_run.py --dry-run``), not a measurement.
"""

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sa_train.kernels import anchor_attention, shared_attention
from sa_train.kernels.tiles import Tiles, candidates, forced_tiles

BACKWARD_FLOP_RATIO = 2.5  # a lone layer's backward runs five T×T matmuls to the forward's two
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=2048, help="heads = hidden // head_dim")
    parser.add_argument("--group-size", type=int, default=4, help="layers per SA group in the group table")
    parser.add_argument("--rep-ms", type=int, default=200, help="timing budget per measurement")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        help="cuda (the default where there is one); cpu: the Triton interpreter, a smoke run",
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument(
        "--backward-warps",
        type=int,
        help="also time the fused group with the backward at its default tiles and this many warps",
    )
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


def _time_ms(fn: Callable[[], object], grads: list[torch.Tensor], rep_ms: int, cuda: bool = True) -> float:
    """triton's do_bench flushes L2 between runs; imported here because triton is optional. Off CUDA:
    the mean of plain calls, as many as fit in ``rep_ms`` (at least one; the interpreter compiles nothing
    and each call costs seconds, so there is no warm-up)."""
    if cuda:
        from triton.testing import do_bench

        return do_bench(fn, warmup=max(rep_ms // 4, 10), rep=rep_ms, grad_to_none=grads)
    calls, start = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - start < rep_ms / 1e3:
        for grad in grads:
            grad.grad = None
        fn()
        calls += 1
    return (time.perf_counter() - start) * 1e3 / calls


def _time_graphed_ms(
    fn: Callable[[], object], grads: list[torch.Tensor], rep_ms: int, cuda: bool = True
) -> float | None:
    """GPU time alone: ``fn`` captured in a CUDA graph and replayed (no L2 flush, no host work); None
    off CUDA."""
    if not cuda:
        return None
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=rep_ms, grad_to_none=grads)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


@dataclasses.dataclass(frozen=True)
class Setup:
    """Where and in what the leaves are made."""

    device: str = "cuda"
    dtype: torch.dtype = torch.bfloat16


def _inputs(b: int, h: int, t: int, d: int, layers: int, setup: Setup) -> list[torch.Tensor]:
    """q, k and one v per layer, leaves of the setup's dtype on its device."""
    return [
        torch.randn(b, h, t, d, device=setup.device, dtype=setup.dtype, requires_grad=True)
        for _ in range(2 + layers)
    ]


def _bench_kernels(
    b: int, h: int, t: int, d: int, rep_ms: int, setup: Setup = Setup()
) -> dict[str, tuple[float, float]]:
    """TFLOP/s (fwd, fwd+bwd) of the anchor alone and of SDPA flash at one shape."""
    q, k, v = leaves = _inputs(b, h, t, d, 1, setup)
    cuda = setup.device == "cuda"
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
            fwd_ms = _time_ms(forward, [], rep_ms, cuda)
        both_ms = _time_ms(lambda f=forward: f().backward(dout), leaves, rep_ms, cuda)
        results[name] = (flops / fwd_ms / 1e9, flops * (1 + BACKWARD_FLOP_RATIO) / both_ms / 1e9)
    return results


def _bench_group(
    b: int,
    h: int,
    t: int,
    d: int,
    layers: int,
    rep_ms: int,
    forced: dict[str, Tiles],
    setup: Setup = Setup(),
    warps: int | None = None,
) -> dict[str, tuple[float | None, ...]]:
    """Milliseconds (fwd, fwd+bwd, fwd+bwd graphed) of a whole group: fused kernels, and SDPA once per
    layer; with ``forced`` tiles, the fused kernels again at those tiles ("sa-forced"); with ``warps``,
    again with the backward at its default tiles for this head size and that many warps ("sa-warpsN")."""
    leaves = _inputs(b, h, t, d, layers, setup)
    cuda = setup.device == "cuda"
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

    tiles_of: dict[str, dict[str, Tiles]] = {"sa-fused": {}, "sdpa-per-layer": {}}
    if forced:
        tiles_of["sa-forced"] = forced
    if warps:
        tiles_of[f"sa-warps{warps}"] = {"backward": _with_warps(candidates("backward", d)[0], warps)}
    results = {}
    for name, tiles in tiles_of.items():
        base = per_layer if name == "sdpa-per-layer" else fused

        def forward(f: Callable[[], list[torch.Tensor]] = base, tiles: dict[str, Tiles] = tiles):
            with forced_tiles(**tiles) if tiles else nullcontext():
                return f()

        def step(f: Callable[[], list[torch.Tensor]] = forward, tiles: dict[str, Tiles] = tiles) -> None:
            outs = f()
            with forced_tiles(**tiles) if tiles else nullcontext():
                torch.autograd.backward(outs, douts)

        try:
            with torch.no_grad():
                fwd_ms = _time_ms(forward, [], rep_ms, cuda)
            results[name] = (
                fwd_ms,
                _time_ms(step, leaves, rep_ms, cuda),
                _time_graphed_ms(step, leaves, rep_ms, cuda),
            )
        except Exception as err:  # forced tiles have no fall-back: one that does not fit leaves the rest
            if not tiles:
                raise
            print(f"{name} at D={d}, T={t}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            results[name] = (None, None, None)
    return results


def _with_warps(tiles: Tiles, warps: int) -> Tiles:
    return dataclasses.replace(tiles, num_warps=warps)


def _table(
    title: str,
    names: list[str],
    rows: Callable[[int, int], dict[str, tuple[float | None, ...]]],
    args,
    fields: tuple[str, ...],
    record: list[dict[str, Any]],
    save: Callable[[], None],
) -> None:
    """Print a table row by row; append each row to ``record`` (``fields`` name a cell's numbers) and
    ``save`` after each."""
    print(title)
    width = 33 if "graphed" in title else 21
    print(f"{'D':>4} {'T':>6} " + " ".join(f"{n:>{width}}" for n in names))
    for d in args.head_dims:
        for t in args.seq_lens:
            res = rows(d, t)
            cells = " ".join(" | ".join(_cell(x) for x in res[n]) for n in names)
            print(f"{d:>4} {t:>6} {cells}", flush=True)
            record.append({"d": d, "t": t, **{n: dict(zip(fields, res[n], strict=True)) for n in names}})
            save()


def _cell(x: float | None) -> str:
    return f"{'-':>9}" if x is None else f"{x:>9.2f}"


def main() -> int:
    args = _parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    if device is None or (device == "cuda" and not torch.cuda.is_available()):
        print("bench_kernels: no CUDA device, nothing measured.")
        return 0
    from sa_train import kernels

    if not kernels.is_available():
        print(
            "bench_kernels: --device cpu runs the kernels in the Triton interpreter: set TRITON_INTERPRET=1."
        )
        return 2
    setup = Setup(device, DTYPES[args.dtype])
    where = (
        torch.cuda.get_device_name() if device == "cuda" else "CPU, Triton interpreter (not a measurement)"
    )
    print(f"causal {args.dtype}, batch {args.batch}, hidden {args.hidden}, on {where}")
    forced = dict(args.tiles)
    report: dict[str, Any] = {
        "device": where,
        "torch": torch.__version__,
        "dtype": args.dtype,
        "batch": args.batch,
        "hidden": args.hidden,
        "group_size": args.group_size,
        "forced_tiles": {kernel: dataclasses.asdict(tiles) for kernel, tiles in forced.items()},
        "backward_warps": args.backward_warps,
        "kernels": [],
        "group": [],
    }

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))

    _table(
        "per kernel, TFLOP/s (fwd | fwd+bwd)",
        ["anchor", "sdpa-flash"],
        lambda d, t: _bench_kernels(args.batch, args.hidden // d, t, d, args.rep_ms, setup),
        args,
        ("fwd_tflops", "fwdbwd_tflops"),
        report["kernels"],
        save,
    )
    if forced:
        print("sa-forced: " + ", ".join(f"{kernel} at {tiles}" for kernel, tiles in forced.items()))
    warps = args.backward_warps
    if warps:
        print(f"sa-warps{warps}: backward at its default tiles with {warps} warps")
    _table(
        f"group of {args.group_size} layers, ms (fwd | fwd+bwd | fwd+bwd graphed)",
        [
            "sa-fused",
            "sdpa-per-layer",
            *(["sa-forced"] if forced else []),
            *([f"sa-warps{warps}"] if warps else []),
        ],
        lambda d, t: _bench_group(
            args.batch, args.hidden // d, t, d, args.group_size, args.rep_ms, forced, setup, warps
        ),
        args,
        ("fwd_ms", "fwdbwd_ms", "fwdbwd_graphed_ms"),
        report["group"],
        save,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
