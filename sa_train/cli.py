"""Command line: ``python -m sa_train <command> --config FILE``.

Trainer commands (fit, validate, test) go through LightningCLI (:mod:`sa_train.trainer_cli`), so a YAML
file and ``--section.key`` flags configure the model, the data and the Trainer alike, and the resolved
config is saved into the run folder. Tool commands (prepare, generate, cost, export, eval, analyze,
convert, bench, plot) are one module each under ``sa_train.tools``, imported when they run. This module
only dispatches; user errors print as one paragraph and exit with status 2, no traceback.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from sa_train.compile_cache import remove_broken_libraries
from sa_train.errors import SATrainError
from sa_train.trainer_cli import SACLI, TRAINER_COMMANDS


def _tool(name: str) -> Callable[[Sequence[str]], None]:
    """The ``main`` of ``sa_train.tools.<name>``, imported when the command runs (keeps --help fast)."""

    def run(argv: Sequence[str]) -> None:
        importlib.import_module(f"sa_train.tools.{name}").main(argv)

    return run


TOOL_COMMANDS: dict[str, tuple[Callable[[Sequence[str]], None], str]] = {
    "prepare": (
        _tool("prepare"),
        "tokenise a config's data into the shard cache once (fit does it on demand)",
    ),
    "plot": (_tool("plot"), "loss and perplexity curves of one or more runs (metrics.csv) in one PNG"),
    "generate": (_tool("generate"), "continue a prompt with a checkpoint, streamed to stdout"),
    "cost": (_tool("cost"), "parameters, FLOPs and KV-cache size of a config beside its dense twin"),
    "export": (_tool("export"), "write a checkpoint as a Hugging Face model folder (safetensors, tokenizer)"),
    "eval": (_tool("eval"), "run lm-evaluation-harness on an exported model folder"),
    "analyze": (
        _tool("analyze"),
        "cross-layer attention similarity of a checkpoint and the SA groups it suggests",
    ),
    "convert": (
        _tool("convert"),
        "retrofit a dense checkpoint or Hugging Face Llama folder into an SA one (heads matched to anchors)",
    ),
    "bench": (_tool("bench"), "training, decode and data speed of SA beside its dense twin and HF Llama"),
}


# Commands that may compile (model.compile, generate --compile, bench): usable Inductor cache first.
COMPILING_COMMANDS = {"fit", "validate", "test", "generate", "bench"}


def usage() -> str:
    rows = list(TRAINER_COMMANDS.items()) + [(name, text) for name, (_, text) in TOOL_COMMANDS.items()]
    width = max(len(name) for name, _ in rows)
    lines = [
        "usage: python -m sa_train <command> --config FILE [--section.key VALUE ...]",
        "",
        "Train Shared-Attention-native language models.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {text}" for name, text in rows),
        "",
        "`python -m sa_train <command> --help` lists a command's options; `--print_config` shows the",
        "resolved config of a trainer command.",
    ]
    return "\n".join(lines)


class _DropLightningTips(logging.Filter):
    """Lightning logs an advertisement ("💡 Tip: ... litlogger") on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def _quiet_upstream_noise() -> None:
    """Messages Lightning prints on every run that no sa_train user can act on."""
    # Deprecation inside Lightning 2.6 itself.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # Batches are slices of memmapped token shards: one of 16 x 256 tokens takes ~0.3 ms to read on this
    # 2-core machine, so worker processes are optional (data.num_workers), not a bottleneck to warn about.
    warnings.filterwarnings("ignore", message=r"The '\w+_dataloader' does not have many workers")
    # Lightning recommends sync_dist for every value logged per epoch under DDP or DeepSpeed. val/* and
    # test/* are already reduced over all processes (torchmetrics, before the exp), and InferenceCost's
    # cost/* are measured on the first rank alone: syncing would average equal values, or hang.
    warnings.filterwarnings(
        "ignore",
        message=r"It is recommended to use `self.log\('(val|test|cost)/\w+', \.\.\., sync_dist=True\)`",
    )
    rank_zero_logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLightningTips) for f in rank_zero_logger.filters):
        rank_zero_logger.addFilter(_DropLightningTips())
    # DeepSpeed, imported while parsing a config that names its strategy, prints a warning on stdout (which
    # corrupts --print_config) when it finds no GPU, unless told it runs on the CPU.
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted: pytest and notebooks replace it, and a
    handler holding the stream of its creation time then writes to a closed file."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        """The stream is always the current ``sys.stderr``."""


def _show_library_info() -> None:
    """sa_train's own INFO lines (e.g. which attention backend runs) go to stderr beside Lightning's."""
    logger = logging.getLogger("sa_train")
    if not logger.handlers:
        logger.addHandler(_CurrentStderr())
        logger.setLevel(logging.INFO)


def _missing_module(error: BaseException) -> ModuleNotFoundError | None:
    """The ModuleNotFoundError behind an error (jsonargparse wraps it in ValueErrors), if any."""
    while error is not None and not isinstance(error, ModuleNotFoundError):
        error = error.__cause__ or error.__context__
    return error


def main(args: Sequence[str] | None = None) -> int:
    """Run a command; ``args`` defaults to the process's own arguments. Returns the exit status."""
    _quiet_upstream_noise()
    _show_library_info()
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command in COMPILING_COMMANDS:
        for path in remove_broken_libraries():
            logging.getLogger("sa_train").info(
                "Removed %s, left in Inductor's cache by a killed compile.", path
            )
    try:
        if command in TRAINER_COMMANDS:
            SACLI(args=args)  # None: LightningCLI reads sys.argv itself
        elif command in TOOL_COMMANDS:
            TOOL_COMMANDS[command][0](rest)
        else:
            commands = [*TRAINER_COMMANDS, *TOOL_COMMANDS]
            close = difflib.get_close_matches(command, commands, n=1)
            hint = f" Did you mean {close[0]}?" if close else f" The commands are {', '.join(commands)}."
            print(
                f"error: unknown command {command!r}.{hint}\nRun `python -m sa_train --help` for what each "
                "does.",
                file=sys.stderr,
            )
            return 2
    except (SATrainError, MisconfigurationException) as error:  # Lightning's: a bad Trainer setting
        print(f"error: {error}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as error:  # jsonargparse reading a binary --config file
        names = ", ".join(_undecodable_files(rest)) or "a file named on the command line"
        print(
            f"error: {names} is not UTF-8 text ({error.reason} at byte {error.start}); --config takes a YAML "
            "file such as configs/sa-tiny.yaml.",
            file=sys.stderr,
        )
        return 2
    except (ModuleNotFoundError, ValueError) as error:  # an optional package a config names (e.g. a logger)
        missing = _missing_module(error)
        if missing is None:
            raise
        print(
            f"error: the config needs a package that is not installed ({missing}). Install it with pip, e.g. "
            "`pip install wandb` for WandbLogger, or choose another logger/strategy in the config.",
            file=sys.stderr,
        )
        return 2
    except OSError as error:  # e.g. an output folder that cannot be created or written
        print(
            f"error: {error.filename or 'a file'}: {error.strerror or error}. Check the paths the command "
            "reads and writes: output folders (trainer.default_root_dir, the logger's save_dir, the "
            "checkpoint dirpath, data.cache_dir, --out) must be creatable and writable.",
            file=sys.stderr,
        )
        return 2
    return 0


def _undecodable_files(argv: Sequence[str]) -> list[str]:
    """The files among the arguments (``--config FILE`` or ``--config=FILE``) that are not UTF-8 text."""
    found = []
    for arg in argv:
        path = Path(arg.partition("=")[2] if arg.startswith("--") else arg)
        if path.is_file():
            try:
                path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                found.append(str(path))
    return found
