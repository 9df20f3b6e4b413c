"""Backward kernels of a Shared-Attention group: dq and dk once per group, dV per layer.

Every layer l of a group computes O_l = P·V_l with the anchor's P = softmax(qk^T·scale). Only
dV_l = P^T·dO_l and dP_l = dO_l·V_l^T depend on the layer; dS = P∘(dP − D) is linear in dP and in
D = rowsum(dO∘O), so the whole group's dq = dS·k·scale and dk = dS^T·q·scale come from one pass over
dP = Σ_l dO_l·V_l^T and D = Σ_l D_l. One kernel (``_backward_kernel``, after a pre-pass for D) does
both; two launchers split the work the way autograd orders it:

- ``shared_backward`` (each shared layer; autograd runs these first): D_l and dV_l alone, P rebuilt
  tile by tile from q, k and the anchor's lse;
- ``anchor_backward`` (last): the anchor's dV, and dq, dk of the group from the anchor's dO, V and the
  shared layers' stacked dO_l, V_l (``follower_dout``, ``follower_v``) with D = D_anchor − dlse, where
  dlse is the gradient autograd summed into the anchor's lse: −Σ_l D_l from the shared layers, plus
  that of any other use of lse, which this makes exact too.

Matmuls of T×T×D size (each over the causal half) for a group of G layers, forward recompute of QK^T
included: before, each layer ran a full backward, dk/dv kernel QK^T, dV, dP, dK plus dq kernel QK^T,
dP, dQ: 7G. Now a shared layer costs QK^T, dV (2) and the anchor QK^T, dV, G·dP, dK plus QK^T, G·dP,
dQ (2G + 5): 4G + 3 in all. For G = 4: 19 instead of 28; with the forward's 2G = 8, a training step's
attention costs 27 matmuls instead of 36. The dq pass recomputes dP, as in FlashAttention-2, to
avoid atomics, so the dP terms are counted twice.

The shared layers' dO_l tiles (and, in the dk/dv pass, V_l tiles) are re-read from global memory
(L2) per inner tile instead of staying resident: their number is only known at run time.
"""

import triton
import triton.language as tl
from torch import Tensor, empty, float32

from .flash import LOG2E, bht_strides, dot_precision
from .tiles import Tiles, launch


