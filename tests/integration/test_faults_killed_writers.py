"""Kills of the commands that write files besides fit and export: `prepare` mid-shard and `convert`
mid-save, SIGKILLed for real; the next run of the same command removes what they left and finishes.

Each child is the command a user runs (``sa_train.cli.main``, what ``python -m sa_train`` calls) with one
function of its write path replaced by a stall after a temp file is written and before it is renamed, so
the kill lands mid-write every time rather than when a clock happens to catch it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import datasets
import torch
from test_cli import kill_when, run_cli, tiny_run_config

from sa_train import SAConfig, SAModel
from sa_train.checkpoint import model_checkpoint, read_checkpoint
from sa_train.data.shards import HF_WORK_DIR, MANIFEST, read_cache
from sa_train.data.tokenizer import train_bpe

STALLED = """
import os, sys, time
{patch}
def stall():
    open(os.environ["STALL_MARKER"], "w").close()
    time.sleep(600)
from sa_train.cli import main
sys.exit(main(sys.argv[1:]))
"""
# prepare: a shard's temp file is complete and its digest comes next, then the rename.
STALL_SHARD = """
import sa_train.data.shards as shards
digest = shards.file_sha256
def stalled_digest(path):
    if shards.TMP_MARKER in os.path.basename(path):
        stall()
    return digest(path)
shards.file_sha256 = stalled_digest
"""
# convert: the checkpoint's temp file holds part of it, and the rest never comes.
STALL_SAVE = """
import torch
def stalled_save(obj, f, *args, **kwargs):
    f.write(b"partial checkpoint")
    f.flush()
    stall()
torch.save = stalled_save
"""


def kill_stalled(patch: str, args: list[str], cwd: Path) -> None:
    script, marker = cwd / "stalled.py", cwd / "stalled"
    script.write_text(STALLED.format(patch=patch))
    kill_when([sys.executable, str(script), *args], cwd, marker.exists, timeout=240, STALL_MARKER=str(marker))


def test_the_next_prepare_removes_what_a_killed_prepare_left(tmp_path, small_corpus, capsys):
    config = str(tiny_run_config(tmp_path, small_corpus))
    kill_stalled(STALL_SHARD, ["prepare", "--config", config], tmp_path)
    (folder,) = (tmp_path / "cache").iterdir()
    left = sorted(p.name for p in folder.iterdir())
    assert any(".tmp" in name for name in left) and HF_WORK_DIR in left and MANIFEST not in left, left

    code, _, err = run_cli(["prepare", "--config", config], capsys)
    assert code == 0, err
    assert not [p for p in folder.rglob("*") if ".tmp" in p.name], sorted(folder.iterdir())
    assert not (folder / HF_WORK_DIR).exists()
    cache = read_cache(str(folder))
    assert cache is not None and cache.train_tokens > 0


def test_the_next_convert_removes_what_a_killed_convert_left(tmp_path, capsys):
    text = "To be, or not to be, that is the question. Whether 'tis nobler in the mind to suffer. " * 60
    config = SAConfig(vocab_size=300, d_model=32, n_layers=4, n_heads=2, max_seq_len=64)
    tokenizer = train_bpe(datasets.Dataset.from_dict({"text": [text]}), config.vocab_size)
    torch.save(model_checkpoint(SAModel(config), tokenizer.to_str()), tmp_path / "dense.ckpt")
    (tmp_path / "held_out.txt").write_text(text)
    out = tmp_path / "out" / "sa.ckpt"
    args = ["convert", "--checkpoint", str(tmp_path / "dense.ckpt"), "--groups", "every:2", "--out", str(out)]
    args += ["--data", str(tmp_path / "held_out.txt"), "--tokens", "128"]

    kill_stalled(STALL_SAVE, args, tmp_path)
    (left,) = out.parent.iterdir()
    assert left.name.startswith(".sa.ckpt.") and left.name.endswith(".tmp"), left

    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert [p.name for p in out.parent.iterdir()] == ["sa.ckpt"]
    assert read_checkpoint(out).config.groups == [[0, 1], [2, 3]]
