"""Causal flash-attention forward kernels for a Shared-Attention group, and the launcher that sizes the grid.

The anchor kernel computes P online and returns its log-sum-exp; the shared kernel rebuilds the same P
directly as exp(s − lse), so it needs neither a running max nor a final rescale. The group's backward
is in ``backward``.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor, empty, float32

from .tiles import Tiles, launch

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _forward_tile(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    stride_kt,
    stride_vt,
    offs_m,
    offs_d,
    lse2,
    qk_scale2,
    T,
    start_n,
    BLOCK_N: tl.constexpr,
    MASK: tl.constexpr,
    SHARED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Fold one key tile into the accumulator; scores are in log2 units so exp2 can be used."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    in_seq = offs_n[:, None] < T
    k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=in_seq, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=in_seq, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale2
    if MASK:
        s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
    if SHARED:
        p = tl.math.exp2(s - lse2[:, None])
        acc += tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _forward_kernel(
    Q,
    K,
    V,
    LSE,
    OUT,
    qk_scale2,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_ob,
    stride_oh,
    stride_ot,
    H,
    T,
    GROUP,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SHARED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One query tile of one (batch, head). SHARED reads lse; otherwise it writes it.

    Causal work grows with the tile's row, so programs take tiles from the last row down: the GPU
    starts the longest first and the launch does not end on a tail of them (as flash-attention does).
    """
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kv = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    k_base = K + b * stride_kb + kv * stride_kh
    v_base = V + b * stride_vb + kv * stride_vh
    lse_ptrs = LSE + bh * T + offs_m
    if SHARED:
        lse2 = tl.load(lse_ptrs, mask=row_ok, other=0.0) * LOG2E
    else:
        lse2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, start_m, BLOCK_N):
        acc, m_i, l_i = _forward_tile(
            acc,
            m_i,
            l_i,
            q,
            k_base,
            v_base,
            stride_kt,
            stride_vt,
            offs_m,
            offs_d,
            lse2,
            qk_scale2,
            T,
            start_n,
            BLOCK_N,
            False,
            SHARED,
            PRECISION,
        )
    for start_n in range(start_m, tl.minimum(start_m + BLOCK_M, T), BLOCK_N):
        acc, m_i, l_i = _forward_tile(
            acc,
            m_i,
            l_i,
            q,
            k_base,
            v_base,
            stride_kt,
            stride_vt,
            offs_m,
            offs_d,
            lse2,
            qk_scale2,
            T,
            start_n,
            BLOCK_N,
            True,
            SHARED,
            PRECISION,
        )
    if not SHARED:
        acc = acc / l_i[:, None]
        tl.store(lse_ptrs, (m_i + tl.math.log2(l_i)) * LN2, mask=row_ok)
    o_ptrs = OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=row_ok[:, None])


def _kernels_compiled() -> bool:
    """Triton chose the compiler (not the interpreter) when it was first imported; fixed from then on."""
    return isinstance(_forward_kernel, triton.runtime.JITFunction)


KERNELS_COMPILED = _kernels_compiled()


def check_runnable(device: torch.device) -> None:
    """Compiled kernels need CUDA; the interpreter (chosen when triton was imported) runs anywhere."""
    if device.type != "cuda" and KERNELS_COMPILED:
        raise RuntimeError(
            f"Triton kernels got {device.type} tensors; use CUDA tensors, or set TRITON_INTERPRET=1 "
            "before sa_train.kernels is imported to run them in the Triton interpreter"
        )


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 operands follow torch's float32 matmul precision, as torch.matmul does.

    'highest' (torch's default) keeps IEEE fp32 products; 'high' or 'medium' allow TF32, which rounds the
    operands to 10 mantissa bits (relative errors near 1e-3). Half-precision operands ignore it.
    """
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def bht_strides(x: Tensor) -> tuple[int, int, int]:
    """Strides of the batch, head and time dimensions; kernels index the head dimension densely."""
    return x.stride(0), x.stride(1), x.stride(2)


def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, scale: float, lse: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Run the anchor kernel (lse is None: computed and returned) or the shared kernel (lse given).

    Inputs must have a unit stride on the head dimension; returns (out, lse).
    """
    b, h, t, d = q.shape
    shared = lse is not None
    lse_buf = lse if shared else empty((b, h, t), device=q.device, dtype=float32)
    out = empty((b, h, t, d), device=q.device, dtype=q.dtype)
    precision = dot_precision(q.dtype)

    def run(tiles: Tiles) -> None:
        _forward_kernel[(triton.cdiv(t, tiles.block_m), b * h)](
            q,
            k,
            v,
            lse_buf,
            out,
            scale * LOG2E.value,
            *bht_strides(q),
            *bht_strides(k),
            *bht_strides(v),
            *bht_strides(out),
            h,
            t,
            h // k.shape[1],
            HEAD_DIM=d,
            BLOCK_M=tiles.block_m,
            BLOCK_N=tiles.block_n,
            SHARED=shared,
            PRECISION=precision,
            num_warps=tiles.num_warps,
            num_stages=tiles.num_stages,
        )

    launch("forward", q, {"shared": shared, "precision": precision}, run)
    return out, lse_buf
