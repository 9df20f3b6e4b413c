"""The Hugging Face names of sa_train's weights and config fields (Llama's, for dense and SA exports alike),
in both directions: export writes through them and ``convert --hf`` reads a Llama folder through them.

An SA export keeps Llama's names so that a dense export, an SA export and the parity test against
``LlamaForCausalLM`` read one table; shared layers simply have no ``q_proj``/``k_proj`` entries. The table
holds templates rather than one-way regular expressions so that the same rows rename either way.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import torch

from sa_train.config import SAConfig
from sa_train.errors import CheckpointError, ConfigError

# (sa_train name, Hugging Face name); every weight of SAModel matches exactly one row.
WEIGHT_NAMES: tuple[tuple[str, str], ...] = (
    ("embed.weight", "model.embed_tokens.weight"),
    ("layers.{layer}.attn_norm.weight", "model.layers.{layer}.input_layernorm.weight"),
    ("layers.{layer}.mlp_norm.weight", "model.layers.{layer}.post_attention_layernorm.weight"),
    ("layers.{layer}.attn.{attn}_proj.weight", "model.layers.{layer}.self_attn.{attn}_proj.weight"),
    ("layers.{layer}.mlp.{mlp}_proj.weight", "model.layers.{layer}.mlp.{mlp}_proj.weight"),
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
)
# What each placeholder of WEIGHT_NAMES stands for.
PLACEHOLDERS = {"layer": r"\d+", "attn": "q|k|v|o", "mlp": "gate|up|down"}

# (SAConfig field, LlamaConfig field) for the fields that map one to one, both ways.
CONFIG_NAMES: tuple[tuple[str, str], ...] = (
    ("vocab_size", "vocab_size"),
    ("d_model", "hidden_size"),
    ("ffn_hidden", "intermediate_size"),
    ("n_layers", "num_hidden_layers"),
    ("n_heads", "num_attention_heads"),
    ("n_kv_heads", "num_key_value_heads"),
    ("max_seq_len", "max_position_embeddings"),
    ("norm_eps", "rms_norm_eps"),
    ("tie_embeddings", "tie_word_embeddings"),
    ("init_std", "initializer_range"),
)
# LlamaConfig fields for which SAModel computes one value only (a SiLU-gated MLP, projections without bias):
# an export writes these values, and a Llama folder with any other is refused.
FIXED_FIELDS: dict[str, Any] = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
# LlamaConfig's defaults for fields a config.json may leave out (None kv heads: as many as query heads, as
# SAConfig reads None too); the other fields of CONFIG_NAMES must be stated.
LLAMA_DEFAULTS: dict[str, Any] = {
    "num_key_value_heads": None,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
}
DEFAULT_ROPE_THETA = 10000.0


@functools.cache
def _pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)  # literal text, placeholder, literal text, ...
    return re.compile(
        "".join(
            re.escape(part) if i % 2 == 0 else f"(?P<{part}>{PLACEHOLDERS[part]})"
            for i, part in enumerate(parts)
        )
    )


def _rename(name: str, source: int, target: int) -> str | None:
    """``name`` from column ``source`` of WEIGHT_NAMES to column ``target``; None when no row matches."""
    for row in WEIGHT_NAMES:
        match = _pattern(row[source]).fullmatch(name)
        if match:
            return row[target].format(**match.groupdict())
    return None


def hf_weight_name(name: str) -> str:
    """The Hugging Face name of one SAModel weight; CheckpointError for a name the table does not know."""
    renamed = _rename(name, 0, 1)
    if renamed is None:
        raise CheckpointError(
            f"the checkpoint holds a weight {name!r} that SAModel does not define, so it has no Hugging Face "
            "name. The file was edited or written by another version of sa_train; export a checkpoint "
            "written by `python -m sa_train fit`."
        )
    return renamed


def sa_weight_name(hf_name: str) -> str | None:
    """The SAModel name of one Hugging Face Llama weight; None for a weight SAModel has no place for."""
    return _rename(hf_name, 1, 0)


def to_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAModel's state dict under Hugging Face names (the tensors themselves are not copied)."""
    return {hf_weight_name(name): tensor for name, tensor in state_dict.items()}


