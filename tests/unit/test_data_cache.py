"""Unit tests of the data pipeline on tiny synthetic corpora: building the token cache. The document
split, the BPE and user tokenizers and the token dtype, reuse of a built cache, parallel and streamed
tokenisation, damaged or corrupted shards rebuilt, a killed build's leftovers, read-only and uncreatable
cache folders, and the shipped corpus.

The tiny corpora and datamodules (WORDS, _docs, _jsonl, _dm, _tokens) are made here; test_data_loading
and test_data_sources import them."""

from __future__ import annotations

import json
import os
import random
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from sa_train.data import TokenDataModule, shards, sources
from sa_train.data.datamodule import SHIPPED_CORPUS
from sa_train.errors import DataError

WORDS = "the king queen sword crown night day love death speak hath thou art sir lord lady"


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"doc{i} " + " ".join(rng.choices(WORDS.split(), k=rng.randint(20, 60))) for i in range(n)]


def _jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    with path.open("w") as fh:
        for i, text in enumerate(texts):
            fh.write(json.dumps({"id": i, field: text}) + "\n")
    return path


def _dm(tmp_path: Path, source: str | list[str], **kwargs) -> TokenDataModule:
    options = {
        "vocab_size": 300,
        "seq_len": 16,
        "batch_size": 4,
        "cache_dir": str(tmp_path / "cache"),
        "num_proc": 1,
    }
    return TokenDataModule(source=source, **{**options, **kwargs})


def _tokens(dm: TokenDataModule, split: str) -> np.ndarray:
    cache = dm.cache
    return np.fromfile(cache.shard_path(split), dtype=cache.dtype)


def test_split_is_deterministic_from_seed() -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"text": _docs(100)})
    val_a = sources.split_documents(ds, 0.2, 0.1, seed=1)[1]["text"]
    assert val_a == sources.split_documents(ds, 0.2, 0.1, seed=1)[1]["text"]
    assert val_a != sources.split_documents(ds, 0.2, 0.1, seed=2)[1]["text"]
    # adding the test split left the val documents of the two-way split unchanged (first of one permutation)
    order = np.random.default_rng(1).permutation(100)
    assert val_a == [ds[int(i)]["text"] for i in sorted(order[:20])]
    three = sources.split_documents(ds.select(range(3)), 0.01, 0.01, seed=0)
    assert [len(part) for part in three] == [1, 1, 1]  # at least one val and one test doc
    with pytest.raises(DataError, match=r"data\.test_fraction"):
        sources.split_documents(ds, 0.5, 0.5, seed=0)


def test_second_prepare_reuses_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = str(_jsonl(tmp_path / "c.jsonl", _docs(20)))
    _dm(tmp_path, source).prepare_data()
    folder = _dm(tmp_path, source).spec.key()
    manifest = tmp_path / "cache" / folder / shards.MANIFEST
    before = manifest.stat().st_mtime_ns
    capsys.readouterr()
    again = _dm(tmp_path, source)
    again.prepare_data()
    assert manifest.stat().st_mtime_ns == before
    assert "found at" in capsys.readouterr().out
    assert _dm(tmp_path, source, seed=7).spec.key() != folder  # a different split is a different cache


def test_parallel_tokenisation_matches_serial(tmp_path: Path) -> None:
    source = str(_jsonl(tmp_path / "c.jsonl", _docs(30)))
    serial = _dm(tmp_path / "a", source)
    parallel = _dm(tmp_path / "b", source, num_proc=2)
    serial.prepare_data()
    parallel.prepare_data()
    for split in ("train", "val"):
        assert np.array_equal(_tokens(serial, split), _tokens(parallel, split))


def test_damaged_shard_is_rebuilt_with_warning(tmp_path: Path) -> None:
    dm = _dm(tmp_path, str(_jsonl(tmp_path / "c.jsonl", _docs(20))))
    dm.prepare_data()
    shard = Path(dm.cache.shard_path("train"))
    expected = shard.read_bytes()
    shard.write_bytes(expected[:-6])
    with pytest.warns(UserWarning, match="damaged.*train.bin"):
        dm.setup()
    assert shard.read_bytes() == expected


def _flip_bytes(data: bytes) -> bytes:
    return bytes(b ^ 0xFF if i % 97 == 0 else b for i, b in enumerate(data))


def _zero_a_page(data: bytes) -> bytes:
    return data[:64] + bytes(len(data) - 128) + data[-64:]


def _shuffle_valid_ids(data: bytes) -> bytes:
    ids = np.frombuffer(data, dtype=np.uint16).copy()
    np.random.default_rng(0).shuffle(ids)  # every id stays a valid token; the text is garbage
    return ids.tobytes()


@pytest.mark.parametrize("corrupt", [_flip_bytes, _zero_a_page, _shuffle_valid_ids])
def test_shard_corrupted_in_place_is_caught_and_rebuilt(tmp_path: Path, corrupt) -> None:
    dm = _dm(tmp_path, str(_jsonl(tmp_path / "c.jsonl", _docs(20))))
    dm.prepare_data()
    shard = Path(dm.cache.shard_path("train"))
    expected = shard.read_bytes()
    shard.write_bytes(corrupt(expected))
    assert shard.stat().st_size == len(expected)
    again = _dm(tmp_path, dm.spec.source)
    with pytest.warns(UserWarning, match=f"{re.escape(str(shard))} does not match its checksum"):
        again.setup()
    assert shard.read_bytes() == expected
    assert again._datasets["train"].tokens.tobytes() == expected


