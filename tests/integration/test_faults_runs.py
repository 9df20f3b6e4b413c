"""Faults of runs that share a runs folder: concurrent starts, leftovers of killed checkpoint writers, and a
disk that fills while a checkpoint is written."""

from __future__ import annotations

import csv
import errno
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from test_cli import ROOT, run_cli, run_modules_together, tiny_run_config

from sa_train.atomic_files import FOREIGN_STALE_SECONDS, atomic_torch_save, writer_path
from sa_train.errors import DiskFullError
from sa_train.run_folders import claim_version


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _claim_many(root: str, count: int) -> list[int]:
    return [claim_version(Path(root)) for _ in range(count)]


def test_claims_racing_in_threads_and_processes_never_share_a_version(tmp_path: Path) -> None:
    claimed: list[int] = []
    threads = [
        threading.Thread(target=lambda: claimed.extend(_claim_many(str(tmp_path), 25))) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with ProcessPoolExecutor(4) as pool:
        for versions in pool.map(_claim_many, [str(tmp_path)] * 4, [25] * 4):
            claimed += versions
    assert sorted(claimed) == list(range(300))
    assert sorted(int(p.name.split("_")[1]) for p in tmp_path.iterdir()) == list(range(300))


@pytest.mark.slow
def test_two_fits_started_together_get_their_own_run_folders(tmp_path: Path, small_corpus: Path) -> None:
    configs = []
    for seed in (1, 2):
        config = tiny_run_config(tmp_path, small_corpus)
        document = yaml.safe_load(config.read_text())
        document["seed_everything"] = seed
        document["trainer"]["max_steps"] = 6
        document["trainer"]["val_check_interval"] = 3
        configs.append(tmp_path / f"seed{seed}.yaml")
        configs[-1].write_text(yaml.safe_dump(document))
    # The shard cache is built once first: the race under test is the run folder's, not the cache's.
    code = run_module_prepare(configs[0], tmp_path)
    assert code == 0
    run_modules_together([["fit", "--config", str(config)] for config in configs], tmp_path)

    folders = sorted((tmp_path / "runs" / "tiny").iterdir())
    assert [f.name for f in folders] == ["version_0", "version_1"]
    seeds = set()
    for folder in folders:
        seeds.add(yaml.safe_load((folder / "config.yaml").read_text())["seed_everything"])
        steps = [
            int(row["step"]) for row in csv.DictReader((folder / "metrics.csv").open()) if row["train/loss"]
        ]
        assert steps == sorted(set(steps)) and len(steps) == 6  # one run's rows, no step twice
        names = sorted(p.name for p in (folder / "checkpoints").iterdir())
        assert names == ["epoch=0-step=6.ckpt", "last.ckpt"], names
    assert seeds == {1, 2}


def run_module_prepare(config: Path, cwd: Path) -> int:
    process = subprocess.run(
        [sys.executable, "-m", "sa_train", "prepare", "--config", str(config)],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    return process.returncode


def test_a_fit_removes_what_killed_checkpoint_writers_left_in_its_runs_folder(
    tmp_path: Path, small_corpus: Path, capsys
) -> None:
    config = tiny_run_config(tmp_path, small_corpus)
    killed = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints"
    killed.mkdir(parents=True)
    live = writer_path(killed / "last.ckpt")  # a save in progress in a live process (this one)
    dead = killed / live.name.replace(f".{os.getpid()}@", f".{_dead_pid()}@")
    fresh_foreign = killed / ".last.ckpt.4242@another-node.0123abcd.tmp"  # may still be writing
    old_foreign = killed / ".last.ckpt.4343@another-node.0123abcd.tmp"
    legacy = killed / ".epoch=0-step=5.ckpt.k2_x9qzz.tmp"  # mkstemp's name in earlier versions
    for path in (dead, live, fresh_foreign, old_foreign, legacy):
        path.write_bytes(b"partial")
    an_hour_ago = time.time() - FOREIGN_STALE_SECONDS - 60
    os.utime(old_foreign, (an_hour_ago, an_hour_ago))

    code, _, err = run_cli(["fit", f"--config={config}", "--trainer.max_steps=2"], capsys)
    assert code == 0, err[-3000:]
    assert sorted(p.name for p in killed.iterdir()) == sorted([live.name, fresh_foreign.name])
    assert (tmp_path / "runs" / "tiny" / "version_1" / "checkpoints" / "last.ckpt").is_file()


def _save_filling_the_disk(real_save, saves_before_full: int):
    """torch.save that writes ``saves_before_full`` checkpoints, then fails the way a full disk does."""
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > saves_before_full:
            f.write(b"PK\x03\x04 the first bytes of a zip")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    return save


def test_a_full_disk_mid_run_stops_with_one_paragraph_and_keeps_the_last_checkpoint(
    tmp_path: Path, small_corpus: Path, capsys, monkeypatch
) -> None:
    config = tiny_run_config(tmp_path, small_corpus)
    monkeypatch.setattr(torch, "save", _save_filling_the_disk(torch.save, saves_before_full=1))
    args = ["fit", f"--config={config}", "--trainer.max_steps=4", "--trainer.val_check_interval=2"]
    code, _, err = run_cli(args, capsys)
    message = err[err.find("error:") :].strip()
    assert code == 2, err[-3000:]
    assert "Traceback" not in err and "\n\n" not in message
    assert "is full" in message and "checkpoints/ held before is intact" in message, message
    checkpoints = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints"
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 2


def test_torch_zip_writer_failing_on_a_full_disk_is_a_disk_full_error(tmp_path: Path, monkeypatch) -> None:
    """On a real full disk torch's zip writer swallows the OSError and raises "unexpected pos"."""
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, target)

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr("shutil.disk_usage", lambda _: _Usage(free=0))
    with pytest.raises(DiskFullError, match=r"is full \(0 B free, the checkpoint needs about 4\.0 MiB\)"):
        atomic_torch_save({"weights": torch.zeros(2**20)}, target)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert torch.load(target, weights_only=True) == {"step": 1}


class _Usage:
    def __init__(self, free: int) -> None:
        self.free = free