def hf_config_fields(config: SAConfig) -> dict[str, Any]:
    """The ``LlamaConfig`` fields that describe ``config`` (the SA config adds only its groups)."""
    return {
        **{hf: getattr(config, ours) for ours, hf in CONFIG_NAMES},
        "head_dim": config.head_dim,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        **FIXED_FIELDS,
    }


def sa_config_from_hf(fields: dict[str, Any], source: str) -> SAConfig:
    """The dense SAConfig of a Llama ``config.json`` (its ``fields``, read from ``source``).

    Anything SAModel cannot compute exactly is refused with a ConfigError naming the field, never dropped:
    the converted model must be the Llama it was read from. Fields that change nothing at inference
    (dropout, ``use_cache``, token ids, the stored dtype) are ignored, as by ``LlamaForCausalLM``.
    """
    model_type = fields.get("model_type")
    if model_type != "llama":
        raise ConfigError(
            f"{source}: model_type is {json.dumps(model_type)}, and convert --hf reads Llama models only "
            '(model_type "llama", LlamaForCausalLM), the architecture SAModel computes weight for weight. '
            "Give the folder of a Llama model; an SA export is converted already (use its checkpoint)."
        )
    if fields.get("quantization_config"):
        raise ConfigError(
            f"{source}: quantization_config is set, and SAModel reads full-precision weights only. Give the "
            "folder of the unquantized model (fp32, bf16 or fp16 weights)."
        )
    for name, value in FIXED_FIELDS.items():
        if fields.get(name, value) != value:
            raise ConfigError(
                f"{source}: {name} is {json.dumps(fields[name])}, and SAModel computes only {name} "
                f"{json.dumps(value)} (its MLP is SiLU-gated, its projections have no bias), so the "
                "converted model would compute another function. Give a Llama model with "
                f"{name} {json.dumps(value)}."
            )
    missing = [hf for _, hf in CONFIG_NAMES if hf not in fields and hf not in LLAMA_DEFAULTS]
    if missing:
        raise ConfigError(
            f"{source} does not state {', '.join(missing)}, which a Llama config.json holds. Give the folder "
            "written by save_pretrained, whose config.json states the whole architecture."
        )
    values = {ours: fields.get(hf, LLAMA_DEFAULTS.get(hf)) for ours, hf in CONFIG_NAMES}
    try:
        config = SAConfig(**values, rope_theta=_rope_theta(fields, source))
    except ConfigError as error:
        names = [
            f"model.config.{ours} is {hf} there"
            for ours, hf in CONFIG_NAMES
            if f"model.config.{ours}" in str(error)
        ]
        where = f" ({'; '.join(names)})" if names else ""
        raise ConfigError(f"{source} describes a model SAConfig cannot hold{where}: {error}") from error
    head_dim = fields.get("head_dim")
    if head_dim is not None and head_dim != config.head_dim:
        raise ConfigError(
            f"{source}: head_dim is {head_dim}, but SAModel's heads are hidden_size / num_attention_heads = "
            f"{config.d_model} / {config.n_heads} = {config.head_dim} wide. A model whose head_dim differs "
            "cannot be represented; give one whose head_dim is hidden_size / num_attention_heads (or unset)."
        )
    return config


def _rope_theta(fields: dict[str, Any], source: str) -> float:
    """The RoPE base of a config.json: ``rope_parameters`` (transformers 5) or the ``rope_theta`` and
    ``rope_scaling`` of earlier versions, read with the precedence transformers gives them."""
    key = "rope_scaling" if fields.get("rope_scaling") else "rope_parameters"
    parameters = fields.get(key) or {}
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(
            f"{source}: {key} asks for RoPE of type {json.dumps(rope_type)} ({json.dumps(parameters)}), and "
            "SAModel computes only the default, unscaled RoPE, so attention would differ at every position. "
            f'Give a Llama model whose {key} is null or of rope_type "default".'
        )
    return float(parameters.get("rope_theta", fields.get("rope_theta", DEFAULT_ROPE_THETA)))
