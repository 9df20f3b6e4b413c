"""Inference and training cost from a config alone: FLOPs per token and KV-cache size.

Conventions (PaLM appendix B): a matmul of an (m, k) by a (k, n) matrix costs 2mkn FLOPs; training
costs three forward passes (forward, and backward for activations and for weights); attention scores
are counted over the full context of ``seq_len`` keys, or with ``causal=True`` over only those a causal
mask keeps (a mean context of (seq_len + 1) / 2, what flash kernels compute). Element-wise work
(norms, softmax, RoPE) is left out. Shared layers skip the Q/K projections and the QK^T scores:
that is the whole saving.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sa_train.config import SAConfig
from sa_train.dtypes import bytes_per_element


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


def kv_fraction(n_layers: int, anchors: int) -> float:
    """An SA model's KV cache as a fraction of its dense twin's: (L + anchors) / 2L."""
    return (n_layers + anchors) / (2 * n_layers)


def kv_cache_bytes_per_token(config: SAConfig, bytes_per_element: int = 2) -> int:
    """Cache bytes per token: each cached vector holds ``n_kv_heads · head_dim`` elements (GQA-aware)."""
    assert config.n_kv_heads is not None
    return kv_cache_vectors_per_token(config) * config.n_kv_heads * config.head_dim * bytes_per_element


def parameter_count(config: SAConfig) -> int:
    """Every parameter of :class:`SAModel`: matmul weights, the embedding (unless tied) and the norms."""
    embedding = 0 if config.tie_embeddings else config.vocab_size * config.d_model
    norms = (2 * config.n_layers + 1) * config.d_model
    return matmul_params(config) + embedding + norms


def non_embedding_parameter_count(config: SAConfig) -> int:
    """Parameters without the embedding and the LM head (the usual scaling-law count)."""
    tied_or_not = 1 if config.tie_embeddings else 2
    return parameter_count(config) - tied_or_not * config.vocab_size * config.d_model


def decode_flops_per_token(config: SAConfig, context: int) -> float:
    """Forward FLOPs of one generated token that attends to ``context`` cached positions."""
    return forward_flops_per_token(config, context)


def prefill_flops(config: SAConfig, prompt_len: int) -> float:
    """Forward FLOPs of a prompt of ``prompt_len`` tokens (causal attention, as flash kernels compute)."""
    return prompt_len * forward_flops_per_token(config, prompt_len, causal=True)


def dense_twin(config: SAConfig) -> SAConfig:
    """The same shape with every layer its own group: the model SA is measured against."""
    return dataclasses.replace(config, sa_groups="dense")


def cost_summary(config: SAConfig, seq_len: int, context: int, bytes_per_element: int) -> dict[str, Any]:
    """Analytic costs of one config (see the module docstring for the conventions)."""
    kv_per_token = kv_cache_bytes_per_token(config, bytes_per_element)
    return {
        "n_layers": config.n_layers,
        "n_anchors": len(config.groups),
        "params": parameter_count(config),
        "non_embedding_params": non_embedding_parameter_count(config),
        "train_flops_per_token": training_flops_per_token(config, seq_len, causal=True),
        "prefill_flops": prefill_flops(config, seq_len),
        "decode_flops_per_token": decode_flops_per_token(config, context),
        "kv_cache_vectors_per_token": kv_cache_vectors_per_token(config),
        "kv_cache_bytes_per_token": kv_per_token,
        "kv_cache_bytes_full_context": kv_per_token * config.max_seq_len,
    }


def cost_report(
    config: SAConfig, seq_len: int, context: int | None = None, dtype: str = "bf16"
) -> dict[str, Any]:
    """Costs of ``config`` and of its dense twin, with the savings as ratios (dense / SA; > 1 is a saving).

    ``seq_len`` is the training (and prefill) length, ``context`` the cached positions a decoded token
    attends to (default ``config.max_seq_len``), ``dtype`` the cache element type (fp32, bf16, fp16).
    """
    context = config.max_seq_len if context is None else context
    size = bytes_per_element(dtype)
    sa = cost_summary(config, seq_len, context, size)
    dense = cost_summary(dense_twin(config), seq_len, context, size)
    ratios = ("params", "train_flops_per_token", "prefill_flops", "decode_flops_per_token")
    return {
        "settings": {"seq_len": seq_len, "context": context, "dtype": dtype},
        "sa": sa,
        "dense_twin": dense,
        "savings": {
            **{f"{key}_dense_over_sa": dense[key] / sa[key] for key in ratios},
            "kv_cache_sa_over_dense": sa["kv_cache_bytes_per_token"] / dense["kv_cache_bytes_per_token"],
        },
    }


def cost_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The ``cost/*`` metrics of a :func:`cost_report` that ``InferenceCost`` logs."""
    sa, dense = report["sa"], report["dense_twin"]
    return {
        "cost/params": sa["params"],
        "cost/kv_bytes_per_token": sa["kv_cache_bytes_per_token"],
        "cost/kv_vs_dense": report["savings"]["kv_cache_sa_over_dense"],
        "cost/decode_flops_per_token": sa["decode_flops_per_token"],
        "cost/decode_flops_vs_dense": sa["decode_flops_per_token"] / dense["decode_flops_per_token"],
        "cost/train_flops_per_token": sa["train_flops_per_token"],
        "cost/train_flops_vs_dense": sa["train_flops_per_token"] / dense["train_flops_per_token"],
    }


def cost_lines(config: SAConfig, report: dict[str, Any]) -> str:
    """The model and inference-cost lines a run prints for ``config`` (its :func:`cost_report`)."""
    sa, metrics = report["sa"], cost_metrics(report)
    return (
        f"{sa['params']:,} parameters ({sa['non_embedding_params']:,} without embeddings), "
        f"{config.n_layers} layers in {len(config.groups)} attention groups {config.groups}.\n"
        f"Inference cost: KV cache {sa['kv_cache_vectors_per_token']} vectors/token "
        f"({sa['kv_cache_bytes_per_token']} B in {report['settings']['dtype']}, "
        f"{metrics['cost/kv_vs_dense']:.3f} of the dense twin); "
        f"decode {metrics['cost/decode_flops_vs_dense']:.3f} and training "
        f"{metrics['cost/train_flops_vs_dense']:.3f} of the dense twin's FLOPs per token."
    )
