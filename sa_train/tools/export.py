"""``python -m sa_train export --checkpoint CKPT --out DIR``: a checkpoint as a Hugging Face model folder.

Dense models load as ``LlamaForCausalLM``; SA models as remote code (``trust_remote_code=True``). See
:mod:`sa_train.export.writer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sa_train.dtypes import DTYPES
from sa_train.errors import ConfigError
from sa_train.tools import tool_parser


def main(argv: Sequence[str]) -> None:
    parser = tool_parser(
        "export", "Write a checkpoint as a Hugging Face model folder (safetensors, tokenizer, model card)."
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="a .ckpt written by fit")
    parser.add_argument("--out", type=Path, required=True, help="the folder to create")
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default="fp32", help="type of the saved weights (fp32)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    args = parser.parse_args(argv)
    try:
        from sa_train.export.writer import export_checkpoint
    except ModuleNotFoundError as error:
        raise ConfigError(
            f"export needs the transformers package ({error}); install it with `pip install -e '.[eval]'`."
        ) from error
    out = export_checkpoint(args.checkpoint, args.out, args.dtype, args.overwrite)
    print(f"exported {args.checkpoint} to {out}")
