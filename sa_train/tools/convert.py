"""``python -m sa_train convert --checkpoint DENSE_CKPT --groups SPEC --out SA_CKPT``: retrofit a trained
dense model into an SA model (:mod:`sa_train.convert`), reporting held-out perplexity before and after.

The output is a checkpoint that ``validate`` scores and that ``fit`` fine-tunes from with
``--model.init_from SA_CKPT`` (and the same ``model.config.sa_groups``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import lightning
import torch
import torch.nn.functional as F
import yaml
from tokenizers import Tokenizer

from sa_train.analysis import attention_maps, batches_of
from sa_train.checkpoint import add_model_entries, atomic_torch_save, read_checkpoint
from sa_train.convert import convert_to_sa
from sa_train.errors import CheckpointError, ConfigError, DataError
from sa_train.model import SAModel
from sa_train.tools import tool_parser
from sa_train.tools.analyze import read_texts
from sa_train.training import CausalLM


@torch.no_grad()
def perplexity(model: SAModel, batch: torch.Tensor) -> float:
    logits = model(batch[:, :-1])
    return math.exp(F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()).item())


def main(argv: Sequence[str]) -> None:
    parser = tool_parser("convert", __doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a dense model's checkpoint")
    parser.add_argument("--groups", required=True, help="SA groups: every:G, dense:D,every:G or a list")
    parser.add_argument("--out", type=Path, required=True, help="the SA checkpoint to write")
    parser.add_argument("--no-head-matching", action="store_true", help="keep every layer's head order")
    parser.add_argument("--data", type=Path, help="held-out text for matching and perplexity (.txt/.jsonl)")
    parser.add_argument("--text-field", default="text", help="jsonl field holding the text (text)")
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens used (4096)")
    args = parser.parse_args(argv)
    if args.out.exists():
        raise ConfigError(
            f"--out: {args.out} exists; give a new path (convert never overwrites a checkpoint)."
        )

    saved = read_checkpoint(args.checkpoint)
    if saved.tokenizer_json is None:
        raise CheckpointError(
            f"{args.checkpoint} carries no tokenizer; convert needs one to read held-out text."
        )
    dense = SAModel.from_saved(saved)
    groups = yaml.safe_load(args.groups) if args.groups.lstrip().startswith("[") else args.groups
    seq_len = min(256, dense.config.max_seq_len)
    encodings = Tokenizer.from_str(saved.tokenizer_json).encode_batch(read_texts(args.data, args.text_field))
    tokens = [token for encoding in encodings for token in encoding.ids]
    rows = max(1, args.tokens // seq_len)
    batches = batches_of(tokens, rows, seq_len, 1)
    if not batches:
        raise DataError(f"--data holds {len(tokens)} tokens, too few for one sequence of {seq_len}.")
    batch = batches[0]
    maps = None if args.no_head_matching else attention_maps(dense, batch[:, :-1])
    converted = convert_to_sa(dense, groups, maps).eval()

    # Written through the LightningModule, so validate can load it like any checkpoint of fit.
    module = CausalLM(converted.config)
    module.model.load_state_dict(converted.state_dict())
    checkpoint = {
        "state_dict": module.state_dict(),
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": saved.global_step,
    }
    add_model_entries(checkpoint, converted.config, saved.tokenizer_json)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(checkpoint, args.out)
    n, anchors = converted.config.n_layers, len(converted.config.groups)
    print(
        f"wrote {args.out}: groups {converted.config.groups}, KV cache {(n + anchors) / (2 * n):.3f} of dense"
    )
    heads = "heads matched" if maps is not None else "heads as they were"
    print(
        f"held-out perplexity ({batch.numel()} tokens): dense {perplexity(dense, batch):.2f}, converted "
        f"{perplexity(converted, batch):.2f} ({heads})"
    )
    groups_arg = f"--model.config.sa_groups '{converted.config.groups}'"
    print(f"fine-tune: python -m sa_train fit --config ... {groups_arg} --model.init_from {args.out}")
