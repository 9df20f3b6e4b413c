"""``python -m sa_train analyze --checkpoint CKPT --out DIR``: which layers attend alike, and the SA groups
that follow from it.

Runs held-out text through the checkpoint's model, compares the attention of every pair of layers
(:mod:`sa_train.analysis`), and writes ``similarity.json`` (every measure and pairing, per-head detail),
``similarity.png`` (the heatmap of the chosen one) and prints suggested groups in config syntax.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from sa_train.analysis import (
    anchors_for_kv_budget,
    attention_maps,
    batches_of,
    groups_for_budget,
    similarity,
    suggest_groups,
)
from sa_train.checkpoint import read_checkpoint
from sa_train.errors import ConfigError, DataError
from sa_train.model import SAModel
from sa_train.tools import tool_parser


def read_texts(path: Path | None, text_field: str) -> list[str]:
    """Documents of a .txt file (one document) or .jsonl(.gz) file; by default the works the default data
    split holds out of training in the shipped corpus."""
    if path is None:
        from sa_train.export.eval_tasks import held_out_works

        return [work["text"] for work in held_out_works()]
    if not path.is_file():
        raise DataError(f"--data: no file at {path}; give a .txt or .jsonl(.gz) file of held-out text.")
    if path.suffix == ".txt":
        try:
            return [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError as error:
            raise DataError(
                f"--data: {path} is not UTF-8 text ({error.reason} at byte {error.start})."
            ) from error
    opener = gzip.open if path.suffix == ".gz" else open
    texts = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    document = json.loads(line, strict=False)  # control characters in strings are text
                except json.JSONDecodeError as error:
                    raise DataError(
                        f"--data: line {number} of {path} is not JSON ({error}); a .jsonl file holds one "
                        "JSON object per line."
                    ) from error
                if not isinstance(document, dict):
                    raise DataError(
                        f"--data: line {number} of {path} is a JSON {type(document).__name__}, not an "
                        "object; each line of a .jsonl file is one document such as "
                        f'{{"{text_field}": "..."}}.'
                    )
                texts.append(document.get(text_field))
    except (UnicodeDecodeError, OSError, EOFError) as error:
        raise DataError(
            f"--data: {path} cannot be read as JSON lines ({error}); give a .txt file, or .jsonl(.gz) with "
            "one JSON object per line."
        ) from error
    texts = [text for text in texts if isinstance(text, str) and text.strip()]
    if not texts:
        raise DataError(
            f"--data: {path} holds no {text_field!r} text; set --text-field to the field holding it."
        )
    return texts


def plot_heatmap(matrix: list[list[float]], layers: list[int], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(layers)
    off_diagonal = [matrix[i][j] for i in range(n) for j in range(n) if i != j] or [1.0]
    shown = [[float("nan") if i == j else matrix[i][j] for j in range(n)] for i in range(n)]
    fig, ax = plt.subplots(figsize=(6.5, 5.5), dpi=120)
    # The diagonal (a layer against itself, 1.0) is left blank so the colours spread over the pairs.
    image = ax.imshow(shown, vmin=min(off_diagonal), vmax=max(off_diagonal), cmap="viridis")
    if n <= 16:
        for i in range(n):
            for j in range(n):
                if i != j:
                    ax.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", fontsize=7, color="white")
    ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="similarity")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv: Sequence[str]) -> None:
    parser = tool_parser(
        "analyze",
        "Which layers of a checkpoint attend alike, and the SA groups that follow: writes "
        "similarity.json and similarity.png into --out and prints suggested groups in config syntax.",
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint written by fit")
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for similarity.json and similarity.png"
    )
    parser.add_argument(
        "--data",
        type=Path,
        help="held-out text: .txt or .jsonl(.gz) (default: the works the default split holds out of "
        "training)",
    )
    parser.add_argument("--text-field", default="text", help="jsonl field holding the text (default: text)")
    parser.add_argument("--batches", type=int, default=2, help="batches of held-out tokens (default: 2)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per batch (default: 4)")
    parser.add_argument(
        "--seq-len", type=int, help="tokens per sequence (default: min(256, the model's context))"
    )
    parser.add_argument(
        "--measure",
        choices=("js", "cosine"),
        default="js",
        help="similarity measure of the heatmap and groups (default: js)",
    )
    parser.add_argument(
        "--pairing",
        choices=("matched", "index", "mean"),
        default="matched",
        help="how heads of two layers are paired: the best one-to-one match, by index, or the mean over "
        "all pairs (default: matched)",
    )
    parser.add_argument(
        "--threshold", type=float, default=0.8, help="similarity a layer needs to its anchor (default: 0.8)"
    )
    parser.add_argument(
        "--kv-budget",
        type=float,
        help="KV cache as a fraction of the dense one, e.g. 0.75 (default: groups by --threshold)",
    )
    args = parser.parse_args(argv)
    if not 0.0 <= args.threshold <= 1.0:  # NaN fails too
        raise ConfigError(f"--threshold={args.threshold}: similarities lie in [0, 1]; e.g. 0.8.")
    for name in ("batches", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1.")
    if args.kv_budget is not None and not 0.5 < args.kv_budget <= 1.0:
        raise ConfigError(f"--kv-budget={args.kv_budget}: the KV fraction of an SA model lies in (0.5, 1].")

    saved = read_checkpoint(args.checkpoint)
    tokenizer = saved.tokenizer("read the text analyze measures on")
    model = SAModel.from_saved(saved)
    seq_len = args.seq_len or min(256, model.config.max_seq_len)
    if not 1 <= seq_len <= model.config.max_seq_len:
        raise ConfigError(
            f"--seq-len={seq_len} must lie in 1..{model.config.max_seq_len} (the model's context)."
        )
    tokens = [
        token
        for encoding in tokenizer.encode_batch(read_texts(args.data, args.text_field))
        for token in encoding.ids
    ]
    batches = batches_of(tokens, args.batch_size, seq_len, args.batches)
    if not batches:
        raise DataError(
            f"--data holds {len(tokens)} tokens, fewer than one batch of {args.batch_size} x {seq_len}."
        )
    maps = attention_maps(model, torch.cat(batches))
    result = similarity(maps)
    matrix = (result.js if args.measure == "js" else result.cosine)[args.pairing]

    report = {
        "checkpoint": str(args.checkpoint),
        "groups": model.config.groups,
        "tokens": len(batches) * args.batch_size * seq_len,
        "measure": "1 - Jensen-Shannon divergence (bits) of attention rows; cosine of attention rows",
        **asdict(result),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    title = f"attention similarity ({'1 - JS' if args.measure == 'js' else 'cosine'}, heads {args.pairing})"
    if model.config.is_dense:
        n = model.config.n_layers
        suggested = suggest_groups(matrix, args.threshold)
        report["suggested"] = {"threshold": args.threshold, "sa_groups": suggested}
        lines = [
            f"sa_groups: {suggested}  # similarity >= {args.threshold}, {len(suggested)} anchors, "
            f"KV {(n + len(suggested)) / (2 * n):.3f} of dense"
        ]
        if args.kv_budget is not None:
            budget_groups, threshold = groups_for_budget(matrix, anchors_for_kv_budget(n, args.kv_budget))
            report["suggested_for_budget"] = {
                "kv_budget": args.kv_budget,
                "threshold": threshold,
                "sa_groups": budget_groups,
            }
            lines.append(
                f"sa_groups: {budget_groups}  # KV budget {args.kv_budget}: {len(budget_groups)} anchors, "
                f"similarity >= {threshold:.3f}"
            )
    else:
        lines = [
            f"(an SA model: the rows are its anchors {result.layers}; groups are suggested for dense models)"
        ]
    (args.out / "similarity.json").write_text(json.dumps(report, indent=2))
    plot_heatmap(matrix, result.layers, title, args.out / "similarity.png")
    print(f"wrote {args.out / 'similarity.json'} and {args.out / 'similarity.png'}")
    print("\n".join(lines))
