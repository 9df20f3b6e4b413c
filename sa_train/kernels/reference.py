"""Materialised-P PyTorch references (fp32 math) that define what the Triton kernels must compute."""

import torch
from torch import Tensor


def _expand_kv(x: Tensor, num_heads: int) -> Tensor:
    """Repeat kv heads so query head h reads kv head h // (H // Hkv), as in the kernels."""
    return x.repeat_interleave(num_heads // x.shape[1], dim=1)


def _causal_scores(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """fp32 scores with future positions at -inf; q and k have the same length."""
    s = torch.matmul(q.float(), _expand_kv(k, q.shape[1]).float().transpose(-1, -2)) * scale
    t = q.shape[2]
    future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    return s.masked_fill(future, float("-inf"))


def reference_anchor(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Causal softmax attention; returns (out in q.dtype, lse fp32 natural log)."""
    s = _causal_scores(q, k, scale)
    lse = torch.logsumexp(s, dim=-1)
    out = torch.matmul(torch.exp(s - lse.unsqueeze(-1)), _expand_kv(v, q.shape[1]).float())
    return out.to(q.dtype), lse


def reference_shared(q: Tensor, k: Tensor, lse: Tensor, v: Tensor, scale: float) -> Tensor:
    """O = exp(qk^T·scale − lse)·v, differentiable in q, k, lse and v.

    Behind :func:`reference_anchor`'s (differentiable) lse this is exactly P·v with the group's softmax:
    the gradient through lse supplies the softmax's normalisation term.
    """
    s = _causal_scores(q, k, scale)
    out = torch.matmul(torch.exp(s - lse.float().unsqueeze(-1)), _expand_kv(v, q.shape[1]).float())
    return out.to(q.dtype)


def reference_decode_group_partial(
    q: Tensor, k_cache: Tensor, v_caches: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """Softmax of the new query over all T keys; past values weighted per layer, new key's weight apart."""
    num_heads = q.shape[1]
    s = torch.matmul(q.float(), _expand_kv(k_cache, num_heads).float().transpose(-1, -2)) * scale
    p = torch.softmax(s, dim=-1)[:, :, 0]
    past = p[..., :-1]
    v = v_caches.float().repeat_interleave(num_heads // v_caches.shape[2], dim=2)
    partials = torch.einsum("bht,gbhtd->gbhd", past, v)
    return partials, p[..., -1].contiguous()
