"""SIGKILL a real `fit` while it saves checkpoints, resume it: both run folders end tidy and consistent."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
import torch
from test_cli import kill_module_when, run_cli, tiny_run_config

SAVE_EVERY_STEP = [
    "--trainer.callbacks+=sa_train.callbacks.LastStepCheckpoint",
    "--trainer.callbacks.every_n_train_steps=1",
    "--trainer.callbacks.save_last=true",
]


def _step_files(folder: Path) -> dict[str, int]:
    return {
        p.name: int(m[1])
        for p in folder.iterdir()
        if (m := re.fullmatch(r"epoch=0-step=(\d+)\.ckpt", p.name))
    }


def _global_step(path: Path) -> int:
    return torch.load(path, weights_only=True, mmap=True)["global_step"]


def _assert_tidy(folder: Path) -> int:
    """One step checkpoint and last.ckpt at the same step, nothing else; returns that step."""
    steps = _step_files(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*steps, "last.ckpt"]), list(folder.iterdir())
    assert len(steps) == 1, steps
    (name, step), last = next(iter(steps.items())), folder / "last.ckpt"
    assert _global_step(folder / name) == _global_step(last) == step
    for path in folder.iterdir():
        assert path.stat().st_mode & 0o040, f"{path} is not readable by the run owner's group"
    return step


def _kill_during_a_save(args: list[str], folder: Path, cwd: Path) -> None:
    """Start `fit` saving every step, SIGKILL it the moment a checkpoint temp file exists (once last.ckpt
    does, so there is something to resume); fail if no save was caught within 60 s of saving."""
    saving_since: float | None = None

    def mid_save() -> bool:
        nonlocal saving_since
        names = os.listdir(folder) if folder.is_dir() else []
        if "last.ckpt" not in names:
            return False
        saving_since = saving_since or time.monotonic()
        assert time.monotonic() < saving_since + 60, "no checkpoint write was caught in progress"
        return any(name.endswith(".tmp") for name in names)

    kill_module_when(args, cwd, mid_save, timeout=300, poll=0.002)


@pytest.mark.slow
def test_sigkill_mid_save_then_resume_leaves_tidy_consistent_folders(tmp_path, small_corpus, capsys):
    config = str(tiny_run_config(tmp_path, small_corpus))
    killed = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints"
    _kill_during_a_save(
        ["fit", "--config", config, "--trainer.max_steps=100000", *SAVE_EVERY_STEP], killed, tmp_path
    )
    assert any(p.name.endswith(".tmp") for p in killed.iterdir())  # the kill left a partial write behind
    newest = max(_step_files(killed).values())

    with pytest.warns(UserWarning, match="left by a checkpoint write that was killed"):
        code, _, err = run_cli(
            [
                "fit",
                "--config",
                config,
                f"--trainer.max_steps={newest + 3}",
                *SAVE_EVERY_STEP,
                f"--ckpt_path={killed / 'last.ckpt'}",
            ],
            capsys,
        )
    assert code == 0, err
    assert _assert_tidy(killed) == newest  # resumed from the newest step, whatever the kill interrupted
    assert _assert_tidy(tmp_path / "runs" / "tiny" / "version_1" / "checkpoints") == newest + 3
