"""Exact shared-attention paths behind one interface.

The semantics are the materialised-softmax math: an anchor computes P = softmax(QK^T·scale) (causal)
and returns P·V; every shared layer of its group returns P·V_l with its own V_l. Backends differ only
in how they compute this:

- ``reference``: P materialised in fp32 with an explicit mask, the definition (tests use it);
- ``torch``: the fastest exact PyTorch path, chosen by measurement on CPU
  (``scripts/bench_cpu_training.py``): a layer whose group has no shared layers uses fused SDPA; an
  anchor with followers materialises P once and every layer of the group multiplies it with its V.
  Autograd then sums the group's dP into one softmax backward and one QK^T backward, so a group of g
  costs one score matmul forward and backward instead of g. On the tiny configs (2 CPU threads) SA
  trains 1.14x faster than dense this way, against 1.09-1.10x when every shared layer reruns SDPA
  with its anchor's q and k; a causally blocked P·V was no faster at T=256 (memory-bound);
- ``triton``: fused kernels (``sa_train.kernels``) that keep P out of memory; the anchor hands its
  q, k and per-row log-sum-exp to the shared layers (ungrouped layers keep SDPA).

Tensors are (batch, heads, time, head_dim); k and v may have fewer heads than q (GQA: query head h
reads kv head h // (n_heads / n_kv_heads)).
"""

from __future__ import annotations

import functools
import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sa_train.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class GroupWeights:
    """What an anchor hands to the shared layers of its group: P itself, or what rebuilds it."""

    probs: Tensor | None = None
    q: Tensor | None = None
    k: Tensor | None = None
    lse: Tensor | None = None


class AttentionBackend(ABC):
    name: str

    @abstractmethod
    def anchor(self, q: Tensor, k: Tensor, v: Tensor, share: bool) -> tuple[Tensor, GroupWeights | None]:
        """Causal attention of an anchor; with ``share`` also the weights its group's layers reuse."""

    @abstractmethod
    def shared(self, weights: GroupWeights, v: Tensor) -> Tensor:
        """A shared layer's output: its group's attention weights applied to its own values."""


