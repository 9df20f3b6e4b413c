"""The kernels as PyTorch operators (namespace ``sa_train``), so ``torch.compile`` treats each as one op.

Each operator has a fake (meta) implementation that gives output shapes, dtypes and strides without
running anything, and the attention forwards have autograd formulas that call the backward operators; so
Dynamo and AOTAutograd trace a block that uses them, forward and backward, without a graph break, and
Inductor never looks inside the Triton kernels (it calls the operators as they are).

A group's backward computes dq and dk once (see ``backward``). The anchor returns (out, lse, links):
one :class:`Link` per shared layer, which that layer's operator takes as an input. Autograd therefore
runs every shared layer's backward before the anchor's, and each hands the anchor what its dq, dk need
through two gradients the graph already has to carry:

- lse is an ordinary differentiable output: a shared layer's O_l = exp(qk^T·scale − lse)·V_l has the
  exact gradient dlse = −rowsum(dO_l∘O_l), and autograd sums these over the group;
- its link's gradient is the pair (dO_l, V_l), the factors of the layer's dP_l = dO_l·V_l^T, in place of
  a gradient for q and k (the shared operator returns none for them).

The links are stride-0 views of one zero each, so they cost no memory; they are never read. The shared
operator thus differentiates correctly only behind the anchor that made its link, which is how the
public entry points and the model use it.
"""

import torch
from torch import Tensor

from . import backward, flash
from .checks import check_attention_inputs
from .decode import check_decode_inputs, launch_decode
from .link import Link


