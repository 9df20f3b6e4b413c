"""autograd wrappers: the anchor returns (out, lse); shared layers consume that lse as a constant input.

Both backward passes use the full softmax Jacobian, so the dq, dk each shared layer returns already
include the gradient that would have flowed through lse; autograd sums them into the anchor's q and k.
"""

import torch
from torch import Tensor

from . import flash
from .checks import check_attention_inputs


def _unit_stride(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Kernels index the head dimension densely; anything else is copied once."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


class _AnchorAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        q, k, v = _unit_stride(q, k, v)
        out, lse = flash.attention_forward(q, k, v, scale, None)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor, _dlse: Tensor | None) -> tuple[Tensor, Tensor, Tensor, None]:
        q, k, v, out, lse = ctx.saved_tensors
        (dout,) = _unit_stride(dout)
        dq, dk, dv = flash.attention_backward(q, k, v, out, dout, lse, ctx.scale)
        return dq, dk, dv, None


class _SharedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, lse: Tensor, v: Tensor, scale: float) -> Tensor:
        q, k, v = _unit_stride(q, k, v)
        lse = lse.detach().float().contiguous()
        out, _ = flash.attention_forward(q, k, v, scale, lse)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple[Tensor, Tensor, None, Tensor, None]:
        q, k, v, out, lse = ctx.saved_tensors
        (dout,) = _unit_stride(dout)
        dq, dk, dv = flash.attention_backward(q, k, v, out, dout, lse, ctx.scale)
        return dq, dk, None, dv, None


def anchor_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Causal flash attention for a group's anchor: (out (B,H,T,D) in q.dtype, lse (B,H,T) fp32)."""
    check_attention_inputs(q, k, v)
    flash.check_runnable(q.device)
    return _AnchorAttention.apply(q, k, v, scale)


def shared_attention(q: Tensor, k: Tensor, lse: Tensor, v: Tensor, scale: float) -> Tensor:
    """A shared layer: O = exp(qk^T·scale − lse)·v with the anchor's q, k, lse and this layer's v."""
    check_attention_inputs(q, k, v)
    if lse.shape != q.shape[:3]:
        raise ValueError(f"lse must be (B, H, T) = {tuple(q.shape[:3])}, got {tuple(lse.shape)}")
    flash.check_runnable(q.device)
    return _SharedAttention.apply(q, k, lse, v, scale)
