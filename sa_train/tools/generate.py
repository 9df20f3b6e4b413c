"""``python -m sa_train generate``: continue a text prompt with a trained checkpoint, streamed to stdout.

The checkpoint alone is enough: it holds the architecture, the weights and the run's tokenizer
(:mod:`sa_train.checkpoint`). The prompt is encoded by :class:`sa_train.text.TextModel`, after the
end-of-text token that separates documents in training, so the continuation starts as a fresh document
would, and stops at the next one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from sa_train.errors import ConfigError
from sa_train.generation import Sampling
from sa_train.text import TextModel
from sa_train.tools import tool_parser


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser("generate", "Continue a prompt with a trained checkpoint.")
    parser.add_argument("--checkpoint", type=Path, required=True, help="a .ckpt written by fit")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); e.g. 0.8")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, in (0, 1]")
    parser.add_argument("--seed", type=int, default=None, help="seed for repeatable sampling")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help=f"cpu or cuda ({default_device})")
    parser.add_argument(
        "--compile", action="store_true", help="compile the decode step: pays off for long generations"
    )
    return parser


def check_device(device: str) -> None:
    """A --device string torch cannot read, or CUDA asked for on a machine without it."""
    try:
        kind = torch.device(device).type
    except RuntimeError as error:
        raise ConfigError(
            f"--device {device}: not a device torch knows ({error}); use cpu or cuda."
        ) from error
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: this machine has no CUDA device; use --device cpu.")


def check_sampling_flags(args: argparse.Namespace) -> None:
    """--top-k and --top-p shape sampling; at --temperature 0 (the default) decoding is greedy and they
    were ignored without a word."""
    given = [
        f"--top-{kind} {value}" for kind, value in (("k", args.top_k), ("p", args.top_p)) if value is not None
    ]
    if given and args.temperature == 0:
        raise ConfigError(
            f"{' and '.join(given)} only apply when sampling, and without --temperature decoding is greedy; "
            f"add a temperature above 0, e.g. --temperature 0.8 {' '.join(given)}, or drop "
            f"{' and '.join(flag.split()[0] for flag in given)}."
        )


def main(argv: Sequence[str]) -> None:
    """Stream the prompt and its continuation to stdout."""
    args = build_parser().parse_args(argv)
    check_device(args.device)
    check_sampling_flags(args)
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as error:  # bytes the shell passed that are not UTF-8 (a Latin-1 file, say)
        raise ConfigError(
            f"--prompt is not UTF-8 text (byte {error.start} of it); convert the text to UTF-8 first, e.g. "
            "with iconv -f latin1 -t utf-8."
        ) from error
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    lm = TextModel.from_checkpoint(args.checkpoint, args.device)
    pieces = lm.stream(args.prompt, args.max_new_tokens, sampling, args.compile)
    sys.stdout.write(args.prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
