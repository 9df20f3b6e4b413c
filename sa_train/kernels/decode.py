"""One-token decode for a whole Shared-Attention group in a single launch.

The new token's anchor query sees every cached key (its own included), but the shared layers' values for
the new token do not exist yet when the group starts. So the kernel returns, per layer, the softmax-weighted
sum over the past values plus the weight of the new token; ``decode_finish`` adds the last term later.
"""

import triton
import triton.language as tl
from torch import Tensor, empty, float32

from .checks import check_head_dim, check_same_kind
from .flash import LOG2E, dot_precision
from .tiles import Tiles, launch


@triton.jit
def _decode_kernel(
    Q,
    K,
    V,
    PART,
    PLAST,
    qk_scale2,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vg,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_pg,
    stride_pb,
    stride_ph,
    H,
    HKV,
    T,
    GROUP,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """All query heads of one kv head, for one layer of the group (program_id(1))."""
    bkv = tl.program_id(0)
    layer = tl.program_id(1)
    b = bkv // HKV
    kv = bkv % HKV
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    head_ok = offs_h < GROUP
    heads = kv * GROUP + offs_h
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=head_ok[:, None], other=0.0
    )
    k_base = K + b * stride_kb + kv * stride_kh
    v_base = V + layer * stride_vg + b * stride_vb + kv * stride_vh
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    s_last = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, T, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(
            k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=offs_n[:, None] < T, other=0.0
        )
        v = tl.load(
            v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=offs_n[:, None] < T - 1, other=0.0
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale2
        s = tl.where(offs_n[None, :] < T, s, float("-inf"))
        s_last += tl.sum(tl.where(offs_n[None, :] == T - 1, s, 0.0), 1)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    part_ptrs = PART + layer * stride_pg + b * stride_pb + heads[:, None] * stride_ph + offs_d[None, :]
    tl.store(part_ptrs, acc / l_i[:, None], mask=head_ok[:, None])
    if layer == 0:
        tl.store(PLAST + b * H + heads, tl.math.exp2(s_last - m_i) / l_i, mask=head_ok)


def check_decode_inputs(q: Tensor, k_cache: Tensor, v_caches: Tensor) -> None:
    """q (B, H, 1, D); k_cache (B, Hkv, T, D) with the new token at T-1; v_caches (G, B, Hkv, T-1, D)."""
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"q must be (B, H, 1, D), got {tuple(q.shape)}")
    if k_cache.dim() != 4 or v_caches.dim() != 5:
        raise ValueError("k_cache must be 4-D (B, Hkv, T, D) and v_caches 5-D (G, B, Hkv, T-1, D)")
    b, h, _, d = q.shape
    _, hkv, t, _ = k_cache.shape
    if k_cache.shape[0] != b or k_cache.shape[3] != d or h % hkv:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} does not fit q {tuple(q.shape)}")
    if tuple(v_caches.shape[1:]) != (b, hkv, t - 1, d):
        raise ValueError(f"v_caches must be (G, {b}, {hkv}, {t - 1}, {d}), got {tuple(v_caches.shape)}")
    check_head_dim(d)
    check_same_kind(q, k_cache, v_caches)


def launch_decode(q: Tensor, k_cache: Tensor, v_caches: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Run the decode kernel on checked inputs: (partials (G, B, H, D) fp32, p_last (B, H) fp32)."""
    b, h, _, d = q.shape
    hkv, t = k_cache.shape[1], k_cache.shape[2]
    g = v_caches.shape[0]
    q, k_cache, v_caches = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k_cache, v_caches))
    partials = empty((g, b, h, d), device=q.device, dtype=float32)
    p_last = empty((b, h), device=q.device, dtype=float32)
    group = h // hkv
    precision = dot_precision(q.dtype)

    def run(tiles: Tiles) -> None:
        _decode_kernel[(b * hkv, g)](
            q,
            k_cache,
            v_caches,
            partials,
            p_last,
            scale * LOG2E.value,
            q.stride(0),
            q.stride(1),
            *k_cache.stride()[:3],
            *v_caches.stride()[:4],
            *partials.stride()[:3],
            h,
            hkv,
            t,
            group,
            HEAD_DIM=d,
            BLOCK_H=max(tiles.block_m, triton.next_power_of_2(group)),
            BLOCK_N=tiles.block_n,
            PRECISION=precision,
            num_warps=tiles.num_warps,
            num_stages=tiles.num_stages,
        )

    launch("decode", q, {"group": triton.next_power_of_2(group), "precision": precision}, run)
    return partials, p_last
