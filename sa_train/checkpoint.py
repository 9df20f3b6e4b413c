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
import re
import secrets
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
    """Memory-mapped: reading the config and tokenizer of a large checkpoint touches only their pages, not
    the optimizer state (a resume reads the file to check it before Lightning loads it)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
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


# Temp files of atomic_torch_save: hidden, beside the target, named by the writing process's pid.
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
# Earlier versions used ``tempfile.mkstemp`` names without a pid; no writer of this version makes them.
_LEGACY_TEMP_NAME = re.compile(r"^\..+\.ckpt\.[a-z0-9_]{8}\.tmp$")


def _temp_path(path: Path) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def remove_stale_temp_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temp files that killed writers left in ``folder``; returns what was removed.

    Only files named like :func:`atomic_torch_save`'s temp files whose writing process is gone are touched,
    so a save in progress in another process is left alone; checkpoint temp files named the way earlier
    versions named them (no pid) are leftovers by construction and go too.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        match = _TEMP_NAME.match(entry.name)
        stale = not _process_alive(int(match["pid"])) if match else bool(_LEGACY_TEMP_NAME.match(entry.name))
        if stale:
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temp file beside ``path``, fsync, rename: readers see the old or the new file.

    The temp file is created with mode 0o666 less the umask, like any file the run writes (``mkstemp``'s
    0600 would hide checkpoints from the run owner's group), and temp files that killed writers left
    beside ``path`` are removed first, so a crash mid-save costs disk space only until the next save.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path.parent)
    tmp = _temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_hardlink(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Make ``target`` a hard link of ``source`` through a temp name, so ``target`` is never absent."""
    target = Path(target)
    tmp = _temp_path(target)
    os.link(source, tmp)
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
