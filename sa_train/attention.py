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
  with its anchor's q and k; a causally blocked P·V was no faster at T=256 (memory-bound). Without
  gradients (evaluation, prefill) there is no backward to share, and every layer reruns SDPA instead;
- ``triton``: fused kernels (``sa_train.kernels``) that keep P out of memory; the anchor hands its
  q, k, per-row log-sum-exp and one link per shared layer to the shared layers (ungrouped layers keep
  SDPA). Through the links the group's backward computes dq and dk once, in the anchor's backward.

Tensors are (batch, heads, time, head_dim); k and v may have fewer heads than q (GQA: query head h
reads kv head h // (n_heads / n_kv_heads)). ``bias`` (batch, 1, q_len, k_len), when given, is an
additive mask (0 or -inf) that replaces the plain causal one: prefill of left-padded prompts.

Decoding one token (``decode_anchor`` / ``decode_shared``) reads the static cache of
:mod:`sa_train.cache`: the anchor computes the new token's weights over its group's keys once, and every
layer of the group applies them to its own value cache. The PyTorch path covers the whole static cache
with the cache's additive mask (fixed shapes, so a step can be compiled or captured); the Triton path
is the grouped decode kernel over the written prefix, used when no row is padded (the kernel takes no
mask) and the step is not compiled (a compiled step keeps static shapes).
"""

from __future__ import annotations

import functools
import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from sa_train.config import ATTENTION_BACKENDS
from sa_train.errors import ConfigError

if TYPE_CHECKING:
    from sa_train.cache import KVCache
    from sa_train.kernels import Link

log = logging.getLogger(__name__)


@dataclass
class GroupWeights:
    """What an anchor hands to the shared layers of its group: P itself, or what rebuilds it."""

    probs: Tensor | None = None
    q: Tensor | None = None
    k: Tensor | None = None
    lse: Tensor | None = None
    links: list[Link] | None = None
    bias: Tensor | None = None
    partials: Tensor | None = None
    p_last: Tensor | None = None


class AttentionBackend(ABC):
    name: str

    @abstractmethod
    def anchor(
        self, q: Tensor, k: Tensor, v: Tensor, followers: int, bias: Tensor | None = None
    ) -> tuple[Tensor, GroupWeights | None]:
        """Causal attention of an anchor; with ``followers`` shared layers in its group also the
        weights they reuse."""

    @abstractmethod
    def shared(self, weights: GroupWeights, layer: int, v: Tensor) -> Tensor:
        """The output of the group's layer ``layer`` (1 = the first shared layer): its group's attention
        weights applied to its own values."""

    def decode_anchor(self, q: Tensor, keys: Tensor, values: Tensor, cache: KVCache) -> GroupWeights:
        """The new token's attention weights over the anchor's whole key cache (B, Hkv, max_len, D).

        ``q`` is (B, H, 1, D); the new key is already in the cache. Masked slots (padding, not yet
        written) get weight exactly 0 from the cache's -inf bias.
        """
        return GroupWeights(probs=decode_probs(q, keys, cache.bias, values.dtype))

    def decode_shared(self, weights: GroupWeights, layer: int, values: Tensor, v_new: Tensor) -> Tensor:
        """Output (B, H, 1, D) of the group's layer ``layer`` (0 = anchor) whose value cache
        ``values[layer]`` already holds ``v_new``."""
        assert weights.probs is not None
        return apply_decode_probs(weights.probs, values[layer])


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


def padded_causal_probs(q: Tensor, k: Tensor, bias: Tensor, dtype: torch.dtype) -> Tensor:
    """Like :func:`causal_probs` with a per-row additive mask ``bias`` (B, 1, Tq, Tk) instead."""
    batch, n_heads, q_len, head_dim = q.shape
    n_kv, k_len = k.shape[1], k.shape[2]
    scores = torch.matmul(q.reshape(batch, n_kv, -1, head_dim), k.transpose(-1, -2)) / math.sqrt(head_dim)
    scores = scores.view(batch, n_kv, n_heads // n_kv, q_len, k_len) + bias.unsqueeze(1)
    return scores.softmax(dim=-1, dtype=torch.float32).to(dtype).view(batch, n_heads, q_len, k_len)


def decode_probs(q: Tensor, keys: Tensor, bias: Tensor, dtype: torch.dtype) -> Tensor:
    """Weights (B, Hkv, H/Hkv, max_len) of one new query per row over a key cache, softmax in fp32.

    The query heads of a kv head are stacked, so one matmul reads each cached key once.
    """
    batch, head_dim = q.shape[0], q.shape[-1]
    scores = torch.matmul(q.reshape(batch, keys.shape[1], -1, head_dim), keys.transpose(-1, -2))
    scores = scores * (1.0 / math.sqrt(head_dim)) + bias
    return scores.softmax(dim=-1, dtype=torch.float32).to(dtype)


def apply_decode_probs(probs: Tensor, values: Tensor) -> Tensor:
    """(B, Hkv, H/Hkv, max_len) weights times a value cache (B, Hkv, max_len, D): (B, H, 1, D)."""
    out = torch.matmul(probs, values)
    return out.view(out.shape[0], -1, 1, out.shape[-1])


def apply_probs(probs: Tensor, v: Tensor) -> Tensor:
    """P·V with GQA: the query heads of one kv head are stacked along time, so v is never copied."""
    batch, n_heads, q_len, k_len = probs.shape
    n_kv = v.shape[1]
    out = probs.view(batch, n_kv, -1, k_len) @ v
    return out.view(batch, n_heads, q_len, v.shape[-1])


def _sdpa(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
    """Fused SDPA, causal (the queries being the last of the keys) or under an additive ``bias``."""
    causal = bias is None and q.shape[2] == k.shape[2]
    mask = bias
    if bias is None and not causal:
        mask = causal_mask(q.shape[2], k.shape[2], q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)


class ReferenceBackend(AttentionBackend):
    """The definition: P materialised in fp32 for every anchor."""

    name = "reference"

    def anchor(
        self, q: Tensor, k: Tensor, v: Tensor, followers: int, bias: Tensor | None = None
    ) -> tuple[Tensor, GroupWeights | None]:
        if bias is None:
            probs = causal_probs(q.float(), k.float(), torch.float32)
        else:
            probs = padded_causal_probs(q.float(), k.float(), bias.float(), torch.float32)
        return apply_probs(probs, v.float()).to(v.dtype), GroupWeights(probs=probs) if followers else None

    def shared(self, weights: GroupWeights, layer: int, v: Tensor) -> Tensor:
        assert weights.probs is not None
        return apply_probs(weights.probs, v.float()).to(v.dtype)

    def decode_anchor(self, q: Tensor, keys: Tensor, values: Tensor, cache: KVCache) -> GroupWeights:
        return GroupWeights(probs=decode_probs(q.float(), keys.float(), cache.bias.float(), torch.float32))

    def decode_shared(self, weights: GroupWeights, layer: int, values: Tensor, v_new: Tensor) -> Tensor:
        assert weights.probs is not None
        return apply_decode_probs(weights.probs, values[layer].float()).to(values.dtype)


class TorchBackend(AttentionBackend):
    """Fastest exact PyTorch path: SDPA for ungrouped layers, P materialised once per SA group."""

    name = "torch"

    def anchor(
        self, q: Tensor, k: Tensor, v: Tensor, followers: int, bias: Tensor | None = None
    ) -> tuple[Tensor, GroupWeights | None]:
        if not followers or not torch.is_grad_enabled():
            out = _sdpa(q, k, v, bias)
            return out, GroupWeights(q=q, k=k, bias=bias) if followers else None
        probs = causal_probs(q, k, v.dtype) if bias is None else padded_causal_probs(q, k, bias, v.dtype)
        return apply_probs(probs, v), GroupWeights(probs=probs)

    def shared(self, weights: GroupWeights, layer: int, v: Tensor) -> Tensor:
        """Without gradients (evaluation, prefill) every layer of a group reruns SDPA with its anchor's q
        and k: no T×T matrix is stored, and the causal half is skipped. On sa-tiny (CPU, batch 4) a
        960-token prefill takes 389 ms this way against 543 ms with P materialised (192 tokens: 53
        against 55 ms). Training keeps P: its backward then runs one softmax backward per group."""
        if weights.probs is None:
            assert weights.q is not None and weights.k is not None
            return _sdpa(weights.q, weights.k, v, weights.bias)
        return apply_probs(weights.probs, v)

    def decode_anchor(self, q: Tensor, keys: Tensor, values: Tensor, cache: KVCache) -> GroupWeights:
        """An ungrouped layer hands q and the mask on to SDPA: on dense-tiny (batch 4, 255 cached keys,
        1 CPU thread) a decode step takes 20.2 ms this way against 21.1 ms with P materialised."""
        if values.shape[0] == 1:
            return GroupWeights(q=q, k=keys, bias=cache.bias)
        return super().decode_anchor(q, keys, values, cache)

    def decode_shared(self, weights: GroupWeights, layer: int, values: Tensor, v_new: Tensor) -> Tensor:
        if weights.probs is None:
            assert weights.q is not None and weights.k is not None
            return _sdpa(weights.q, weights.k, values[layer], weights.bias)
        return super().decode_shared(weights, layer, values, v_new)


class TritonBackend(TorchBackend):
    """Fused kernels: the anchor keeps q, k and the row log-sum-exp; shared layers rebuild P in tiles.

    A layer whose group has no shared layers needs no log-sum-exp, so it keeps PyTorch's SDPA (flash
    attention on CUDA): the dense baseline runs the same kernel as any Llama. The kernels take no mask,
    so a padded prefill (``bias``) and decoding a padded batch take the PyTorch path.
    """

    name = "triton"

    def anchor(
        self, q: Tensor, k: Tensor, v: Tensor, followers: int, bias: Tensor | None = None
    ) -> tuple[Tensor, GroupWeights | None]:
        from sa_train import kernels

        if not followers or bias is not None:
            return super().anchor(q, k, v, followers, bias)
        out, lse, links = kernels.anchor_attention(q, k, v, 1.0 / math.sqrt(q.shape[-1]), followers)
        return out, GroupWeights(q=q, k=k, lse=lse, links=links)

    def decode_anchor(self, q: Tensor, keys: Tensor, values: Tensor, cache: KVCache) -> GroupWeights:
        """The grouped decode kernel over the written prefix: one launch serves every layer's values.

        A compiled step takes the PyTorch path over the whole static cache instead: the prefix grows
        every token, and a shape that changes would recompile the step each time.
        """
        from sa_train import kernels

        if cache.padded or torch.compiler.is_compiling():
            return super().decode_anchor(q, keys, values, cache)
        length = cache.length
        partials, p_last = kernels.decode_group_partial(
            q, keys[:, :, : length + 1], values[:, :, :, :length], 1.0 / math.sqrt(q.shape[-1])
        )
        return GroupWeights(partials=partials, p_last=p_last)

    def decode_shared(self, weights: GroupWeights, layer: int, values: Tensor, v_new: Tensor) -> Tensor:
        from sa_train import kernels

        if weights.partials is None or weights.p_last is None:
            return super().decode_shared(weights, layer, values, v_new)
        return kernels.decode_finish(weights.partials[layer], weights.p_last, v_new)

    def shared(self, weights: GroupWeights, layer: int, v: Tensor) -> Tensor:
        from sa_train import kernels

        if weights.lse is None:  # the anchor took the masked PyTorch path
            return super().shared(weights, layer, v)
        assert weights.q is not None and weights.k is not None and weights.links is not None
        link = weights.links[layer - 1]
        return kernels.shared_attention(
            weights.q, weights.k, weights.lse, link, v, 1.0 / math.sqrt(v.shape[-1])
        )


BACKENDS: dict[str, type[AttentionBackend]] = {
    cls.name: cls for cls in (ReferenceBackend, TorchBackend, TritonBackend)
}


@functools.cache
def get_backend(name: str, device_type: str, head_dim: int) -> AttentionBackend:
    """Resolve a configured backend for a device and head size; logged once per resolution, at INFO where
    there is a choice (CUDA) and at DEBUG on a CPU, whose only backend is PyTorch's (the line was noise in
    every command's output).

    'auto' picks the Triton kernels on CUDA when they can run this head size, PyTorch otherwise.
    """
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(
            f"model.config.attention_backend={name!r} is unknown; use one of {', '.join(ATTENTION_BACKENDS)}."
        )
    if name == "auto":
        name = "triton" if device_type == "cuda" and _kernels_can_run(head_dim) else "torch"
    elif name == "triton" and not _kernels_can_run(head_dim):
        raise ConfigError(
            "model.config.attention_backend='triton' needs the triton package, a CUDA device (or "
            "TRITON_INTERPRET=1 for tests) and a head size (d_model / n_heads) that is a power of two "
            f">= 16 (here {head_dim}); use attention_backend: auto or torch."
        )
    if device_type != "meta":  # a model on the meta device (shapes only) never computes attention
        level = logging.INFO if device_type == "cuda" else logging.DEBUG
        log.log(level, "shared attention on %s uses the %s backend", device_type, name)
    return BACKENDS[name]()


def _kernels_can_run(head_dim: int) -> bool:
    """Imported lazily: CPU runs never load triton."""
    from sa_train import kernels
    from sa_train.kernels.checks import head_dim_supported

    return kernels.is_available() and head_dim_supported(head_dim)
