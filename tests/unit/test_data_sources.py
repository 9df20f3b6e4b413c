"""Unit tests of the data pipeline on tiny synthetic corpora: where the documents come from and the
TokenDataModule's arguments. Text, parquet and Hub sources; a missing or empty source, an absent text
field, a corpus too small, one document, bad fractions, tokenizers and loader settings each refused with
a DataError naming the option; the arguments' help from the docstring."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data_cache import _dm, _docs, _jsonl

from sa_train.data import TokenDataModule, sources
from sa_train.errors import DataError


def test_txt_and_parquet_sources(tmp_path: Path) -> None:
    texts = _docs(6)
    for i, text in enumerate(texts[:3]):
        (tmp_path / f"part{i}.txt").write_text(text)
    pq.write_table(pa.table({"body": texts[3:], "n": [1, 2, 3]}), tmp_path / "rest.parquet")
    ds = sources.load_documents(
        [str(tmp_path / "*.txt"), str(tmp_path / "rest.parquet")], "body", "train", str(tmp_path / "hf")
    )
    assert ds["text"] == texts


def test_hub_names_are_loaded_through_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    assert sources.is_hub_source("someone/tiny-corpus")
    assert not sources.is_hub_source("data/corpus.jsonl")

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(sources.datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"data\.source: 'someone/tiny-corpus'.*offline"):
        sources.load_documents("someone/tiny-corpus", "text", "train", "unused")


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.source: no file matches .*missing\.jsonl"):
        _dm(tmp_path, str(tmp_path / "missing.jsonl")).prepare_data()


def test_empty_corpus(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.source: .*contains no text"):
        _dm(tmp_path, str(_jsonl(tmp_path / "c.jsonl", ["", "   ", "\n"]))).prepare_data()


def test_absent_text_field_lists_fields(tmp_path: Path) -> None:
    source = str(_jsonl(tmp_path / "c.jsonl", _docs(5), field="content"))
    with pytest.raises(DataError, match=r"data\.text_field: .*no field 'text'.*\['id', 'content'\]"):
        _dm(tmp_path, source).prepare_data()


def test_corpus_too_small_for_seq_len(tmp_path: Path) -> None:
    dm = _dm(tmp_path, str(_jsonl(tmp_path / "c.jsonl", _docs(20))), seq_len=4096)
    with pytest.raises(DataError, match=r"data\.seq_len=4096 is too long for the train split"):
        dm.prepare_data()
    dm = _dm(tmp_path, str(_jsonl(tmp_path / "c.jsonl", _docs(20))), seq_len=400)
    with pytest.raises(DataError, match=r"data\.seq_len=400 is too long for the val split"):
        dm.setup()


def test_single_document_cannot_be_split(tmp_path: Path) -> None:
    (tmp_path / "book.txt").write_text(_docs(1)[0])
    with pytest.raises(DataError, match="has 1 document"):
        _dm(tmp_path, str(tmp_path / "book.txt")).prepare_data()


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_invalid_val_fraction(tmp_path: Path, fraction: float) -> None:
    with pytest.raises(DataError, match=r"data\.val_fraction must lie strictly between 0 and 1"):
        _dm(tmp_path, "unused.jsonl", val_fraction=fraction)


def test_missing_or_corrupt_tokenizer(tmp_path: Path) -> None:
    source = str(_jsonl(tmp_path / "c.jsonl", _docs(5)))
    with pytest.raises(DataError, match=r"data\.tokenizer: no file"):
        _dm(tmp_path, source, tokenizer=str(tmp_path / "nope.json")).prepare_data()
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match=r"data\.tokenizer: .*not a valid tokenizer\.json"):
        _dm(tmp_path, source, tokenizer=str(tmp_path / "bad.json")).prepare_data()


def test_bad_loader_settings(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.num_proc must be a positive"):
        _dm(tmp_path, "x.jsonl", num_proc=-1)
    with pytest.raises(DataError, match=r"data\.seq_len"):
        _dm(tmp_path, "x.jsonl", seq_len=0)
    with pytest.raises(DataError, match=r"data\.vocab_size=100"):
        _dm(tmp_path, str(_jsonl(tmp_path / "c.jsonl", _docs(5))), vocab_size=100).prepare_data()


def test_constructor_help_comes_from_docstring() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(TokenDataModule, "data")
    help_text = parser.format_help()
    assert "Share of documents held out for validation" in help_text
    assert parser.parse_args(["--data.seq_len=64"]).data.seq_len == 64


def test_a_hub_dataset_is_loaded_by_name_subset_and_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    calls = []

    def load_dataset(name, subset, split):
        calls.append((name, subset, split))
        return datasets.Dataset.from_dict({"content": _docs(30)})

    monkeypatch.setattr(sources.datasets, "load_dataset", load_dataset)
    dm = _dm(
        tmp_path, "someone/web-corpus", hub_subset="sample-10BT", hub_split="train", text_field="content"
    )
    dm.prepare_data()
    assert calls == [("someone/web-corpus", "sample-10BT", "train")]
    other = _dm(tmp_path, "someone/web-corpus", hub_subset="sample-100BT", text_field="content")
    assert other.spec.key() != dm.spec.key()  # another subset is another cache
