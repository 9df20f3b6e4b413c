"""Lightning callbacks of the training layer."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from sa_train.checkpoint import atomic_hardlink, remove_stale_temp_files

# Stand-ins formatted into the filename template to find the step checkpoints it names.
_EPOCH_MARK, _STEP_MARK = 987654321, 123456789


class LastStepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that never loses the final steps and leaves a tidy folder after any kill.

    ``last.ckpt`` is also written when training stops between two save intervals (e.g. ``max_steps`` not a
    multiple of ``every_n_train_steps``): Lightning's ModelCheckpoint writes it at the end of training only
    if it never wrote one, so a run of 230 steps saving every 100 would end with a last.ckpt from step 200.

    A save is three file operations (write the new step checkpoint, delete the previous one, rewrite
    ``last.ckpt``), so a kill between them leaves two step checkpoints, or a ``last.ckpt`` one interval
    behind the step checkpoint, besides the temp file of a write cut short. When ``fit`` starts, the
    checkpoint folder and the folder of the checkpoint it resumed from are therefore tidied (:meth:`tidy`);
    the CLI relinks a ``last.ckpt`` that is behind before it is loaded (:func:`relink_last_checkpoint`).
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stepped_since_save = self._last_global_step_saved != trainer.global_step
        if self.save_last and stepped_since_save and not trainer.fast_dev_run:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Tidy once the resumed checkpoint (if any) is loaded and Lightning knows its path."""
        super().on_fit_start(trainer, pl_module)
        if not trainer.is_global_zero or self.dirpath is None:
            return
        resume = Path(trainer.ckpt_path).resolve() if trainer.ckpt_path else None
        folders = {Path(self.dirpath).resolve()}
        if resume is not None and resume.is_file():
            folders.add(resume.parent)
        for folder in sorted(folders):
            self.tidy(folder, keep=resume)

    def tidy(self, folder: Path, keep: Path | None = None) -> None:
        """Undo what a kill mid-save left in ``folder``; never deletes ``keep`` (the resumed checkpoint).

        Removes temp files of dead writers. When this callback keeps only the newest step checkpoint
        (``save_top_k=1``, no ``monitor``), removes the older step checkpoints its filename template names.
        Then points ``last.ckpt`` at the newest checkpoint if it is behind one.
        """
        if not folder.is_dir():
            return
        for path in remove_stale_temp_files(folder):
            warnings.warn(f"Removed {path}, left by a checkpoint write that was killed.", stacklevel=2)
        steps = self._step_checkpoints(folder) if self.monitor is None and self.save_top_k == 1 else {}
        if steps:
            newest = max(steps, key=steps.__getitem__)
            for path in steps:
                if path != newest and path != keep:
                    path.unlink()
                    warnings.warn(
                        f"Removed {path}: an older step checkpoint whose deletion a kill interrupted "
                        f"({newest.name} is newer).",
                        stacklevel=2,
                    )
        if self.save_last:
            relink_last_checkpoint(folder / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")

    def _step_checkpoints(self, folder: Path) -> dict[Path, int]:
        """The step checkpoints in ``folder`` that this callback's filename template names, by step."""
        marks = {"epoch": torch.tensor(_EPOCH_MARK), "step": torch.tensor(_STEP_MARK)}
        template = Path(self.format_checkpoint_name(marks)).name
        if str(_STEP_MARK) not in template:
            return {}
        pattern = re.escape(template).replace(str(_EPOCH_MARK), r"\d+")
        pattern = "^" + pattern.replace(str(_STEP_MARK), r"(?P<step>\d+)") + "$"
        steps = {}
        for path in folder.iterdir():
            match = re.match(pattern, path.name)
            if match and path.is_file() and not path.is_symlink():
                steps[path] = int(match["step"])
        return steps


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
        p: _global_step(p)
        for p in last.parent.glob("*.ckpt")
        if p != last and p.is_file() and not p.is_symlink()
    }
    if not steps:
        return
    newest = max(steps, key=steps.__getitem__)
    last_step = _global_step(last)
    if steps[newest] > last_step:
        atomic_hardlink(newest, last)
        warnings.warn(
            f"{last} was at step {last_step}, behind {newest.name} (a kill between the two writes); it is "
            f"now a link to {newest.name}, step {steps[newest]}.",
            stacklevel=2,
        )


def _global_step(path: Path) -> int:
    """The optimizer step a checkpoint was written at (read lazily, ``mmap``); -1 when unreadable."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception:  # a foreign or damaged file never counts as newer
        return -1
