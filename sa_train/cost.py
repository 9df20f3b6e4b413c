"""Inference and training cost from a config alone: FLOPs per token and KV-cache size.

Conventions (PaLM appendix B): a matmul of an (m, k) by a (k, n) matrix costs 2mkn FLOPs; training
costs three forward passes (forward, and backward for activations and for weights); attention scores
are counted over the full context of ``seq_len`` keys, or with ``causal=True`` over only those a causal
mask keeps (a mean context of (seq_len + 1) / 2, what flash kernels compute). Element-wise work
(norms, softmax, RoPE) is left out. Shared layers skip the Q/K projections and the QK^T scores:
that is the whole saving.
"""

from __future__ import annotations

from sa_train.config import SAConfig


def matmul_params(config: SAConfig) -> int:
    """Weights that take part in a matmul per token (embedding lookups excluded, LM head included)."""
    d, kv = config.d_model, config.n_kv_heads * config.head_dim
    assert config.ffn_hidden is not None
    per_layer = d * kv + d * d + 3 * d * config.ffn_hidden  # V, O, SwiGLU
    query_key = d * d + d * kv
    return config.n_layers * per_layer + len(config.groups) * query_key + d * config.vocab_size


def forward_flops_per_token(config: SAConfig, seq_len: int, causal: bool = False) -> float:
    """Forward FLOPs for one token at context ``seq_len``: projections, QK^T (anchors), P·V (all)."""
    context = (seq_len + 1) / 2 if causal else seq_len
    scores = 2 * context * config.d_model
    return 2 * matmul_params(config) + (len(config.groups) + config.n_layers) * scores


def training_flops_per_token(config: SAConfig, seq_len: int, causal: bool = False) -> float:
    return 3 * forward_flops_per_token(config, seq_len, causal)


def kv_cache_vectors_per_token(config: SAConfig) -> int:
    """Cached vectors per token: a value per layer and a key per anchor (2L for a dense model)."""
    return config.n_layers + len(config.groups)


def kv_cache_bytes_per_token(config: SAConfig, bytes_per_element: int = 2) -> int:
    return kv_cache_vectors_per_token(config) * config.n_kv_heads * config.head_dim * bytes_per_element