def _unit_stride(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Kernels index the head dimension densely; anything else is copied once."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def _links(q: Tensor, v: Tensor, followers: int) -> list[Tensor]:
    """Two placeholders per shared layer, (dout-shaped, value-shaped), flattened: an operator returns a
    flat list. Each is a fresh zero expanded to its shape."""
    return [
        t
        for _ in range(followers)
        for t in (q.new_zeros(()).expand(q.shape), v.new_zeros(()).expand(v.shape))
    ]


# --- forward and backward operators -------------------------------------------------------------------


@torch.library.custom_op("sa_train::anchor_forward", mutates_args=())
def anchor_forward(
    q: Tensor, k: Tensor, v: Tensor, scale: float, followers: int
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Causal flash attention that also returns the per-row log-sum-exp (fp32, natural log) and the
    links of ``followers`` shared layers."""
    q, k, v = _unit_stride(q, k, v)
    out, lse = flash.attention_forward(q, k, v, scale, None)
    return out, lse, _links(q, v, followers)


@anchor_forward.register_fake
def _anchor_forward_fake(
    q: Tensor, k: Tensor, v: Tensor, scale: float, followers: int
) -> tuple[Tensor, Tensor, list[Tensor]]:
    b, h, t, d = q.shape
    return q.new_empty((b, h, t, d)), q.new_empty((b, h, t), dtype=torch.float32), _links(q, v, followers)


@torch.library.custom_op("sa_train::shared_forward", mutates_args=())
def shared_forward(
    q: Tensor, k: Tensor, lse: Tensor, link_dout: Tensor, link_value: Tensor, v: Tensor, scale: float
) -> Tensor:
    """O = exp(qk^T·scale − lse)·v: the anchor's P rebuilt tile by tile, applied to this layer's v."""
    q, k, v = _unit_stride(q, k, v)
    out, _ = flash.attention_forward(q, k, v, scale, lse.float().contiguous())
    return out


@shared_forward.register_fake
def _shared_forward_fake(
    q: Tensor, k: Tensor, lse: Tensor, link_dout: Tensor, link_value: Tensor, v: Tensor, scale: float
) -> Tensor:
    return q.new_empty(q.shape)


@torch.library.custom_op("sa_train::anchor_backward", mutates_args=())
def anchor_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    dout: Tensor,
    lse: Tensor,
    dlse: Tensor | None,
    follower_v: list[Tensor],
    follower_dout: list[Tensor],
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of the anchor; dq and dk of its whole group, given the shared layers' values and
    output gradients and the gradient ``dlse`` of the anchor's lse."""
    q, k, v, out, dout = _unit_stride(q, k, v, out, dout)
    stacked_v = torch.stack(follower_v) if follower_v else backward.no_layers(v)
    stacked_dout = torch.stack(follower_dout) if follower_dout else backward.no_layers(dout)
    grad_lse = None if dlse is None else dlse.float().contiguous()
    lse = lse.float().contiguous()
    return backward.anchor_backward(q, k, v, out, dout, lse, grad_lse, stacked_v, stacked_dout, scale)


@anchor_backward.register_fake
def _anchor_backward_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    dout: Tensor,
    lse: Tensor,
    dlse: Tensor | None,
    follower_v: list[Tensor],
    follower_dout: list[Tensor],
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.custom_op("sa_train::shared_backward", mutates_args=())
def shared_backward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """(dv, rowsum(dO∘O)) of a shared layer; no dq, dk (the anchor's backward computes them)."""
    q, k, v, out, dout = _unit_stride(q, k, v, out, dout)
    return backward.shared_backward(q, k, v, out, dout, lse.float().contiguous(), scale)


@shared_backward.register_fake
def _shared_backward_fake(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    return v.new_empty(v.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def _anchor_setup_context(ctx, inputs: tuple, output: tuple) -> None:
    q, k, v, scale, _followers = inputs
    out, lse, _links = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _anchor_backward(ctx, dout: Tensor, dlse: Tensor | None, dlinks: list[Tensor | None]) -> tuple:
    """A link whose shared layer took no part in the loss has no gradient: it adds nothing to dP."""
    q, k, v, out, lse = ctx.saved_tensors
    pairs = [
        (d, val)
        for d, val in zip(dlinks[::2], dlinks[1::2], strict=True)
        if d is not None and val is not None
    ]
    follower_dout, follower_v = [d for d, _ in pairs], [val for _, val in pairs]
    dq, dk, dv = anchor_backward(q, k, v, out, dout, lse, dlse, follower_v, follower_dout, ctx.scale)
    return dq, dk, dv, None, None


def _shared_setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    q, k, lse, _link_dout, _link_value, v, scale = inputs
    ctx.save_for_backward(q, k, v, output, lse)
    ctx.scale = scale


def _shared_backward(ctx, dout: Tensor) -> tuple:
    """No gradient for q and k: (dout, v) go to the anchor as the link's gradient, −rowsum(dO∘O) as lse's."""
    q, k, v, out, lse = ctx.saved_tensors
    dv, delta = shared_backward(q, k, v, out, dout, lse, ctx.scale)
    return None, None, -delta, dout, v, dv, None


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


def anchor_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, followers: int = 0
) -> tuple[Tensor, Tensor, list[Link]]:
    """Causal flash attention for a group's anchor: out (B,H,T,D) in q.dtype, lse (B,H,T) fp32, and one
    :class:`Link` for each of the group's ``followers`` shared layers.

    lse is differentiable (its exact gradient, whoever uses it); hand it and a link to each shared layer.
    """
    check_attention_inputs(q, k, v)
    flash.check_runnable(q.device)
    out, lse, links = torch.ops.sa_train.anchor_forward(q, k, v, float(scale), followers)
    return out, lse, [Link(links[i], links[i + 1]) for i in range(0, len(links), 2)]


def shared_attention(q: Tensor, k: Tensor, lse: Tensor, link: Link, v: Tensor, scale: float) -> Tensor:
    """A shared layer: O = exp(qk^T·scale − lse)·v with the anchor's q, k, lse, one of its links and this
    layer's v. Its gradients for q and k reach them through the anchor's backward, via the link."""
    check_attention_inputs(q, k, v)
    if lse.shape != q.shape[:3]:
        raise ValueError(f"lse must be (B, H, T) = {tuple(q.shape[:3])}, got {tuple(lse.shape)}")
    if link.dout.shape != q.shape or link.value.shape != v.shape:
        raise ValueError("link does not come from an anchor of this q and v shape")
    flash.check_runnable(q.device)
    return torch.ops.sa_train.shared_forward(q, k, lse, link.dout, link.value, v, float(scale))


def decode_group_partial(q: Tensor, k_cache: Tensor, v_caches: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Per-layer partial outputs over past values, and the new token's own attention weight.

    q (B, H, 1, D); k_cache (B, Hkv, T, D) including the new token at T-1; v_caches (G, B, Hkv, T-1, D).
    Returns (partials (G, B, H, D) fp32, p_last (B, H) fp32); finish each layer with ``decode_finish``.
    """
    check_decode_inputs(q, k_cache, v_caches)
    flash.check_runnable(q.device)
    return torch.ops.sa_train.decode_group_partial(q, k_cache, v_caches, float(scale))
