"""Throughput of the SA anchor and shared kernels against PyTorch's flash SDPA (causal, bf16, CUDA only)."""

import argparse
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sa_train.kernels import anchor_attention, shared_attention

BACKWARD_FLOP_RATIO = 2.5  # the backward runs five T×T matmuls to the forward's two


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=2048, help="heads = hidden // head_dim")
    parser.add_argument("--rep-ms", type=int, default=200, help="timing budget per measurement")
    return parser.parse_args()


def _causal_fwd_flops(b: int, h: int, t: int, d: int) -> float:
    """QK^T and PV over the causal half of the T×T score matrix."""
    return 2 * 2 * b * h * t * t * d / 2


def _time_ms(fn: Callable[[], object], grads: list[torch.Tensor], rep_ms: int) -> float:
    """triton's do_bench flushes L2 between runs; imported here because triton is optional."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=max(rep_ms // 4, 10), rep=rep_ms, grad_to_none=grads)


def _bench_case(b: int, h: int, t: int, d: int, rep_ms: int) -> dict[str, tuple[float, float]]:
    """TFLOP/s (fwd, fwd+bwd) for anchor, shared and SDPA flash at one shape."""
    q, k, v = (
        torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    dout = torch.randn_like(q)
    scale = d**-0.5
    with torch.no_grad():
        _, lse = anchor_attention(q, k, v, scale)

    def sdpa() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

    forwards: dict[str, Callable[[], torch.Tensor]] = {
        "anchor": lambda: anchor_attention(q, k, v, scale)[0],
        "shared": lambda: shared_attention(q, k, lse, v, scale),
        "sdpa-flash": sdpa,
    }
    flops = _causal_fwd_flops(b, h, t, d)
    results = {}
    for name, forward in forwards.items():
        with torch.no_grad():
            fwd_ms = _time_ms(forward, [], rep_ms)
        both_ms = _time_ms(lambda f=forward: f().backward(dout), [q, k, v], rep_ms)
        results[name] = (flops / fwd_ms / 1e9, flops * (1 + BACKWARD_FLOP_RATIO) / both_ms / 1e9)
    return results


def main() -> int:
    args = _parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device, nothing measured.")
        return 0
    names = ["anchor", "shared", "sdpa-flash"]
    print(
        f"causal bf16, batch {args.batch}, hidden {args.hidden}; TFLOP/s (fwd | fwd+bwd) on "
        f"{torch.cuda.get_device_name()}"
    )
    print(f"{'D':>4} {'T':>6} " + " ".join(f"{n:>21}" for n in names))
    for d in args.head_dims:
        for t in args.seq_lens:
            res = _bench_case(args.batch, args.hidden // d, t, d, args.rep_ms)
            cells = " ".join(f"{res[n][0]:>9.1f} | {res[n][1]:>9.1f}" for n in names)
            print(f"{d:>4} {t:>6} {cells}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