def causal_mask(q_len: int, k_len: int, device: torch.device) -> Tensor:
    """True where a query may attend; queries are the last ``q_len`` positions of ``k_len``."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)


def causal_probs(q: Tensor, k: Tensor, dtype: torch.dtype) -> Tensor:
    """P = softmax(QK^T / sqrt(d)) with the causal mask, softmax in fp32, returned in ``dtype``.

    The query heads that share a kv head are stacked along time, (B·Hkv, rep·Tq, D), so one batched
    matmul serves them all without expanding k; the mask enters as an additive bias of the same
    ``baddbmm``, whose backward is half the cost of a separate scale, mask and fill.
    """
    batch, n_heads, q_len, head_dim = q.shape
    n_kv, k_len = k.shape[1], k.shape[2]
    bias = torch.zeros(q_len, k_len, dtype=q.dtype, device=q.device)
    bias = bias.masked_fill_(~causal_mask(q_len, k_len, q.device), float("-inf")).repeat(n_heads // n_kv, 1)
    scores = torch.baddbmm(
        bias,
        q.reshape(batch * n_kv, -1, head_dim),
        k.reshape(batch * n_kv, k_len, head_dim).transpose(1, 2),
        alpha=1.0 / math.sqrt(head_dim),
    )
    return scores.softmax(dim=-1, dtype=torch.float32).to(dtype).view(batch, n_heads, q_len, k_len)


def apply_probs(probs: Tensor, v: Tensor) -> Tensor:
    """P·V with GQA: the query heads of one kv head are stacked along time, so v is never copied."""
    batch, n_heads, q_len, k_len = probs.shape
    n_kv = v.shape[1]
    out = probs.view(batch, n_kv, -1, k_len) @ v
    return out.view(batch, n_heads, q_len, v.shape[-1])


class ReferenceBackend(AttentionBackend):
    """The definition: P materialised in fp32 for every anchor."""

    name = "reference"

    def anchor(self, q: Tensor, k: Tensor, v: Tensor, share: bool) -> tuple[Tensor, GroupWeights | None]:
        probs = causal_probs(q.float(), k.float(), torch.float32)
        return apply_probs(probs, v.float()).to(v.dtype), GroupWeights(probs=probs) if share else None

    def shared(self, weights: GroupWeights, v: Tensor) -> Tensor:
        assert weights.probs is not None
        return apply_probs(weights.probs, v.float()).to(v.dtype)


class TorchBackend(AttentionBackend):
    """Fastest exact PyTorch path: SDPA for ungrouped layers, P materialised once per SA group."""

    name = "torch"

    def anchor(self, q: Tensor, k: Tensor, v: Tensor, share: bool) -> tuple[Tensor, GroupWeights | None]:
        if not share:
            causal = q.shape[2] == k.shape[2]
            mask = None if causal else causal_mask(q.shape[2], k.shape[2], q.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
            return out, None
        probs = causal_probs(q, k, v.dtype)
        return apply_probs(probs, v), GroupWeights(probs=probs)

    def shared(self, weights: GroupWeights, v: Tensor) -> Tensor:
        assert weights.probs is not None
        return apply_probs(weights.probs, v)


class TritonBackend(TorchBackend):
    """Fused kernels: the anchor keeps q, k and the row log-sum-exp; shared layers rebuild P in tiles.

    A layer whose group has no shared layers needs no log-sum-exp, so it keeps PyTorch's SDPA (flash
    attention on CUDA): the dense baseline runs the same kernel as any Llama.
    """

    name = "triton"

    def anchor(self, q: Tensor, k: Tensor, v: Tensor, share: bool) -> tuple[Tensor, GroupWeights | None]:
        from sa_train import kernels

        if not share:
            return super().anchor(q, k, v, share)
        out, lse = kernels.anchor_attention(q, k, v, 1.0 / math.sqrt(q.shape[-1]))
        return out, GroupWeights(q=q, k=k, lse=lse)

    def shared(self, weights: GroupWeights, v: Tensor) -> Tensor:
        from sa_train import kernels

        assert weights.q is not None and weights.k is not None and weights.lse is not None
        return kernels.shared_attention(weights.q, weights.k, weights.lse, v, 1.0 / math.sqrt(v.shape[-1]))


BACKENDS: dict[str, type[AttentionBackend]] = {
    cls.name: cls for cls in (ReferenceBackend, TorchBackend, TritonBackend)
}


@functools.cache
def get_backend(name: str, device_type: str, head_dim: int) -> AttentionBackend:
    """Resolve a configured backend for a device and head size; logged once per resolution.

    'auto' picks the Triton kernels on CUDA when they can run this head size, PyTorch otherwise.
    """
    if name not in ("auto", *BACKENDS):
        raise ConfigError(
            f"model.config.attention_backend={name!r} is unknown; use one of auto, {', '.join(BACKENDS)}."
        )
    if name == "auto":
        name = "triton" if device_type == "cuda" and _kernels_can_run(head_dim) else "torch"
    elif name == "triton" and not _kernels_can_run(head_dim):
        raise ConfigError(
            "model.config.attention_backend='triton' needs the triton package, a CUDA device (or "
            "TRITON_INTERPRET=1 for tests) and a head size (d_model / n_heads) that is a power of two "
            f">= 16 (here {head_dim}); use attention_backend: auto or torch."
        )
    log.info("shared attention on %s uses the %s backend", device_type, name)
    return BACKENDS[name]()


def _kernels_can_run(head_dim: int) -> bool:
    """Imported lazily: CPU runs never load triton."""
    from sa_train import kernels
    from sa_train.kernels.checks import head_dim_supported

    return kernels.is_available() and head_dim_supported(head_dim)
