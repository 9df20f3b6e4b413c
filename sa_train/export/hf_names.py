"""The Hugging Face names of sa_train's weights and config fields (Llama's, for dense and SA exports alike).

An SA export keeps Llama's names so that a dense export, an SA export and the parity test against
``LlamaForCausalLM`` read one table; shared layers simply have no ``q_proj``/``k_proj`` entries.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from sa_train.config import SAConfig
from sa_train.errors import CheckpointError

# (sa_train pattern, Hugging Face replacement); every weight of SAModel matches exactly one pattern.
WEIGHT_NAMES: tuple[tuple[str, str], ...] = (
    (r"embed\.weight", "model.embed_tokens.weight"),
    (r"layers\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"layers\.(\d+)\.mlp_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"layers\.(\d+)\.attn\.([qkvo])_proj\.weight", r"model.layers.\1.self_attn.\2_proj.weight"),
    (r"layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"model.layers.\1.mlp.\2_proj.weight"),
    (r"norm\.weight", "model.norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
)


def hf_weight_name(name: str) -> str:
    """The Hugging Face name of one SAModel weight; CheckpointError for a name the table does not know."""
    for pattern, replacement in WEIGHT_NAMES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, replacement, name)
    raise CheckpointError(
        f"the checkpoint holds a weight {name!r} that SAModel does not define, so it has no Hugging Face "
        "name. The file was edited or written by another version of sa_train; export a checkpoint written by "
        "`python -m sa_train fit`."
    )


def to_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAModel's state dict under Hugging Face names (the tensors themselves are not copied)."""
    return {hf_weight_name(name): tensor for name, tensor in state_dict.items()}


def hf_config_fields(config: SAConfig) -> dict[str, Any]:
    """The ``LlamaConfig`` fields that describe ``config`` (the SA config adds only its groups)."""
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
