"""Fixtures of the integration tests."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from sa_train.data.datamodule import SHIPPED_CORPUS


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """~300 KB of the shipped corpus, cut into 40 documents, so a run takes seconds."""
    with gzip.open(SHIPPED_CORPUS, "rt", encoding="utf-8") as f:
        text = "".join(json.loads(line)["text"] for line in f)[:300_000]
    path = tmp_path_factory.mktemp("corpus") / "small.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i in range(40):
            f.write(json.dumps({"id": i, "body": text[i * 7500 : (i + 1) * 7500]}) + "\n")
    return path
