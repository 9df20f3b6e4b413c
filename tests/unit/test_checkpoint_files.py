"""Checkpoint files on disk: the mode of atomic writes, and tidying what a kill mid-save leaves behind."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sa_train.atomic_files import atomic_hardlink, atomic_torch_save, remove_stale_temp_files
from sa_train.callbacks import LastStepCheckpoint
from sa_train.checkpoint_io import relink_last_checkpoint


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _ckpt(path: Path, step: int) -> Path:
    torch.save({"global_step": step, "state_dict": {"w": torch.full((4,), float(step))}}, path)
    return path


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_save_gives_the_mode_of_any_other_file(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        atomic_torch_save({"x": 1}, tmp_path / "a.ckpt")
        (tmp_path / "metrics.csv").write_text("step\n")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a.ckpt").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "metrics.csv").stat().st_mode) == 0o666 & ~umask


def test_only_temp_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    dead = tmp_path / f".last.ckpt.{_dead_pid()}.0123abcd.tmp"
    legacy = tmp_path / ".epoch=0-step=50.ckpt.k2_x9qzz.tmp"  # mkstemp's name in earlier versions
    alive = tmp_path / f".last.ckpt.{os.getpid()}.0123abcd.tmp"  # a save in progress in a live process
    unrelated = tmp_path / ".notes.tmp"
    for path in (dead, legacy, alive, unrelated):
        path.write_bytes(b"partial")
    atomic_torch_save({"x": 1}, tmp_path / "last.ckpt")
    assert not dead.exists() and not legacy.exists() and alive.exists() and unrelated.exists()
    assert remove_stale_temp_files(tmp_path) == []
    assert torch.load(tmp_path / "last.ckpt", weights_only=True) == {"x": 1}


def test_hardlink_replaces_the_target(tmp_path: Path) -> None:
    source, target = _ckpt(tmp_path / "a.ckpt", 2), _ckpt(tmp_path / "last.ckpt", 1)
    atomic_hardlink(source, target)
    assert target.stat().st_ino == source.stat().st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "last.ckpt"]


def test_tidy_undoes_a_kill_between_the_writes_of_a_save(tmp_path: Path) -> None:
    callback = LastStepCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True)
    _ckpt(tmp_path / "epoch=0-step=3.ckpt", 3)  # the previous save, not yet deleted
    _ckpt(tmp_path / "epoch=0-step=4.ckpt", 4)  # the new one
    _ckpt(tmp_path / "last.ckpt", 3)  # not yet rewritten
    (tmp_path / f".last.ckpt.{_dead_pid()}.0123abcd.tmp").write_bytes(b"partial")
    _ckpt(tmp_path / "hand-made.ckpt", 1)  # not named by the callback's template: left alone
    with pytest.warns(UserWarning) as warned:
        callback.tidy(tmp_path)
    messages = " ".join(str(w.message) for w in warned)
    assert "checkpoint write that was killed" in messages and "epoch=0-step=3.ckpt: an older" in messages
    assert "last.ckpt was at step 3, behind epoch=0-step=4.ckpt" in messages
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "epoch=0-step=4.ckpt",
        "hand-made.ckpt",
        "last.ckpt",
    ]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 4


def test_tidy_keeps_the_checkpoint_being_resumed_and_other_policies(tmp_path: Path) -> None:
    older, newer = _ckpt(tmp_path / "step=3.ckpt", 3), _ckpt(tmp_path / "step=4.ckpt", 4)
    LastStepCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1).tidy(tmp_path, keep=older)
    LastStepCheckpoint(dirpath=tmp_path, filename="{step}", save_top_k=-1).tidy(tmp_path)  # keeps all
    assert older.exists() and newer.exists()
    with pytest.warns(UserWarning, match="step=3.ckpt: an older step checkpoint"):
        LastStepCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1).tidy(tmp_path)
    assert not older.exists() and newer.exists()


def test_relink_only_moves_last_forward(tmp_path: Path) -> None:
    older, newer = _ckpt(tmp_path / "step=3.ckpt", 3), _ckpt(tmp_path / "step=4.ckpt", 4)
    relink_last_checkpoint(older)  # an explicit step checkpoint is never replaced
    assert _global_step_in(older) == 3
    last = _ckpt(tmp_path / "last.ckpt", 5)
    relink_last_checkpoint(last)  # already the newest
    assert _global_step_in(last) == 5
    _ckpt(last, 2)
    with pytest.warns(UserWarning, match="was at step 2, behind step=4.ckpt"):
        relink_last_checkpoint(last)
    assert last.stat().st_ino == newer.stat().st_ino


def _global_step_in(path: Path) -> int:
    return torch.load(path, weights_only=True)["global_step"]
