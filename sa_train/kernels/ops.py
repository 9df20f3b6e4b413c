"""The kernels as PyTorch operators (namespace ``sa_train``), so ``torch.compile`` treats each as one op.

Each operator has a fake (meta) implementation that gives output shapes, dtypes and strides without
running anything, and the attention forwards have autograd formulas that call the backward operator; so
Dynamo and AOTAutograd trace a block that uses them, forward and backward, without a graph break, and
Inductor never looks inside the Triton kernels (it calls the operators as they are).

The anchor returns (out, lse); shared layers consume that lse as a constant input. Both backward passes
use the full softmax Jacobian, so the dq, dk each shared layer returns already include the gradient that
would have flowed through lse; autograd sums them into the anchor's q and k.
"""

import torch
from torch import Tensor

from . import flash
from .checks import check_attention_inputs
from .decode import check_decode_inputs, launch_decode


def _unit_stride(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Kernels index the head dimension densely; anything else is copied once."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


# --- forward and backward operators -------------------------------------------------------------------


@torch.library.custom_op("sa_train::anchor_forward", mutates_args=())
def anchor_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Causal flash attention that also returns the per-row log-sum-exp (fp32, natural log)."""
    q, k, v = _unit_stride(q, k, v)
    return flash.attention_forward(q, k, v, scale, None)


@anchor_forward.register_fake
def _anchor_forward_fake(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    b, h, t, d = q.shape
    return q.new_empty((b, h, t, d)), q.new_empty((b, h, t), dtype=torch.float32)


@torch.library.custom_op("sa_train::shared_forward", mutates_args=())
def shared_forward(q: Tensor, k: Tensor, lse: Tensor, v: Tensor, scale: float) -> Tensor:
    """O = exp(qk^T·scale − lse)·v: the anchor's P rebuilt tile by tile, applied to this layer's v."""
    q, k, v = _unit_stride(q, k, v)
    out, _ = flash.attention_forward(q, k, v, scale, lse.float().contiguous())
    return out


@shared_forward.register_fake
def _shared_forward_fake(q: Tensor, k: Tensor, lse: Tensor, v: Tensor, scale: float) -> Tensor:
    return q.new_empty(q.shape)


@torch.library.custom_op("sa_train::attention_backward", mutates_args=())
def attention_backward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of O = softmax(qk^T·scale)·v, with lse the normaliser of q and k."""
    q, k, v, out, dout = _unit_stride(q, k, v, out, dout)
    return flash.attention_backward(q, k, v, out, dout, lse.float().contiguous(), scale)


@attention_backward.register_fake
def _attention_backward_fake(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _anchor_setup_context(ctx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _anchor_backward(ctx, dout: Tensor, _dlse: Tensor | None) -> tuple:
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_backward(q, k, v, out, dout, lse, ctx.scale)
    return dq, dk, dv, None


def _shared_setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    q, k, lse, v, scale = inputs
    ctx.save_for_backward(q, k, v, output, lse)
    ctx.scale = scale


def _shared_backward(ctx, dout: Tensor) -> tuple:
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_backward(q, k, v, out, dout, lse, ctx.scale)
    return dq, dk, None, dv, None


anchor_forward.register_autograd(_anchor_backward, setup_context=_anchor_setup_context)
shared_forward.register_autograd(_shared_backward, setup_context=_shared_setup_context)


@torch.library.custom_op("sa_train::decode_group_partial", mutates_args=())
def decode_partial(q: Tensor, k_cache: Tensor, v_caches: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Grouped one-token decode: per-layer partial outputs over past values and the new key's weight."""
    return launch_decode(q, k_cache, v_caches, scale)


@decode_partial.register_fake
def _decode_partial_fake(q: Tensor, k_cache: Tensor, v_caches: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    b, h, _, d = q.shape
    g = v_caches.shape[0]
    return q.new_empty((g, b, h, d), dtype=torch.float32), q.new_empty((b, h), dtype=torch.float32)


# --- public entry points: validate, then call the operators --------------------------------------------


def anchor_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Causal flash attention for a group's anchor: (out (B,H,T,D) in q.dtype, lse (B,H,T) fp32).

    lse carries no gradient (it is marked non-differentiable): shared layers differentiate through the
    full softmax themselves.
    """
    check_attention_inputs(q, k, v)
    flash.check_runnable(q.device)
    return torch.ops.sa_train.anchor_forward(q, k, v, float(scale))


def shared_attention(q: Tensor, k: Tensor, lse: Tensor, v: Tensor, scale: float) -> Tensor:
    """A shared layer: O = exp(qk^T·scale − lse)·v with the anchor's q, k, lse and this layer's v."""
    check_attention_inputs(q, k, v)
    if lse.shape != q.shape[:3]:
        raise ValueError(f"lse must be (B, H, T) = {tuple(q.shape[:3])}, got {tuple(lse.shape)}")
    flash.check_runnable(q.device)
    return torch.ops.sa_train.shared_forward(q, k, lse, v, float(scale))


def decode_group_partial(q: Tensor, k_cache: Tensor, v_caches: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Per-layer partial outputs over past values, and the new token's own attention weight.

    q (B, H, 1, D); k_cache (B, Hkv, T, D) including the new token at T-1; v_caches (G, B, Hkv, T-1, D).
    Returns (partials (G, B, H, D) fp32, p_last (B, H) fp32); finish each layer with ``decode_finish``.
    """
    check_decode_inputs(q, k_cache, v_caches)
    flash.check_runnable(q.device)
    return torch.ops.sa_train.decode_group_partial(q, k_cache, v_caches, float(scale))
