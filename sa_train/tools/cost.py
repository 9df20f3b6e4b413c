"""``python -m sa_train cost --config FILE``: what a config costs to train and serve, beside its dense twin.

Everything comes from the config alone (:mod:`sa_train.cost`); nothing is built or run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sa_train.config import SAConfig
from sa_train.cost import BYTES_PER_ELEMENT, cost_report
from sa_train.errors import ConfigError
from sa_train.tools import tool_parser

# Trainer precision -> element type of the activations, hence of the KV cache.
PRECISION_DTYPE = {"bf16-mixed": "bf16", "bf16-true": "bf16", "16-mixed": "fp16", "16-true": "fp16"}


@dataclass(frozen=True)
class TrainingShape:
    """What the tools read from a training YAML without building anything."""

    config: SAConfig
    seq_len: int
    batch_size: int
    dtype: str  # element type of activations and the KV cache under trainer.precision


def read_training_config(path: Path) -> TrainingShape:
    """The model config, training sequence length, micro-batch and cache dtype of a training YAML."""
    if not path.is_file():
        raise ConfigError(
            f"--config: no file at {path}; give a training config such as configs/sa-tiny.yaml."
        )
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(
            f"--config: {path} is not a readable YAML file ({type(error).__name__})."
        ) from error
    model_section = (document or {}).get("model") if isinstance(document, dict) else None
    if not isinstance(model_section, dict) or not isinstance(model_section.get("config"), dict):
        raise ConfigError(
            f"--config: {path} has no model.config section; give a training config such as "
            "configs/sa-tiny.yaml."
        )
    try:
        config = SAConfig(**model_section["config"])
    except TypeError as error:
        raise ConfigError(f"model.config in {path}: {error}.") from error
    for section in ("data", "trainer"):
        if not isinstance(document.get(section) or {}, dict):
            raise ConfigError(
                f"--config: {section} in {path} is a {type(document[section]).__name__}, but it must be a "
                f"mapping of settings (`key: value` lines under `{section}:`), as in configs/sa-tiny.yaml."
            )
    data = document.get("data") or {}
    precision = str((document.get("trainer") or {}).get("precision") or "32-true")
    seq_len, batch_size = data.get("seq_len") or config.max_seq_len, data.get("batch_size") or 8
    if not (isinstance(seq_len, int) and 1 <= seq_len <= config.max_seq_len):
        raise ConfigError(
            f"data.seq_len={seq_len!r} in {path} must be a whole number of tokens in 1..{config.max_seq_len} "
            "(model.config.max_seq_len)."
        )
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ConfigError(f"data.batch_size={batch_size!r} in {path} must be a positive whole number.")
    return TrainingShape(
        config=config, seq_len=seq_len, batch_size=batch_size, dtype=PRECISION_DTYPE.get(precision, "fp32")
    )


def _human(value: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}{unit}"
    return f"{value:g}{unit}"


def _bytes(value: float) -> str:
    for scale, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if value >= scale:
            return f"{value / scale:.1f} {suffix}"
    return f"{value:.0f} B"


def format_report(report: dict[str, Any], name: str) -> str:
    """A table of the SA model, its dense twin and dense / SA (> 1: SA is cheaper)."""
    sa, dense, settings = report["sa"], report["dense_twin"], report["settings"]
    rows = [
        (
            "layers / anchors",
            f"{sa['n_layers']} / {sa['n_anchors']}",
            f"{dense['n_layers']} / {dense['n_anchors']}",
        ),
        ("parameters", _human(sa["params"]), _human(dense["params"]), "params"),
        ("  without embeddings", _human(sa["non_embedding_params"]), _human(dense["non_embedding_params"])),
        (
            f"train FLOPs / token (seq {settings['seq_len']})",
            _human(sa["train_flops_per_token"]),
            _human(dense["train_flops_per_token"]),
            "train_flops_per_token",
        ),
        (
            f"prefill FLOPs ({settings['seq_len']} tokens)",
            _human(sa["prefill_flops"]),
            _human(dense["prefill_flops"]),
            "prefill_flops",
        ),
        (
            f"decode FLOPs / token (context {settings['context']})",
            _human(sa["decode_flops_per_token"]),
            _human(dense["decode_flops_per_token"]),
            "decode_flops_per_token",
        ),
        (
            "KV vectors / token",
            str(sa["kv_cache_vectors_per_token"]),
            str(dense["kv_cache_vectors_per_token"]),
            "kv_cache_vectors_per_token",
        ),
        (
            f"KV cache / token ({settings['dtype']})",
            _bytes(sa["kv_cache_bytes_per_token"]),
            _bytes(dense["kv_cache_bytes_per_token"]),
            "kv_cache_bytes_per_token",
        ),
        (
            "KV cache, full context, batch 1",
            _bytes(sa["kv_cache_bytes_full_context"]),
            _bytes(dense["kv_cache_bytes_full_context"]),
            "kv_cache_bytes_full_context",
        ),
    ]
    lines = [f"{'':<40} {name:>14} {'dense twin':>14} {'dense / SA':>11}"]
    for label, sa_text, dense_text, *key in rows:
        ratio = f"{dense[key[0]] / sa[key[0]]:.3f}x" if key else ""
        lines.append(f"{label:<40} {sa_text:>14} {dense_text:>14} {ratio:>11}")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    parser = tool_parser("cost", "Parameters, FLOPs and KV-cache size of a config and of its dense twin.")
    parser.add_argument("--config", type=Path, required=True, help="a training config (YAML)")
    parser.add_argument(
        "--context", type=int, help="cached positions per decoded token (model.config.max_seq_len)"
    )
    parser.add_argument(
        "--dtype", choices=sorted(BYTES_PER_ELEMENT), help="KV-cache element type (from trainer.precision)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    shape = read_training_config(args.config)
    config = shape.config
    if args.context is not None and not 1 <= args.context <= config.max_seq_len:
        raise ConfigError(
            f"--context={args.context} must be a number of cached positions in 1..{config.max_seq_len} "
            "(model.config.max_seq_len)."
        )
    report = cost_report(config, shape.seq_len, args.context, args.dtype or shape.dtype)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report, "SA" if not config.is_dense else "this model"))
