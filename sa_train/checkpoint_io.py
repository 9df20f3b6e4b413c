"""Atomic checkpoint writes for Lightning: a crash mid-save never leaves a truncated checkpoint behind.

Lightning's default writer stages through a temp file in the system temp folder and moves it into
place, which is a plain (non-atomic) copy whenever that folder is on another filesystem. Here the
temp file sits beside the target, is fsynced, then renamed over it (:func:`atomic_torch_save`).
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from sa_train.checkpoint import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes each checkpoint atomically (local filesystems)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, path)
