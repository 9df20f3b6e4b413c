"""Fixtures of the unit tests."""

from __future__ import annotations

import gzip
import json

import datasets
import pytest

from sa_train.data.datamodule import SHIPPED_CORPUS
from sa_train.data.tokenizer import train_bpe

VOCAB = 320  # the vocabulary of test_export.TINY


@pytest.fixture(scope="session")
def tokenizer_json() -> str:
    """A byte-level BPE trained on the first 40k characters of the shipped corpus, as a JSON string."""
    with gzip.open(SHIPPED_CORPUS, "rt", encoding="utf-8") as f:
        text = json.loads(f.readline())["text"][:40_000]
    return train_bpe(datasets.Dataset.from_dict({"text": text.split("\n\n")}), VOCAB).to_str()
