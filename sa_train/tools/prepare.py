"""``python -m sa_train prepare --config FILE``: tokenise a training config's data into the shard cache once.

``fit`` builds the cache on demand; preparing ahead of time suits a cluster, where the cache is built on
one node (or a CPU job) before the GPUs start. Only the ``data`` section is read; the other sections of
the training config are accepted and ignored, so the same file serves both commands.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jsonargparse import ActionConfigFile

from sa_train.data import TokenDataModule
from sa_train.trainer_cli import SAArgumentParser, check_sections


def main(argv: Sequence[str]) -> None:
    parser = SAArgumentParser(
        prog="python -m sa_train prepare",
        description="Tokenise the data of a training config into the shard cache ahead of `fit`.",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a training config (YAML)")
    parser.add_class_arguments(TokenDataModule, "data")
    for section in ("model", "trainer"):
        parser.add_argument(f"--{section}", type=Any, default=None, help="(read by fit; ignored here)")
    parser.add_argument("--seed_everything", type=Any, default=None, help="(read by fit; ignored here)")
    config = parser.parse_args(list(argv))
    check_sections(config, ("data",))
    TokenDataModule(**config["data"].as_dict()).prepare_data()