def test_a_killed_builds_leftovers_are_removed(tmp_path: Path) -> None:
    dm = _dm(tmp_path, str(_jsonl(tmp_path / "c.jsonl", _docs(20))))
    dm.prepare_data()
    folder = Path(dm.cache.folder)
    (folder / "manifest.json").unlink()  # a kill mid-rebuild: no manifest, temp files, the working folder
    (folder / "train.bin.tmp4242").write_bytes(b"\0" * 1000)
    (folder / "manifest.json.tmp4242").write_text("{")
    (folder / shards.HF_WORK_DIR / "json").mkdir(parents=True)
    _dm(tmp_path, dm.spec.source).prepare_data()
    assert sorted(p.name for p in folder.iterdir()) == [
        shards.LOCK_FILE,
        "manifest.json",
        "test.bin",
        "tokenizer.json",
        "train.bin",
        "val.bin",
    ]


def test_a_read_only_cache_is_used_without_a_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dm = _dm(tmp_path, str(_jsonl(tmp_path / "c.jsonl", _docs(20))))
    dm.prepare_data()

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(shards.FileLock, "acquire", read_only)  # as on a read-only mount
    again = _dm(tmp_path, dm.spec.source)
    again.setup()
    assert again.cache == dm.cache
    with pytest.raises(DataError, match="Permission denied"):  # nothing valid there: it cannot be built
        _dm(tmp_path, dm.spec.source, seed=99).prepare_data()


def test_cache_folder_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    dm = _dm(tmp_path, str(_jsonl(tmp_path / "c.jsonl", _docs(20))), cache_dir=str(blocker / "cache"))
    with pytest.raises(DataError, match=r"data\.cache_dir: cannot create or lock"):
        dm.prepare_data()


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_tokenisation_streams_through_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """When a shard is written, the split's token ids are memory-mapped arrow files on disk, not arrays in
    memory, and arrive in chunks much smaller than the split: memory stays bounded as the corpus grows."""
    texts = _docs(3000)
    if kind == "txt":
        (tmp_path / "corpus").mkdir()
        for i, text in enumerate(texts):
            (tmp_path / "corpus" / f"{i:04d}.txt").write_text(text)
        source = str(tmp_path / "corpus")
    else:
        source = str(_jsonl(tmp_path / "c.jsonl", texts))
    seen = {}
    write_shard = shards._write_shard

    def spy(path: str, ids: pa.ChunkedArray, dtype: np.dtype, split: str) -> str:
        seen[split] = (pa.total_allocated_bytes(), max(len(c.values) for c in ids.chunks), ids.nbytes)
        return write_shard(path, ids, dtype, split)

    monkeypatch.setattr(shards, "_write_shard", spy)
    dm = _dm(tmp_path, source)
    dm.prepare_data()
    in_memory, largest_chunk, ids_bytes = seen["train"]
    assert largest_chunk < dm.train_tokens / 2
    assert in_memory < ids_bytes / 4, (in_memory, ids_bytes)


def test_dtype_choice() -> None:
    assert shards.token_dtype(300) == np.uint16
    assert shards.token_dtype(65536) == np.uint16
    assert shards.token_dtype(65537) == np.uint32


def test_user_tokenizer_with_large_vocab_uses_uint32(tmp_path: Path) -> None:
    vocab = {f"w{i}": i for i in range(70_000)} | {word: 70_000 + i for i, word in enumerate(WORDS.split())}
    vocab |= {"<unk>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    dm = _dm(
        tmp_path, str(_jsonl(tmp_path / "c.jsonl", _docs(10))), tokenizer=str(tmp_path / "tokenizer.json")
    )
    dm.prepare_data()
    assert dm.cache.dtype == "uint32" and dm.tokenizer_vocab_size == len(vocab)
    assert os.path.getsize(dm.cache.shard_path("train")) == 4 * dm.train_tokens
    assert _tokens(dm, "train")[-1] == vocab["<|endoftext|>"] == dm.eos_token_id


def test_shipped_corpus(tmp_path: Path) -> None:
    start = time.perf_counter()
    dm = TokenDataModule(source=str(SHIPPED_CORPUS), cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    dm.setup()
    assert time.perf_counter() - start < 60
    assert (dm.cache.train_docs, dm.cache.val_docs, dm.cache.test_docs) == (45, 2, 2)
    assert dm.tokenizer_vocab_size == 4096 and dm.cache.dtype == "uint16"
    assert dm.train_tokens > 1_500_000 and min(dm.val_tokens, dm.cache.test_tokens) > dm.hparams.seq_len


def test_the_bpe_can_learn_from_the_first_documents_only(tmp_path: Path) -> None:
    import datasets

    from sa_train.data.tokenizer import train_bpe

    texts = _docs(40)
    dm = _dm(tmp_path, str(_jsonl(tmp_path / "c.jsonl", texts)), tokenizer_docs=5)
    dm.prepare_data()
    train, _, _ = sources.split_documents(datasets.Dataset.from_dict({"text": texts}), 0.05, 0.05, seed=1234)
    expected = train_bpe(train.select(range(5)), 300).get_vocab()
    assert Tokenizer.from_file(dm.tokenizer_path).get_vocab() == expected
    assert _dm(tmp_path, dm.spec.source).spec.key() != dm.spec.key()
    with pytest.raises(DataError, match=r"data\.tokenizer_docs"):
        _dm(tmp_path, dm.spec.source, tokenizer_docs=0)
