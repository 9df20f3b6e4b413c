"""Command line: ``python -m sa_train <command> --config FILE``.

Trainer commands (fit, validate, test) go through LightningCLI, so a YAML file and ``--section.key``
flags configure the model, the data and the Trainer alike, and the resolved config is saved into the
run folder. Tool commands (prepare, and later generate, export, ...) reuse the same parser where they
read a training config. User errors print as one paragraph and exit with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from sa_train.callbacks import LastStepCheckpoint
from sa_train.checkpoint_io import AtomicCheckpointIO
from sa_train.data import TokenDataModule
from sa_train.errors import ConfigError, SATrainError
from sa_train.tools import generate
from sa_train.training import CausalLM

# Values of ckpt_path that Lightning resolves itself rather than reading as a path.
LIGHTNING_CKPT_KEYWORDS = {"last", "best", "hpc", "registry"}

TRAINER_COMMANDS = {
    "fit": "train a model (resume with --ckpt_path)",
    "validate": "evaluate a checkpoint on the validation split",
    "test": "evaluate a checkpoint on the test loop",
}


class SAArgumentParser(LightningArgumentParser):
    """Parse errors as one paragraph: what is wrong and where the options are, no usage dump."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {message}\nRun `{prog} --help` for the accepted options.\n")
        self.exit(2)


class SACLI(LightningCLI):
    """LightningCLI wired to sa_train's module and data, with atomic checkpoint writes."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        super().__init__(
            CausalLM,
            TokenDataModule,
            seed_everything_default=1234,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "python -m sa_train"},
            parser_class=SAArgumentParser,
            args=list(args) if args is not None else None,
            run=run,
        )

    def before_instantiate_classes(self) -> None:
        """Fail before any work when --ckpt_path names a file that is not there."""
        subcommand_config = self.config.get(self.subcommand) if self.subcommand else None
        ckpt_path = subcommand_config.get("ckpt_path") if subcommand_config is not None else None
        if ckpt_path and ckpt_path not in LIGHTNING_CKPT_KEYWORDS and not Path(ckpt_path).is_file():
            raise ConfigError(
                f"ckpt_path: no checkpoint file at {ckpt_path}. Point --ckpt_path at a .ckpt written by fit, "
                "e.g. runs/<name>/version_<N>/checkpoints/last.ckpt."
            )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Adds atomic checkpoint IO, and a LastStepCheckpoint when the config names no checkpoint callback
        (Lightning's default one saves only at epoch ends, which step-bounded LM runs may never reach)."""
        trainer_config = self.config_init[self.subcommand]["trainer"] if self.subcommand else {}
        callbacks = trainer_config.get("callbacks") or []
        if trainer_config.get("enable_checkpointing") is not False and not any(
            isinstance(callback, ModelCheckpoint) for callback in callbacks
        ):
            kwargs["callbacks"] = [*callbacks, LastStepCheckpoint(save_last=True)]
        plugins = kwargs.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)


class _DataOnlyCLI(SACLI):
    """Parses a full training config but builds only its data module: preparing needs no model."""

    def instantiate_classes(self) -> None:
        self.datamodule = TokenDataModule(**self.config["data"].as_dict())


def prepare(argv: Sequence[str]) -> None:
    """Tokenise the data of a training config into the shard cache ahead of ``fit``."""
    _DataOnlyCLI(args=argv, run=False).datamodule.prepare_data()


def plot(argv: Sequence[str]) -> None:
    """Loss curves of runs in one PNG."""
    from sa_train.tools.plot import plot_loss

    parser = argparse.ArgumentParser(prog="python -m sa_train plot", description=plot_loss.__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders holding metrics.csv")
    parser.add_argument("--out", type=Path, default=Path("loss.png"), help="the PNG to write (loss.png)")
    parser.add_argument("--smooth", type=int, default=10, help="trailing-mean window of the train loss (10)")
    args = parser.parse_args(argv)
    plot_loss(args.runs, args.out, args.smooth)


TOOL_COMMANDS: dict[str, tuple[Callable[[Sequence[str]], None], str]] = {
    "prepare": (prepare, "tokenise a config's data into the shard cache once (fit does it on demand)"),
    "plot": (plot, "loss curves of one or more runs (metrics.csv) in one PNG"),
    "generate": (generate.main, "continue a prompt with a checkpoint, streamed to stdout"),
}


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


def _quiet_upstream_noise() -> None:
    """Deprecation notices Lightning 2.6 raises inside itself every run; nothing a user can act on."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def _show_library_info() -> None:
    """sa_train's own INFO lines (e.g. which attention backend runs) go to stderr beside Lightning's."""
    logger = logging.getLogger("sa_train")
    if not logger.handlers:
        logger.addHandler(logging.StreamHandler())
        logger.setLevel(logging.INFO)


def main(args: Sequence[str] | None = None) -> int:
    """Run a command; ``args`` defaults to the process's own arguments. Returns the exit status."""
    _quiet_upstream_noise()
    _show_library_info()
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command in TRAINER_COMMANDS:
            SACLI(args=args)  # None: LightningCLI reads sys.argv itself
        elif command in TOOL_COMMANDS:
            TOOL_COMMANDS[command][0](rest)
        else:
            print(f"error: unknown command {command!r}.\n\n{usage()}", file=sys.stderr)
            return 2
    except (SATrainError, MisconfigurationException) as error:  # Lightning's: a bad Trainer setting
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
