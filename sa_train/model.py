"""SAModel: a Llama-style decoder whose layers share attention weights within declared groups.

Each group of consecutive layers has one anchor, which owns Q, K, V and O projections and computes
P = softmax(QK^T/sqrt(d)); the group's shared layers own only V and O and apply the anchor's P to
their own values. Every layer keeps its norms and MLP. With all groups of size one this is exactly
a Llama (RMSNorm, RoPE in the rotate-half convention, SwiGLU, GQA), weight for weight.

At inference, :meth:`SAModel.prefill` runs (left-padded) prompts through the training path into a
static :class:`~sa_train.cache.KVCache` and :meth:`SAModel.decode_step` adds one token per row;
:meth:`SAModel.generate` (:mod:`sa_train.generation`) drives both.

This module depends on torch alone, so exported checkpoints, kernels and tools can all reuse it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sa_train.attention import AttentionBackend, get_backend
from sa_train.cache import KVCache
from sa_train.config import SAConfig
from sa_train.embedding import TokenEmbedding
from sa_train.errors import CheckpointError, ConfigError
from sa_train.generation import Prompts, Sampling, generate

if TYPE_CHECKING:
    from sa_train.checkpoint import ModelCheckpoint


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 so bf16 activations do not lose the scale."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class RotaryEmbedding(nn.Module):
    """RoPE tables for every position up to max_seq_len (rotate-half layout, as in HF Llama)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin (..., 1, T, D) for positions (B, T), broadcasting over the heads of (B, H, T, D)."""
        return self.cos[positions].unsqueeze(-3), self.sin[positions].unsqueeze(-3)

    def prefix(self, seq_len: int) -> tuple[Tensor, Tensor]:
        """cos and sin (T, D) of positions 0..seq_len-1: a slice, no gather."""
        return self.cos[:seq_len], self.sin[:seq_len]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class Attention(nn.Module):
    """The projections of one layer's attention. An anchor projects Q, K, V; a shared layer only V.

    A shared layer has no Q/K parameters at all: its attention weights come from its group's anchor
    (see :class:`LayerGroup`). Gradients of every layer thus reach the anchor's Q/K projections.
    """

    def __init__(self, config: SAConfig, is_anchor: bool) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        kv_dim = config.n_kv_heads * config.head_dim
        if is_anchor:
            self.q_proj = nn.Linear(config.d_model, config.d_model, bias=False)
            self.k_proj = nn.Linear(config.d_model, kv_dim, bias=False)
        self.v_proj = nn.Linear(config.d_model, kv_dim, bias=False)
        self.o_proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def _heads(self, x: Tensor, n_heads: int) -> Tensor:
        return x.view(x.shape[0], x.shape[1], n_heads, self.head_dim).transpose(1, 2)

    def values(self, h: Tensor) -> Tensor:
        """(B, Hkv, T, D) values of normed input h (B, T, d_model)."""
        return self._heads(self.v_proj(h), self.n_kv_heads)

    def queries_keys(self, h: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Rotated queries (B, H, T, D) and keys (B, Hkv, T, D) of an anchor."""
        q = self._heads(self.q_proj(h), self.n_heads)
        k = self._heads(self.k_proj(h), self.n_kv_heads)
        return apply_rope(q, *rope), apply_rope(k, *rope)

    def output(self, out: Tensor) -> Tensor:
        """Heads (B, H, T, D) back to the residual stream through o_proj."""
        return self.o_proj(out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x)); its group runs the attention."""

    def __init__(self, config: SAConfig, is_anchor: bool) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config, is_anchor)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        assert config.ffn_hidden is not None
        self.mlp = SwiGLU(config.d_model, config.ffn_hidden)

    def forward(self, x: Tensor, attn_heads: Tensor) -> Tensor:
        """The rest of the layer once its group has computed its attention heads (B, H, T, D)."""
        x = x + self.attn.output(attn_heads)
        return x + self.mlp(self.mlp_norm(x))


class LayerGroup:
    """One SA group at run time: its anchor and shared blocks, what the anchor hands them, its cache.

    A plain object, not a Module, so the blocks stay registered once under the flat ``layers.{i}``
    names that checkpoints and the HF parity test rely on. ``index`` picks the group's slice of a
    :class:`~sa_train.cache.KVCache`.
    """

    def __init__(self, index: int, blocks: list[Block]) -> None:
        self.index = index
        self.anchor, self.followers = blocks[0], blocks[1:]

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        backend: AttentionBackend,
        bias: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """The group's layers over a whole sequence (training, evaluation and prefill).

        With ``cache``, the keys and values of the T tokens are written to its slots 0..T-1.
        """
        h = self.anchor.attn_norm(x)
        q, k = self.anchor.attn.queries_keys(h, rope)
        v = self.anchor.attn.values(h)
        slot = cache.groups[self.index] if cache is not None else None
        if slot is not None:
            slot.write_prefix(0, v, k)
        out, weights = backend.anchor(q, k, v, len(self.followers), bias)
        x = self.anchor(x, out)
        for layer, block in enumerate(self.followers, start=1):
            assert weights is not None
            v = block.attn.values(block.attn_norm(x))
            if slot is not None:
                slot.write_prefix(layer, v)
            x = block(x, backend.shared(weights, layer, v))
        return x

    def decode(
        self, x: Tensor, rope: tuple[Tensor, Tensor], backend: AttentionBackend, cache: KVCache
    ) -> Tensor:
        """One new token per row (x is (B, 1, d_model)): written to the cache's current slot, then
        the anchor's weights over the cache are computed once and applied to every layer's values."""
        slot = cache.groups[self.index]
        h = self.anchor.attn_norm(x)
        q, k = self.anchor.attn.queries_keys(h, rope)
        v = self.anchor.attn.values(h)
        slot.write_step(0, cache.slot, v, k)
        weights = backend.decode_anchor(q, slot.keys, slot.values, cache)
        x = self.anchor(x, backend.decode_shared(weights, 0, slot.values, v))
        for layer, block in enumerate(self.followers, start=1):
            v = block.attn.values(block.attn_norm(x))
            slot.write_step(layer, cache.slot, v)
            x = block(x, backend.decode_shared(weights, layer, slot.values, v))
        return x


class SAModel(nn.Module):
    """The decoder: token embedding, the layers of ``config.groups`` in order, final norm, LM head.

    The attention backend is resolved when the model is built and again whenever it moves (``.to``,
    ``.cuda``, ``.half``), never per forward: the forward stays free of Python lookups, so
    ``torch.compile(fullgraph=True)`` traces it whole.
    """

    def __init__(self, config: SAConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = TokenEmbedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(
            Block(config, is_anchor=(layer == group[0])) for group in config.groups for layer in group
        )
        self.groups = [
            LayerGroup(index, [self.layers[layer] for layer in group])
            for index, group in enumerate(config.groups)
        ]
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.reset_parameters()
        self.backend = self._resolve_backend()
        # Training-time memory trade, not architecture: recompute each group's activations in backward.
        self.checkpoint_groups = False
        self._compiled_decode_step: Callable[[Tensor, KVCache], Tensor] | None = None

    def _resolve_backend(self) -> AttentionBackend:
        device_type = self.embed.weight.device.type
        return get_backend(self.config.attention_backend, device_type, self.config.head_dim)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """Every device or dtype move goes through here: re-resolve the backend for the new device (and
        drop a compiled decode step, which was compiled for the old one)."""
        module = super()._apply(fn, recurse)
        self.backend = self._resolve_backend()
        self._compiled_decode_step = None
        return module

    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere; residual outputs scaled by 1/sqrt(2·n_layers)."""
        std = self.config.init_std
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(param)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, std=std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(param, std=std)

    def _check_length(self, seq_len: int) -> None:
        if seq_len > self.config.max_seq_len:
            raise ConfigError(
                f"input of {seq_len} tokens exceeds model.max_seq_len={self.config.max_seq_len}; shorten "
                "the sequence (data.seq_len) or build the model with a larger max_seq_len."
            )

    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits (B, T, vocab) for token ids (B, T)."""
        self._check_length(input_ids.shape[1])
        rope = self.rope.prefix(input_ids.shape[1])
        x = self.embed(input_ids)
        for group in self.groups:
            if self.checkpoint_groups and torch.is_grad_enabled():
                # A group is the unit: its shared layers need the anchor's attention weights anyway.
                x = checkpoint(group.forward, x, rope, self.backend, use_reentrant=False)
            else:
                x = group.forward(x, rope, self.backend)
        return self.lm_head(self.norm(x))

    def prefill(self, input_ids: Tensor, prompt_lengths: Sequence[int], cache: KVCache) -> Tensor:
        """Run left-padded prompts (B, T) through the training path, filling ``cache``.

        ``prompt_lengths`` gives each row's real length (its last tokens). Returns the logits (B, vocab)
        of each prompt's last token; the cache is then ready for :meth:`decode_step`.
        """
        self._check_length(input_ids.shape[1])
        positions, bias = cache.start(prompt_lengths, input_ids.shape[1])
        rope = self.rope.prefix(input_ids.shape[1]) if bias is None else self.rope(positions)
        x = self.embed(input_ids)
        for group in self.groups:
            x = group.forward(x, rope, self.backend, bias, cache)
        return self.lm_head(self.norm(x[:, -1]))

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty cache on the model's device, in the dtype its keys and values are computed in.

        That is autocast's dtype while autocast is on for the device (a bf16-mixed or 16-mixed run
        validating, or decoding under ``torch.autocast``), else the weights' (fp32, or DeepSpeed's bf16):
        a cache in the weights' dtype under autocast made a bf16-mixed run crash at its first decode.
        """
        weight = self.embed.weight
        kind = weight.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype
        return KVCache(self.config, batch_size, max_len, dtype, weight.device)

    def decode_step(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """Logits (B, vocab) after one new token per row (B,); its keys and values go to the cache.

        The cache is read and written in place and every shape is fixed by the cache, so a compiled
        step is one graph for all tokens (on GPU, one CUDA graph). Call ``cache.advance()`` after it.
        """
        rope = self.rope(cache.positions[:, None])
        x = self.embed(tokens[:, None])
        for group in self.groups:
            x = group.decode(x, rope, self.backend, cache)
        return self.lm_head(self.norm(x[:, 0]))

    def compiled_decode_step(self) -> Callable[[Tensor, KVCache], Tensor]:
        """:meth:`decode_step` compiled once for this model: one graph per cache shape, replayed for
        every token (on CUDA captured as a CUDA graph). The first call compiles (seconds to a minute);
        on sa-tiny (CPU, batch 4, 255 slots) a step then takes 1.6 ms against 2.7 ms eager.
        """
        if self._compiled_decode_step is None:
            mode = "reduce-overhead" if self.embed.weight.is_cuda else None
            self._compiled_decode_step = torch.compile(self.decode_step, fullgraph=True, mode=mode)
        return self._compiled_decode_step

    def generate(
        self,
        prompts: Prompts,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        eos_token_id: int | None = None,
        compile: bool = False,
    ) -> list[list[int]]:
        """New tokens for each prompt (token ids: a list per prompt, or a (B, T) tensor).

        Greedy by default; ``temperature`` > 0 samples, optionally among the ``top_k`` most likely
        tokens and the nucleus of mass ``top_p``, repeatably with ``seed``. A row stops after
        ``eos_token_id``; all stop after ``max_new_tokens``. ``compile`` decodes with
        :meth:`compiled_decode_step`, worth its compile time for long or repeated generation. See
        :mod:`sa_train.generation`.
        """
        sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        return generate(self, prompts, max_new_tokens, sampling, eos_token_id, compile)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> SAModel:
        """Load the model of a sa_train checkpoint (:mod:`sa_train.checkpoint`), in eval mode."""
        from sa_train.checkpoint import read_checkpoint

        return cls.from_saved(read_checkpoint(path, map_location))

    @classmethod
    def from_saved(cls, saved: ModelCheckpoint) -> SAModel:
        """The model of a checkpoint already read with :func:`sa_train.checkpoint.read_checkpoint`."""
        model = cls(saved.config)
        missing, unexpected = model.load_state_dict(saved.state_dict, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{saved.path}: its weights do not match the architecture it declares (missing "
                f"{_first(missing)}, unexpected {_first(unexpected)}). The file was edited or written by "
                "another version of sa_train; use a checkpoint written by `python -m sa_train fit`."
            )
        return model.eval()


def next_token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits`` (batch, time, vocab) against the next tokens ``targets`` (batch,
    time), in fp32 whatever the logits' dtype: training, perplexity and the benchmarks all score with it."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def _first(names: list[str], count: int = 3) -> str:
    if not names:
        return "none"
    return ", ".join(names[:count]) + (f" and {len(names) - count} more" if len(names) > count else "")
