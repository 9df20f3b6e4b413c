"""A training YAML read as ``fit`` reads it, by fit's own parser, with its overrides and defaults, and
nothing built: what the tools and benchmarks take from a config."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser

from sa_train.config import SAConfig
from sa_train.dtypes import precision_dtype
from sa_train.errors import ConfigError
from sa_train.trainer_cli import SACLI


class _ParseOnly(SACLI):
    """SACLI that parses and checks, and builds, seeds and runs nothing."""

    def __init__(self, args: Sequence[str], prog: str) -> None:
        self._prog = prog
        super().__init__(args, run=False)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        return super().init_parser(**{**kwargs, "prog": self._prog})

    def _set_seed(self) -> None:
        """Parsing seeds nothing (Lightning's seeding also logs "Seed set to 1234")."""

    def instantiate_classes(self) -> None:
        """Nothing is built."""


def parse_training_config(args: Sequence[str], prog: str) -> Namespace:
    """The config ``fit`` would run with ``args`` (``--config FILE`` and ``--section.key`` overrides on the
    trainer's defaults), parsed and checked by fit's own parser, so tools read a training config as fit
    does; parse errors end the process as fit's do, naming ``prog``."""
    with warnings.catch_warnings():
        # ``args`` are the tool's command line less its own options; Lightning warns when they differ.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return _ParseOnly(args, prog).config


@dataclass(frozen=True)
class TrainingShape:
    """What the tools read from a training YAML without building anything."""

    config: SAConfig
    seq_len: int
    batch_size: int
    dtype: str  # element type of activations and the KV cache under trainer.precision


def read_training_config(
    path: Path, overrides: Sequence[str] = (), prog: str = "python -m sa_train cost"
) -> TrainingShape:
    """The model config, training sequence length, micro-batch and cache dtype of a training YAML with
    ``--section.key`` overrides, read by fit's own parser (its errors name ``prog``): the defaults are the
    data module's and the Trainer's (data.seq_len 256, data.batch_size 16, precision 32-true), as a fit of
    the config would use."""
    if not path.is_file():
        raise ConfigError(
            f"--config: no file at {path}; give a training config such as configs/sa-tiny.yaml."
        )
    parsed = parse_training_config(["--config", str(path), *overrides], prog)
    try:
        config = SAConfig(**parsed.model.config.as_dict())
    except TypeError as error:
        raise ConfigError(f"model.config in {path}: {error}.") from error
    seq_len, batch_size = parsed.data.seq_len, parsed.data.batch_size
    if not 1 <= seq_len <= config.max_seq_len:
        raise ConfigError(
            f"data.seq_len={seq_len} must be a whole number of tokens in 1..{config.max_seq_len} "
            "(model.config.max_seq_len); set --data.seq_len or --model.config.max_seq_len."
        )
    if batch_size < 1:
        raise ConfigError(f"data.batch_size={batch_size} must be a positive whole number.")
    precision = str(parsed.trainer.precision or "32-true")
    return TrainingShape(
        config=config, seq_len=seq_len, batch_size=batch_size, dtype=precision_dtype(precision)
    )
