"""``python -m sa_train convert (--checkpoint DENSE_CKPT | --hf LLAMA_DIR) --groups SPEC --out SA_CKPT``:
retrofit a trained dense model into an SA model (:mod:`sa_train.convert`), reporting held-out perplexity
before and after.

The dense model is a sa_train checkpoint or a local Hugging Face Llama folder
(:mod:`sa_train.export.reader`); both arrive as the same checkpoint data, so one path converts them. The
output is a checkpoint that ``validate`` scores and that ``fit`` fine-tunes from with
``--model.init_from SA_CKPT`` (and the same ``model.config``: the groups, and for a Llama folder the
architecture it declared and its tokenizer, which the printed command spells out).
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from sa_train.analysis import attention_maps, batches_of
from sa_train.atomic_files import atomic_torch_save
from sa_train.checkpoint import model_checkpoint, read_checkpoint
from sa_train.config import ARCHITECTURE_FIELDS, SAConfig
from sa_train.convert import convert_to_sa
from sa_train.cost import kv_fraction
from sa_train.errors import ConfigError, DataError
from sa_train.export.reader import read_hf_folder
from sa_train.model import SAModel, next_token_loss
from sa_train.tools import tool_parser
from sa_train.tools.analyze import read_texts


@torch.no_grad()
def perplexity(model: SAModel, batch: torch.Tensor) -> float:
    logits = model(batch[:, :-1])
    return math.exp(next_token_loss(logits, batch[:, 1:]).item())


def fine_tune_overrides(config: SAConfig, hf: Path | None) -> list[str]:
    """The ``fit`` options that make its model the converted one: the groups; for a Llama folder, whose
    architecture no sa_train config states yet, every field and the folder's tokenizer as well."""
    if hf is None:
        return [f"--model.config.sa_groups '{config.groups}'"]
    fields = {name: getattr(config, name) for name in (*ARCHITECTURE_FIELDS, "max_seq_len")}
    overrides = [f"--model.config.{name} {shlex.quote(json.dumps(value))}" for name, value in fields.items()]
    return [*overrides, f"--data.tokenizer {shlex.quote(str(hf / 'tokenizer.json'))}"]


def main(argv: Sequence[str]) -> None:
    parser = tool_parser(
        "convert",
        "Retrofit a trained dense model (a sa_train checkpoint or a local Hugging Face Llama folder) into "
        "an SA model, reporting held-out perplexity before and after.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a dense model's checkpoint")
    source.add_argument(
        "--hf", type=Path, help="a local Hugging Face Llama folder (config.json, weights, tokenizer.json)"
    )
    parser.add_argument(
        "--groups",
        required=True,
        help="SA groups: every:G, dense:D,every:G or a list, as model.config.sa_groups",
    )
    parser.add_argument("--out", type=Path, required=True, help="the SA checkpoint to write")
    parser.add_argument(
        "--no-head-matching",
        action="store_true",
        help="keep every layer's head order (default: reorder heads to match their anchor's)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        help="held-out text, .txt or .jsonl(.gz): its first part matches heads, the next one is scored "
        "(default: the works the default split holds out of training)",
    )
    parser.add_argument("--text-field", default="text", help="jsonl field holding the text (default: text)")
    parser.add_argument(
        "--tokens",
        type=int,
        default=4096,
        help="held-out tokens for matching, and as many scored (default: 4096)",
    )
    args = parser.parse_args(argv)
    if args.tokens < 1:
        raise ConfigError(f"--tokens={args.tokens} must be a positive number of held-out tokens, e.g. 4096.")
    if args.out.exists():
        raise ConfigError(
            f"--out: {args.out} exists; give a new path (convert never overwrites a checkpoint)."
        )

    saved = read_hf_folder(args.hf) if args.hf else read_checkpoint(args.checkpoint)
    tokenizer = saved.tokenizer("read the held-out text convert matches heads on")
    dense = SAModel.from_saved(saved)
    groups = yaml.safe_load(args.groups) if args.groups.lstrip().startswith("[") else args.groups
    seq_len = min(256, dense.config.max_seq_len)
    encodings = tokenizer.encode_batch(read_texts(args.data, args.text_field))
    tokens = [token for encoding in encodings for token in encoding.ids]
    # Head matching and the perplexity that judges it read different text: a permutation chosen on the
    # scored batch itself would be graded on what it was fitted to.
    rows = max(1, min(args.tokens, len(tokens) // 2) // seq_len)
    batches = batches_of(tokens, rows, seq_len, 2)
    if len(batches) < 2:
        raise DataError(
            f"--data holds {len(tokens)} tokens, too few for two sequences of {seq_len} (one to match heads "
            "on, one to score): give more held-out text."
        )
    calibration, batch = batches
    maps = None if args.no_head_matching else attention_maps(dense, calibration[:, :-1])
    converted = convert_to_sa(dense, groups, maps).eval()

    checkpoint = model_checkpoint(converted, saved.tokenizer_json, saved.global_step)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(checkpoint, args.out)
    fraction = kv_fraction(converted.config.n_layers, len(converted.config.groups))
    print(f"wrote {args.out}: groups {converted.config.groups}, KV cache {fraction:.3f} of dense")
    heads = "heads matched" if maps is not None else "heads as they were"
    print(
        f"held-out perplexity ({batch.numel()} tokens): dense {perplexity(dense, batch):.2f}, converted "
        f"{perplexity(converted, batch):.2f} ({heads})"
    )
    overrides = " ".join(fine_tune_overrides(converted.config, args.hf))
    print(f"fine-tune: python -m sa_train fit --config ... {overrides} --model.init_from {args.out}")