@triton.jit
def _delta_kernel(
    OUT,
    DO,
    DLSE,
    DELTA,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_db,
    stride_dh,
    stride_dt,
    H,
    T,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    """delta = rowsum(dO∘O) − dlse: the softmax-normalisation term of the backward."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    o = tl.load(
        OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dt + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + bh * T + offs_m, mask=row_ok, other=0.0)
    tl.store(DELTA + bh * T + offs_m, delta, mask=row_ok)


@triton.jit
def _dkdv_tile(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    vs_base,
    dos_base,
    lse_base,
    delta_base,
    stride_qt,
    stride_dt,
    stride_vsl,
    stride_vst,
    stride_dsl,
    stride_dst,
    offs_n,
    offs_d,
    qk_scale2,
    T,
    FOLLOWERS,
    start_m,
    BLOCK_M: tl.constexpr,
    MASK: tl.constexpr,
    WITH_DK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Add one query tile's contribution to dv (and dk), working in the transposed (key-major) frame."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(lse_base + offs_m, mask=row_ok, other=0.0) * LOG2E
    p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale2 - lse2[None, :])
    if MASK:
        p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    if WITH_DK:
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        for layer in range(FOLLOWERS):
            v_l = tl.load(
                vs_base + layer * stride_vsl + offs_n[:, None] * stride_vst + offs_d[None, :],
                mask=offs_n[:, None] < T,
                other=0.0,
            )
            do_l = tl.load(
                dos_base + layer * stride_dsl + offs_m[:, None] * stride_dst + offs_d[None, :],
                mask=row_ok[:, None],
                other=0.0,
            )
            dp_t += tl.dot(v_l, tl.trans(do_l), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dq_tile(
    dq,
    q,
    do,
    lse2,
    delta,
    k_base,
    v_base,
    vs_base,
    dos_base,
    stride_kt,
    stride_vt,
    stride_vsl,
    stride_vst,
    stride_dsl,
    stride_dst,
    offs_m,
    offs_d,
    qk_scale2,
    T,
    FOLLOWERS,
    start_n,
    BLOCK_N: tl.constexpr,
    MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Add one key tile's contribution to dq; dP sums the anchor's and every shared layer's dO·V^T."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    in_seq = offs_n[:, None] < T
    row_ok = offs_m[:, None] < T
    k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=in_seq, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=in_seq, other=0.0)
    p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale2 - lse2[:, None])
    if MASK:
        p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    for layer in range(FOLLOWERS):
        do_l = tl.load(
            dos_base + layer * stride_dsl + offs_m[:, None] * stride_dst + offs_d[None, :],
            mask=row_ok,
            other=0.0,
        )
        v_l = tl.load(
            vs_base + layer * stride_vsl + offs_n[:, None] * stride_vst + offs_d[None, :],
            mask=in_seq,
            other=0.0,
        )
        dp += tl.dot(do_l, tl.trans(v_l), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _dq_block(
    Q,
    K,
    V,
    DO,
    VS,
    DOS,
    LSE,
    DELTA,
    DQ,
    qk_scale2,
    scale,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_db,
    stride_dh,
    stride_dt,
    stride_vsl,
    stride_vsb,
    stride_vsh,
    stride_vst,
    stride_dsl,
    stride_dsb,
    stride_dsh,
    stride_dst,
    b,
    h,
    kv,
    H,
    T,
    FOLLOWERS,
    start_m,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dq of one query tile (BLOCK_M rows from start_m) of one (batch, head), streaming over the keys it
    can see in BLOCK_N-wide tiles."""
    bh = b * H + h
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dt + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    lse2 = tl.load(LSE + bh * T + offs_m, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + bh * T + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + kv * stride_kh
    v_base = V + b * stride_vb + kv * stride_vh
    vs_base = VS + b * stride_vsb + kv * stride_vsh
    dos_base = DOS + b * stride_dsb + h * stride_dsh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, start_m, BLOCK_N):
        dq = _dq_tile(
            dq,
            q,
            do,
            lse2,
            delta,
            k_base,
            v_base,
            vs_base,
            dos_base,
            stride_kt,
            stride_vt,
            stride_vsl,
            stride_vst,
            stride_dsl,
            stride_dst,
            offs_m,
            offs_d,
            qk_scale2,
            T,
            FOLLOWERS,
            start_n,
            BLOCK_N,
            False,
            PRECISION,
        )
    for start_n in range(start_m, tl.minimum(start_m + BLOCK_M, T), BLOCK_N):
        dq = _dq_tile(
            dq,
            q,
            do,
            lse2,
            delta,
            k_base,
            v_base,
            vs_base,
            dos_base,
            stride_kt,
            stride_vt,
            stride_vsl,
            stride_vst,
            stride_dsl,
            stride_dst,
            offs_m,
            offs_d,
            qk_scale2,
            T,
            FOLLOWERS,
            start_n,
            BLOCK_N,
            True,
            PRECISION,
        )
    tl.store(
        DQ + bh * T * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
        (dq * scale).to(DQ.dtype.element_ty),
        mask=row_ok[:, None],
    )


@triton.jit
def _backward_kernel(
    Q,
    K,
    V,
    DO,
    VS,
    DOS,
    LSE,
    DELTA,
    DQ,
    DK,
    DV,
    qk_scale2,
    scale,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_db,
    stride_dh,
    stride_dt,
    stride_vsl,
    stride_vsb,
    stride_vsh,
    stride_vst,
    stride_dsl,
    stride_dsb,
    stride_dsh,
    stride_dst,
    H,
    HKV,
    T,
    GROUP,
    FOLLOWERS,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WITH_DK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Block i (BLOCK_N rows) of one kv head: dk and dv of its keys, then dq of its queries, each over
    that kv head's query heads, so GQA needs no atomics.

    Pairing the blocks balances the causal work, as Triton's fused-attention tutorial does: the keys of
    block i are seen by the queries of blocks i to n−1, the queries of block i see the keys of blocks 0
    to i, so every program loops over n + 1 tiles whatever i (a dk/dv kernel and a dq kernel apart ran
    programs of 1 to n tiles, and each launch waited on its longest). Without WITH_DK it computes dv
    alone (a shared layer): V, VS, DOS, DELTA and DQ are not read.
    """
    start_n = tl.program_id(0) * BLOCK_N
    bkv = tl.program_id(1)
    b = bkv // HKV
    kv = bkv % HKV
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n[:, None] < T
    k_ptrs = K + b * stride_kb + kv * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    k = tl.load(k_ptrs, mask=col_ok, other=0.0)
    if WITH_DK:
        v_ptrs = V + b * stride_vb + kv * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]
        v = tl.load(v_ptrs, mask=col_ok, other=0.0)
    else:
        v = k
    vs_base = VS + b * stride_vsb + kv * stride_vsh
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for g in range(GROUP):
        h = kv * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_db + h * stride_dh
        dos_base = DOS + b * stride_dsb + h * stride_dsh
        lse_base = LSE + (b * H + h) * T
        delta_base = DELTA + (b * H + h) * T
        for start_m in range(start_n, start_n + BLOCK_N, BLOCK_M):
            dk, dv = _dkdv_tile(
                dk,
                dv,
                k,
                v,
                q_base,
                do_base,
                vs_base,
                dos_base,
                lse_base,
                delta_base,
                stride_qt,
                stride_dt,
                stride_vsl,
                stride_vst,
                stride_dsl,
                stride_dst,
                offs_n,
                offs_d,
                qk_scale2,
                T,
                FOLLOWERS,
                start_m,
                BLOCK_M,
                True,
                WITH_DK,
                PRECISION,
            )
        for start_m in range(start_n + BLOCK_N, T, BLOCK_M):
            dk, dv = _dkdv_tile(
                dk,
                dv,
                k,
                v,
                q_base,
                do_base,
                vs_base,
                dos_base,
                lse_base,
                delta_base,
                stride_qt,
                stride_dt,
                stride_vsl,
                stride_vst,
                stride_dsl,
                stride_dst,
                offs_n,
                offs_d,
                qk_scale2,
                T,
                FOLLOWERS,
                start_m,
                BLOCK_M,
                False,
                WITH_DK,
                PRECISION,
            )
    tl.store(
        DV + bkv * T * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        mask=col_ok,
    )
    if WITH_DK:
        tl.store(
            DK + bkv * T * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :],
            (dk * scale).to(DK.dtype.element_ty),
            mask=col_ok,
        )
        for g in range(GROUP):
            _dq_block(
                Q,
                K,
                V,
                DO,
                VS,
                DOS,
                LSE,
                DELTA,
                DQ,
                qk_scale2,
                scale,
                stride_qb,
                stride_qh,
                stride_qt,
                stride_kb,
                stride_kh,
                stride_kt,
                stride_vb,
                stride_vh,
                stride_vt,
                stride_db,
                stride_dh,
                stride_dt,
                stride_vsl,
                stride_vsb,
                stride_vsh,
                stride_vst,
                stride_dsl,
                stride_dsb,
                stride_dsh,
                stride_dst,
                b,
                kv * GROUP + g,
                kv,
                H,
                T,
                FOLLOWERS,
                start_n,
                HEAD_DIM,
                BLOCK_N,
                BLOCK_M,
                PRECISION,
            )


def _layer_strides(x: Tensor) -> tuple[int, int, int, int]:
    """Strides of a stack of (B, heads, T, D) tensors: layer, batch, head and time."""
    return x.stride(0), x.stride(1), x.stride(2), x.stride(3)


def _delta(out: Tensor, dout: Tensor, dlse: Tensor | None) -> Tensor:
    b, h, t, d = out.shape
    delta = empty((b, h, t), device=out.device, dtype=float32)

    def run(tiles: Tiles) -> None:
        _delta_kernel[(triton.cdiv(t, tiles.block_m), b * h)](
            out,
            dout,
            delta if dlse is None else dlse,
            delta,
            *bht_strides(out),
            *bht_strides(dout),
            h,
            t,
            HEAD_DIM=d,
            BLOCK_M=tiles.block_m,
            HAS_DLSE=dlse is not None,
            num_warps=tiles.num_warps,
            num_stages=tiles.num_stages,
        )

    launch("delta", out, {"dlse": dlse is not None}, run)
    return delta


def _backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
    follower_v: Tensor,
    follower_dout: Tensor,
    lse: Tensor,
    delta: Tensor,
    scale: float,
    dv: Tensor,
    dq_dk: tuple[Tensor, Tensor] | None,
) -> None:
    """Write dv, and dq and dk when their buffers are given (then dP sums the followers' dO_l·V_l^T)."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    precision = dot_precision(q.dtype)

    def run(tiles: Tiles) -> None:
        _backward_kernel[(triton.cdiv(t, tiles.block_n), b * hkv)](
            q,
            k,
            v,
            dout,
            follower_v,
            follower_dout,
            lse,
            delta,
            dv if dq_dk is None else dq_dk[0],
            dv if dq_dk is None else dq_dk[1],
            dv,
            scale * LOG2E.value,
            scale,
            *bht_strides(q),
            *bht_strides(k),
            *bht_strides(v),
            *bht_strides(dout),
            *_layer_strides(follower_v),
            *_layer_strides(follower_dout),
            h,
            hkv,
            t,
            h // hkv,
            follower_v.shape[0],
            HEAD_DIM=d,
            BLOCK_M=tiles.block_m,
            BLOCK_N=tiles.block_n,
            WITH_DK=dq_dk is not None,
            PRECISION=precision,
            num_warps=tiles.num_warps,
            num_stages=tiles.num_stages,
        )

    launch("backward", q, {"dq_dk": dq_dk is not None, "precision": precision}, run)


def shared_backward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """(dv, delta) of a shared layer O = exp(qk^T·scale − lse)·v: dv = P^T·dO and delta = rowsum(dO∘O).

    No dq or dk: the anchor computes them for the whole group. Inputs need a unit head-dimension stride.
    """
    delta = _delta(out, dout, None)
    dv = empty(v.shape, device=v.device, dtype=v.dtype)
    _backward(q, k, v, dout, no_layers(v), no_layers(dout), lse, delta, scale, dv, None)
    return dv, delta


def no_layers(x: Tensor) -> Tensor:
    """An empty stack of tensors like x (a view of x, so its pointer stays valid for a launch)."""
    return x.unsqueeze(0)[:0]


def anchor_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    dout: Tensor,
    lse: Tensor,
    dlse: Tensor | None,
    follower_v: Tensor,
    follower_dout: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of the anchor O = softmax(qk^T·scale)·v, dq and dk for its whole group.

    ``follower_v`` (L, B, Hkv, T, D) and ``follower_dout`` (L, B, H, T, D) stack the shared layers'
    values and output gradients (L may be 0, see ``no_layers``); ``dlse`` (B, H, T) fp32 is the
    gradient of the anchor's lse. Every tensor needs a unit stride on the head dimension.
    """
    b, h, t, d = q.shape
    delta = _delta(out, dout, dlse)
    dk = empty(k.shape, device=k.device, dtype=k.dtype)
    dv = empty(v.shape, device=v.device, dtype=v.dtype)
    dq = empty((b, h, t, d), device=q.device, dtype=q.dtype)
    _backward(q, k, v, dout, follower_v, follower_dout, lse, delta, scale, dv, (dq, dk))
    return dq, dk, dv
