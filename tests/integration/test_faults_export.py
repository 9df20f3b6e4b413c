"""Faults of export: a kill mid-write, a full disk, and the modes of what it writes."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
import transformers

from sa_train import SAConfig, SAModel
from sa_train.atomic_files import writer_path
from sa_train.checkpoint import model_checkpoint
from sa_train.data.tokenizer import train_bpe
from sa_train.errors import DiskFullError
from sa_train.export.writer import export_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TEXT = "To be, or not to be, that is the question.\n\nWhether 'tis nobler in the mind to suffer.\n\n" * 40


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    config = SAConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, max_seq_len=32, sa_groups="every:2")
    tokenizer = train_bpe(datasets.Dataset.from_dict({"text": TEXT.split("\n\n")}), config.vocab_size)
    path = tmp_path_factory.mktemp("ckpt") / "m.ckpt"
    torch.save(model_checkpoint(SAModel(config), tokenizer.to_str()), path)
    return path


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# Exports argv[1] to argv[2] with save_pretrained stalled after its first file: a kill lands mid-write.
STALLED_EXPORT = """
import sys, time
import transformers
from sa_train.export.writer import export_checkpoint

def stalled(self, folder, **kwargs):
    (folder / "model.safetensors").write_bytes(b"partial weights")
    time.sleep(600)

transformers.PreTrainedModel.save_pretrained = stalled
export_checkpoint(sys.argv[1], sys.argv[2])
"""


def test_the_next_export_removes_what_killed_exports_left(tmp_path: Path, checkpoint: Path) -> None:
    out = tmp_path / "hf"
    killed = subprocess.Popen(
        [sys.executable, "-c", STALLED_EXPORT, str(checkpoint), str(out)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".hf.*.tmp/model.safetensors")) and time.monotonic() < deadline:
        assert killed.poll() is None
        time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    (staging,) = tmp_path.glob(".hf.*.tmp")  # what the kill left
    moved_aside = tmp_path / writer_path(out, "old").name.replace(f".{os.getpid()}@", f".{_dead_pid()}@")
    moved_aside.mkdir()  # a kill during the swap of an --overwrite export
    legacy = tmp_path / ".hf.k2_x9qzz.tmp"  # tempfile.mkdtemp's staging in earlier versions
    legacy.mkdir()
    live = writer_path(tmp_path / "other")  # another export in progress, in a live process (this one)
    live.mkdir()
    unrelated = tmp_path / ".cache"
    unrelated.mkdir()

    export_checkpoint(checkpoint, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".cache", live.name, "hf"])
    assert not staging.exists() and (out / "model.safetensors").stat().st_size > 1000


def test_a_full_disk_during_export_keeps_the_previous_export(
    tmp_path: Path, checkpoint: Path, monkeypatch
) -> None:
    out = export_checkpoint(checkpoint, tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_save = transformers.PreTrainedModel.save_pretrained

    def save_filling_the_disk(self, folder, **kwargs):
        real_save(self, folder, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "tokenizer.json"))

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save_filling_the_disk)
    with pytest.raises(DiskFullError, match=r"cannot write the export .*hf: the disk holding .* is full"):
        export_checkpoint(checkpoint, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_an_export_follows_the_umask(tmp_path: Path, checkpoint: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        out = export_checkpoint(checkpoint, tmp_path / "hf")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model.safetensors", "config.json", "tokenizer.json", "README.md"}
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o666 & ~umask}
