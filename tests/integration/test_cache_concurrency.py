"""Processes that build the same fresh token cache at the same moment both succeed, and build it once."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from sa_train.data import TokenDataModule

ROOT = Path(__file__).resolve().parents[2]
WORDS = [
    "the",
    "king",
    "queen",
    "sword",
    "crown",
    "night",
    "day",
    "love",
    "death",
    "speak",
    "hath",
    "thou",
    "art",
    "sir",
    "lord",
    "lady",
]

# Imports first, then waits for the `go` file, so both builds start within a millisecond of each other.
BUILDER = textwrap.dedent(
    """
    import os, sys, time
    from sa_train.data import TokenDataModule
    dm = TokenDataModule(source=sys.argv[1], vocab_size=400, seq_len=32, cache_dir=sys.argv[2], num_proc=1)
    open(sys.argv[3] + ".ready" + sys.argv[4], "w").close()
    while not os.path.exists(sys.argv[3]):
        time.sleep(0.001)
    dm.prepare_data()
    """
)


@pytest.mark.slow
def test_two_processes_building_the_same_cache_at_once(tmp_path: Path) -> None:
    rng = random.Random(0)
    corpus = tmp_path / "corpus.jsonl"
    with corpus.open("w") as fh:
        for _ in range(400):
            fh.write(json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(50, 400)))}) + "\n")
    cache_dir, go = tmp_path / "cache", tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BUILDER, str(corpus), str(cache_dir), str(go), str(index)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(2)
    ]
    deadline = time.monotonic() + 120
    while not all(Path(f"{go}.ready{i}").exists() for i in range(2)) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    outputs = [p.communicate(timeout=300) for p in procs]  # reads while waiting: no pipe fills up
    results = [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs, strict=True)]

    for code, _, err in results:
        assert code == 0, err[-3000:]
        assert "Traceback" not in err
    outputs = [out for _, out, _ in results]
    assert sum("written to" in out for out in outputs) == 1, outputs  # built once,
    assert sum("found at" in out for out in outputs) == 1, outputs  # reused by the other once it was done
    dm = TokenDataModule(source=str(corpus), vocab_size=400, seq_len=32, cache_dir=str(cache_dir), num_proc=1)
    dm.setup()  # checks the shards against the manifest's checksums
    assert [p.name for p in cache_dir.iterdir()] == [dm.spec.key()]
    assert not (Path(dm.cache.folder) / "hf").exists()
    train = np.fromfile(dm.cache.shard_path("train"), dtype=dm.cache.dtype)
    assert len(train) == dm.train_tokens and train[-1] == dm.eos_token_id
