"""SAModel: a Llama-style decoder whose layers share attention weights within declared groups.

Each group of consecutive layers has one anchor, which owns Q, K, V and O projections and computes
P = softmax(QK^T/sqrt(d)); the group's shared layers own only V and O and apply the anchor's P to
their own values. Every layer keeps its norms and MLP. With all groups of size one this is exactly
a Llama (RMSNorm, RoPE in the rotate-half convention, SwiGLU, GQA), weight for weight.

This module depends on torch alone, so exported checkpoints, kernels and tools can all reuse it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sa_train.attention import AttentionBackend, GroupWeights, get_backend
from sa_train.config import SAConfig
from sa_train.errors import CheckpointError, ConfigError


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
        return self.cos[positions], self.sin[positions]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class Attention(nn.Module):
    """Self-attention of one layer. An anchor projects Q, K, V; a shared layer only V.

    A shared layer has no Q/K parameters at all: its attention weights come from its group's anchor,
    passed in as ``weights``. Gradients of every layer thus reach the anchor's Q/K projections.
    """

    def __init__(self, config: SAConfig, is_anchor: bool, shares: bool) -> None:
        super().__init__()
        self.is_anchor = is_anchor
        self.shares = shares
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        kv_dim = config.n_kv_heads * config.head_dim
        if is_anchor:
            self.q_proj = nn.Linear(config.d_model, config.d_model, bias=False)
            self.k_proj = nn.Linear(config.d_model, kv_dim, bias=False)
        self.v_proj = nn.Linear(config.d_model, kv_dim, bias=False)
        self.o_proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], weights: GroupWeights | None, backend: AttentionBackend
    ) -> tuple[Tensor, GroupWeights | None]:
        batch, seq_len, _ = x.shape
        v = self.v_proj(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.is_anchor:
            q = self.q_proj(x).view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)
            k = self.k_proj(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            out, weights = backend.anchor(q, k, v, self.shares)
        else:
            assert weights is not None, "a shared layer needs its anchor's attention weights"
            out = backend.shared(weights, v)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq_len, -1)), weights


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: SAConfig, is_anchor: bool, shares: bool) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config, is_anchor, shares)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        assert config.ffn_hidden is not None
        self.mlp = SwiGLU(config.d_model, config.ffn_hidden)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], weights: GroupWeights | None, backend: AttentionBackend
    ) -> tuple[Tensor, GroupWeights | None]:
        attn_out, weights = self.attn(self.attn_norm(x), rope, weights, backend)
        x = x + attn_out
        return x + self.mlp(self.mlp_norm(x)), weights


class SAModel(nn.Module):
    """The decoder: token embedding, the layers of ``config.groups`` in order, final norm, LM head."""

    def __init__(self, config: SAConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(
            Block(config, is_anchor=(layer == group[0]), shares=len(group) > 1)
            for group in config.groups
            for layer in group
        )
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.reset_parameters()

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

    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits (B, T, vocab) for token ids (B, T)."""
        seq_len = input_ids.shape[1]
        if seq_len > self.config.max_seq_len:
            raise ConfigError(
                f"input of {seq_len} tokens exceeds model.max_seq_len={self.config.max_seq_len}; shorten "
                "the sequence (data.seq_len) or build the model with a larger max_seq_len."
            )
        rope = self.rope(torch.arange(seq_len, device=input_ids.device))
        backend = get_backend(self.config.attention_backend, input_ids.device.type, self.config.head_dim)
        x = self.embed(input_ids)
        weights: GroupWeights | None = None
        for block in self.layers:
            x, weights = block(x, rope, weights, backend)
        return self.lm_head(self.norm(x))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> SAModel:
        """Load the model of a sa_train checkpoint (:mod:`sa_train.checkpoint`), in eval mode."""
        from sa_train.checkpoint import read_checkpoint

        saved = read_checkpoint(path, map_location)
        model = cls(saved.config)
        missing, unexpected = model.load_state_dict(saved.state_dict, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{saved.path}: its weights do not match the architecture it declares (missing "
                f"{_first(missing)}, unexpected {_first(unexpected)}). The file was edited or written by "
                "another version of sa_train; use a checkpoint written by `python -m sa_train fit`."
            )
        return model.eval()


def _first(names: list[str], count: int = 3) -> str:
    if not names:
        return "none"
    return ", ".join(names[:count]) + (f" and {len(names) - count} more" if len(names) > count else "")
