"""The checkpoint layout: the one module that knows what a sa_train checkpoint holds.

A checkpoint is Lightning's dict (``state_dict``, optimizer and loop state, ...) plus the entries that make
it self-contained for inference on another machine:

- ``sa_config``: :meth:`SAConfig.to_dict`, the architecture, groups included;
- ``tokenizer``: the text of the run's ``tokenizer.json`` (absent when the run had no data module);
- model weights under ``state_dict`` with the ``model.`` prefix of :class:`CausalLM`'s attribute.

Under DeepSpeed the checkpoint is a folder: ``latest`` names a tag folder holding Lightning's entries (without
``state_dict``) in the rank-0 model-states file, and the weights in ZeRO shards, one per rank.
:func:`read_checkpoint` reads both kinds.

Writers (the LightningModule) call :func:`add_model_entries`; readers (``SAModel.from_checkpoint``,
``generate``, ``export``) call :func:`read_checkpoint`. Everything here is torch only; DeepSpeed is imported
only to read a folder.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sa_train.config import SAConfig
from sa_train.errors import CheckpointError, SATrainError

CONFIG_KEY = "sa_config"
TOKENIZER_KEY = "tokenizer"
MODEL_PREFIX = "model."


def add_model_entries(checkpoint: dict[str, Any], config: SAConfig, tokenizer_json: str | None) -> None:
    """Add the architecture and the tokenizer to a Lightning checkpoint dict being saved."""
    checkpoint[CONFIG_KEY] = config.to_dict()
    if tokenizer_json is not None:
        checkpoint[TOKENIZER_KEY] = tokenizer_json


@dataclass
class ModelCheckpoint:
    """What inference needs from a checkpoint: the architecture, the weights and the tokenizer."""

    path: Path
    config: SAConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer_json: str | None
    global_step: int | None


def read_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> ModelCheckpoint:
    """Read a sa_train checkpoint: a .ckpt file, or the .ckpt folder fit writes under DeepSpeed.

    Files are read without unpickling arbitrary objects (``weights_only`` loading); DeepSpeed's consolidation
    unpickles a folder's optimizer shards in full, so read only folders you trust.

    Raises :class:`CheckpointError` with the reason and the fix for a missing, truncated or foreign file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"no checkpoint at {path}. Give the path of a .ckpt written by `python -m sa_train fit`, e.g. "
            "runs/<name>/version_<N>/checkpoints/last.ckpt."
        )
    checkpoint = _read_deepspeed_folder(path, map_location) if path.is_dir() else _load(path, map_location)
    if not isinstance(checkpoint, dict) or CONFIG_KEY not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{path} is not a sa_train checkpoint: it has no '{CONFIG_KEY}' and 'state_dict' entries. Use a "
            ".ckpt written by `python -m sa_train fit` (a plain state_dict file holds no architecture)."
        )
    try:
        config = SAConfig(**checkpoint[CONFIG_KEY])
    except (TypeError, SATrainError) as error:
        raise CheckpointError(
            f"{path} holds a model config this version of sa_train cannot build ({error})."
        ) from error
    state = {
        key[len(MODEL_PREFIX) :]: value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(MODEL_PREFIX)
    }
    return ModelCheckpoint(
        path=path,
        config=config,
        state_dict=state,
        tokenizer_json=checkpoint.get(TOKENIZER_KEY),
        global_step=checkpoint.get("global_step"),
    )


def _load(path: Path, map_location: str | torch.device) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch's unpickler raises anything from IndexError to RuntimeError
        raise CheckpointError(
            f"{path} cannot be read as a checkpoint ({_first_line(error)}). The file is truncated, damaged "
            "or not a PyTorch checkpoint; use another checkpoint of the run (e.g. last.ckpt or a step "
            "checkpoint)."
        ) from error


def _read_deepspeed_folder(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    """Lightning's entries from the rank-0 model-states file, and the full fp32 weights merged from the ZeRO
    shards by DeepSpeed's own consolidation (``zero_to_fp32``; under ZeRO-3 the model-states files hold only
    placeholders for the weights)."""
    latest = path / "latest"
    if not latest.is_file():
        raise CheckpointError(
            f"{path} is a folder but not a DeepSpeed checkpoint (it has no 'latest' file). Give a .ckpt file "
            "written by fit, or a .ckpt folder written by fit under trainer.strategy DeepSpeed."
        )
    try:
        from deepspeed.utils import zero_to_fp32
    except ImportError as error:
        raise CheckpointError(
            f"{path} is a DeepSpeed checkpoint folder, and reading one needs DeepSpeed: pip install "
            "'sa_train[deepspeed]' (or convert the folder to one file where DeepSpeed is installed, see "
            "docs/distributed.md)."
        ) from error
    try:
        tag_folder = path / latest.read_text().strip()
        entries = _load(Path(zero_to_fp32.get_model_state_files(tag_folder)[0]), map_location)
        weights = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(path)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(
            f"{path}: the DeepSpeed checkpoint is incomplete or damaged ({_first_line(error)}). Every rank "
            "writes its own shard into the folder; copy the whole folder, or use another checkpoint of the "
            "run."
        ) from error
    entries.pop("module", None)
    return {**entries, "state_dict": weights}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temp file beside ``path``, fsync, rename: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
