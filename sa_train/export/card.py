"""The model card (README.md) of an export: architecture, SA groups, training progress, inference cost."""

from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData

from sa_train.config import SAConfig
from sa_train.cost import cost_report


def _groups_text(config: SAConfig) -> str:
    if config.is_dense:
        return "none: every layer computes its own attention (a plain Llama)"
    return f"`{config.groups}` (anchors: layers {', '.join(str(a) for a in config.anchors)})"


def model_card(config: SAConfig, name: str, source: str, global_step: int | None, dtype: str) -> ModelCard:
    """The card of an export of ``config``; costs are those of :func:`sa_train.cost.cost_report` at
    ``max_seq_len`` with the KV cache in the export's ``dtype``."""
    remote = "" if config.is_dense else ", trust_remote_code=True"
    report = cost_report(config, config.max_seq_len, dtype=dtype)
    sa, dense, savings = report["sa"], report["dense_twin"], report["savings"]
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["sa_train", "llama" if config.is_dense else "shared-attention"],
    )
    step = "not recorded" if global_step is None else f"{global_step:,}"
    rows = [
        ("parameters", f"{sa['params']:,}", f"{dense['params']:,}", savings["params_dense_over_sa"]),
        (
            f"prefill FLOPs ({config.max_seq_len} tokens)",
            f"{sa['prefill_flops']:.4g}",
            f"{dense['prefill_flops']:.4g}",
            savings["prefill_flops_dense_over_sa"],
        ),
        (
            f"decode FLOPs / token (context {config.max_seq_len})",
            f"{sa['decode_flops_per_token']:.4g}",
            f"{dense['decode_flops_per_token']:.4g}",
            savings["decode_flops_per_token_dense_over_sa"],
        ),
        (
            "KV-cache vectors / token",
            str(sa["kv_cache_vectors_per_token"]),
            str(dense["kv_cache_vectors_per_token"]),
            dense["kv_cache_vectors_per_token"] / sa["kv_cache_vectors_per_token"],
        ),
        (
            f"KV-cache bytes / token ({dtype})",
            f"{sa['kv_cache_bytes_per_token']:,}",
            f"{dense['kv_cache_bytes_per_token']:,}",
            1 / savings["kv_cache_sa_over_dense"],
        ),
    ]
    table = "\n".join(f"| {label} | {a} | {b} | {ratio:.3f}x |" for label, a, b, ratio in rows)
    text = f"""---
{data.to_yaml()}
---

# {name}

A {"dense (Llama)" if config.is_dense else "Shared-Attention"} language model trained with sa_train,
exported from `{source}`.

## Architecture

| | |
|---|---|
| layers | {config.n_layers} |
| width (d_model) | {config.d_model} |
| heads / key-value heads | {config.n_heads} / {config.n_kv_heads} |
| MLP hidden (SwiGLU) | {config.ffn_hidden} |
| vocabulary | {config.vocab_size} |
| context (max_seq_len) | {config.max_seq_len} |
| tied embeddings | {config.tie_embeddings} |
| shared-attention groups | {_groups_text(config)} |
| parameters | {sa["params"]:,} |
| weights | {dtype} |

## Training

- optimizer steps: {step}
- training tokens: not recorded in the checkpoint (steps × batch size × sequence length of the run's config)

## Inference cost

From `sa_train.cost` (FLOPs per the PaLM convention, element-wise work left out), beside the dense twin
(the same shape with every layer its own group):

| | this model | dense twin | dense / this |
|---|---|---|---|
{table}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{name}"{remote})
tokenizer = AutoTokenizer.from_pretrained("{name}"{remote})
```

Evaluate with lm-evaluation-harness:
`lm_eval --model hf --model_args pretrained={name}{remote.replace(" ", "")} --tasks ...`
"""
    return ModelCard(text)
