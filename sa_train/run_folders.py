"""A run's folders: its ``version_N`` claimed atomically, and where its checkpoints and its neighbours' go."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger


def claim_version(root: Path) -> int:
    """Create ``root/version_N`` for the next free N and return N; atomic across processes and hosts.

    Lightning's loggers pick the next version by listing the folder and create it later: two runs started
    together both took version_0 (one config.yaml overwritten, metrics.csv interleaving both runs). ``mkdir``
    fails for all but one creator, and a loser moves on to the next number.
    """
    root.mkdir(parents=True, exist_ok=True)
    while True:
        taken = [
            int(entry.name[len("version_") :])
            for entry in root.iterdir()
            if entry.name.startswith("version_") and entry.name[len("version_") :].isdigit()
        ]
        version = max(taken, default=-1) + 1
        try:
            (root / f"version_{version}").mkdir()
        except FileExistsError:
            continue
        return version


def claim_run_folder(logger: Logger | None) -> Path | None:
    """Give a CSV or TensorBoard logger without a set version a ``version_N`` folder that no other run
    shares (:func:`claim_version`); returns the folder claimed."""
    if not isinstance(logger, CSVLogger | TensorBoardLogger) or logger._version is not None:
        return None
    # The logger's own choice is lazy (its ``version`` property lists the folder); set it before use.
    logger._version = claim_version(Path(logger.root_dir))
    return Path(logger.log_dir)


def checkpoint_folders(trainer: Trainer) -> set[Path]:
    """Where this run's checkpoints go, and the checkpoint folders of the other runs beside it."""
    folders = {
        Path(callback.dirpath)
        for callback in trainer.checkpoint_callbacks
        if isinstance(callback, ModelCheckpoint) and callback.dirpath
    }
    logger = trainer.logger
    root = Path(logger.root_dir) if isinstance(logger, CSVLogger | TensorBoardLogger) else None
    if root is not None and root.is_dir():
        folders |= {run / "checkpoints" for run in root.glob("version_*")}
    elif logger is None:
        folders.add(Path(trainer.default_root_dir) / "checkpoints")
    return folders
