"""``python -m sa_train cost --config FILE``: what a config costs to train and serve, beside its dense twin.

Everything comes from the config alone (:mod:`sa_train.cost`), read as fit reads it, with fit's overrides
(``--model.config.sa_groups every:3``); nothing is built or run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sa_train.cost import cost_report
from sa_train.dtypes import DTYPES
from sa_train.errors import ConfigError
from sa_train.run_config import read_training_config
from sa_train.tools import tool_parser

# The options of fit that cost takes, besides its own.
FIT_SECTIONS = ("--model.", "--data.", "--trainer.")


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
    parser = tool_parser(
        "cost",
        "Parameters, FLOPs and KV-cache size of a config and of its dense twin. fit's --model.*, --data.* "
        "and --trainer.* options override the config, e.g. --model.config.sa_groups every:3 (`python -m "
        "sa_train fit --help` lists them).",
    )
    parser.add_argument("--config", type=Path, required=True, help="a training config (YAML)")
    parser.add_argument(
        "--context", type=int, help="cached positions per decoded token (model.config.max_seq_len)"
    )
    parser.add_argument(
        "--dtype", choices=list(DTYPES), help="KV-cache element type (from trainer.precision)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args, overrides = parser.parse_known_args(argv)
    unknown = [arg for arg in overrides if arg.startswith("-") and not arg.startswith(FIT_SECTIONS)]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    shape = read_training_config(args.config, overrides)
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
