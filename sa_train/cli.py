"""Command line: ``python -m sa_train <command> --config FILE``.

Trainer commands (fit, validate, test) go through LightningCLI, so a YAML file and ``--section.key``
flags configure the model, the data and the Trainer alike, and the resolved config is saved into the
run folder. Tool commands (prepare, and later generate, export, ...) reuse the same parser where they
read a training config. User errors print as one paragraph and exit with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
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
from sa_train.training import CausalLM

# Values of ckpt_path that Lightning resolves itself rather than reading as a path.
LIGHTNING_CKPT_KEYWORDS = {"last", "best", "hpc", "registry"}

TRAINER_COMMANDS = {
    "fit": "train a model (resume with --ckpt_path)",
    "validate": "evaluate a checkpoint on the validation split",
    "test": "evaluate a checkpoint on the test loop",
}


class SAArgumentParser(LightningArgumentParser):
    """Parse errors as one paragraph: what is wrong and where the options are, no usage dump.

    Abbreviations are refused: with argparse's default, ``--model.config.n_layer 4`` silently set
    ``n_layers`` and a typo could change an experiment without a word.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        hint = _suggestions(message, parser)
        sys.stderr.write(f"error: {message}{hint}\nRun `{prog} --help` for the accepted options.\n")
        self.exit(2)


def _suggestions(message: str, parser: argparse.ArgumentParser) -> str:
    """' Did you mean --x?' for each unrecognised option close to a real one (typos, abbreviations)."""
    if not message.startswith("unrecognized arguments"):
        return ""
    known = [name for name in parser._option_string_actions if name.startswith("--")]
    hints = []
    for word in message.split(":", 1)[1].split():
        if word.startswith("--"):
            close = difflib.get_close_matches(word.split("=", 1)[0], known, n=1, cutoff=0.8)
            hints += [f"{close[0]} (not {word.split('=', 1)[0]})"] if close else []
    return f". Did you mean {', '.join(hints)}?" if hints else ""


class SACLI(LightningCLI):
    """LightningCLI wired to sa_train's module and data, with atomic checkpoint writes."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        super().__init__(
            CausalLM,
            TokenDataModule,
            seed_everything_default=1234,
            # Step-based runs: val_check_interval counts optimizer steps across epochs, so a run whose
            # interval exceeds one epoch validates instead of failing Lightning's per-epoch check.
            # Lightning's model summary prints a FLOPs column of zeros for this model (the FLOP-counting
            # forward it needs made Dynamo skip the model); InferenceCost prints sizes and costs instead.
            trainer_defaults={"check_val_every_n_epoch": None, "enable_model_summary": False},
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "python -m sa_train"},
            parser_class=SAArgumentParser,
            # The model builds its own AdamW and schedule: a CLI --optimizer would silently replace them.
            auto_configure_optimizers=False,
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


def plot(argv: Sequence[str]) -> None:
    """Loss curves of runs in one PNG."""
    from sa_train.tools.plot import plot_loss

    parser = argparse.ArgumentParser(prog="python -m sa_train plot", description=plot_loss.__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders holding metrics.csv")
    parser.add_argument("--out", type=Path, default=Path("loss.png"), help="the PNG to write (loss.png)")
    parser.add_argument("--smooth", type=int, default=10, help="trailing-mean window of the train loss (10)")
    args = parser.parse_args(argv)
    plot_loss(args.runs, args.out, args.smooth)


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
    "plot": (plot, "loss curves of one or more runs (metrics.csv) in one PNG"),
    "cost": (_tool("cost"), "parameters, FLOPs and KV-cache size of a config beside its dense twin"),
    "export": (_tool("export"), "write a checkpoint as a Hugging Face model folder (safetensors, tokenizer)"),
    "eval": (_tool("eval"), "run lm-evaluation-harness on an exported model folder"),
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
    rank_zero_logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLightningTips) for f in rank_zero_logger.filters):
        rank_zero_logger.addFilter(_DropLightningTips())


def _show_library_info() -> None:
    """sa_train's own INFO lines (e.g. which attention backend runs) go to stderr beside Lightning's."""
    logger = logging.getLogger("sa_train")
    if not logger.handlers:
        logger.addHandler(logging.StreamHandler())
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
    return 0
