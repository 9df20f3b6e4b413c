"""Checkpoint files for Lightning: atomic writes, and a ``last.ckpt`` that a kill left behind relinked.

A crash mid-save never leaves a truncated checkpoint behind. Lightning's default writer stages through a
temp file in the system temp folder and moves it into place, which is a plain (non-atomic) copy whenever
that folder is on another filesystem. Here the temp file sits beside the target, is fsynced, then renamed
over it (:func:`atomic_torch_save`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from sa_train.atomic_files import atomic_hardlink, atomic_torch_save
from sa_train.checkpoint import read_global_step


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes each checkpoint atomically (local filesystems)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, path)


def relink_last_checkpoint(last: Path) -> None:
    """If a checkpoint beside ``last.ckpt`` holds a later step, make it a hard link of the latest one.

    A kill between writing a step checkpoint and rewriting ``last.ckpt`` leaves ``last.ckpt`` one save
    behind; resuming from it would silently repeat that interval. The link is renamed over ``last``
    atomically: no copy, and never a moment without a ``last.ckpt``.
    """
    last_name = f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
    if last.name != last_name or not last.is_file() or last.is_symlink():
        return
    steps = {
        p: read_global_step(p)
        for p in last.parent.glob("*.ckpt")
        if p != last and p.is_file() and not p.is_symlink()
    }
    if not steps:
        return
    newest = max(steps, key=steps.__getitem__)
    last_step = read_global_step(last)
    if steps[newest] > last_step:
        atomic_hardlink(newest, last)
        warnings.warn(
            f"{last} was at step {last_step}, behind {newest.name} (a kill between the two writes); it is "
            f"now a link to {newest.name}, step {steps[newest]}.",
            stacklevel=2,
        )
