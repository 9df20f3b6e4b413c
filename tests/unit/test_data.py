"""Unit tests of the data pipeline on tiny synthetic corpora."""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from sa_train.data import TokenDataModule, shards, sources
from sa_train.data.datamodule import SHIPPED_CORPUS
from sa_train.data.dataset import PackedTokenDataset
from sa_train.data.loader import EpochBatchSampler, ResumableLoader
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


def _documents_in(dm: TokenDataModule, split: str) -> list[str]:
    """Decode a shard back into documents by cutting at EOS (byte-level BPE is lossless)."""
    tokenizer = Tokenizer.from_file(dm.tokenizer_path)
    tokens = _tokens(dm, split).tolist()
    assert tokens[-1] == dm.eos_token_id
    docs, current = [], []
    for token in tokens:
        if token == dm.eos_token_id:
            docs.append(tokenizer.decode(current))
            current = []
        else:
            current.append(token)
    return docs


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[TokenDataModule, list[str]]:
    tmp_path = tmp_path_factory.mktemp("prepared")
    texts = _docs(40)
    dm = _dm(tmp_path, str(_jsonl(tmp_path / "corpus.jsonl", texts)))
    dm.prepare_data()
    dm.setup()
    return dm, texts


def test_properties_need_prepare(tmp_path: Path) -> None:
    assert getattr(_dm(tmp_path, "unused.jsonl"), "tokenizer_vocab_size", None) is None


def test_prepare_reports_and_exposes_tokenizer(prepared: tuple[TokenDataModule, list[str]]) -> None:
    dm, _ = prepared
    assert dm.tokenizer_vocab_size == 300
    assert os.path.dirname(dm.tokenizer_path) == dm.cache_folder
    assert Tokenizer.from_file(dm.tokenizer_path).id_to_token(dm.eos_token_id) == "<|endoftext|>"
    assert dm.train_tokens == len(_tokens(dm, "train")) and dm.val_tokens == len(_tokens(dm, "val"))
    assert dm.cache.dtype == "uint16"


def test_documents_end_with_eos_and_split_by_document(prepared: tuple[TokenDataModule, list[str]]) -> None:
    dm, texts = prepared
    train, val, test = (_documents_in(dm, split) for split in ("train", "val", "test"))
    assert len(val) == len(test) == 2  # round(40 * 0.05) each
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert sorted(train + val + test) == sorted(texts)


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


def test_packing_targets_are_inputs_shifted(prepared: tuple[TokenDataModule, list[str]]) -> None:
    dm, _ = prepared
    tokens = _tokens(dm, "train").astype(np.int64)
    dataset = PackedTokenDataset(dm.cache.shard_path("train"), dm.cache.dtype, dm.train_tokens, 16)
    assert len(dataset) == (dm.train_tokens - 1) // 16
    inputs, targets = dataset[[0, 3, len(dataset) - 1]]
    assert inputs.shape == targets.shape == (3, 16) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert inputs[1].tolist() == tokens[48:64].tolist() and targets[1].tolist() == tokens[49:65].tolist()
    single_inputs, _ = dataset[3]
    assert torch.equal(single_inputs, inputs[1])
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_loaders_yield_batches_and_val_covers_split(prepared: tuple[TokenDataModule, list[str]]) -> None:
    dm, _ = prepared
    inputs, targets = next(iter(dm.train_dataloader()))
    assert inputs.shape == targets.shape == (4, 16)
    val_batches = list(dm.val_dataloader())
    val_inputs = torch.cat([b[0] for b in val_batches]).flatten()
    assert val_inputs.tolist() == _tokens(dm, "val")[: (dm.val_tokens - 1) // 16 * 16].tolist()


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


def test_order_is_deterministic_per_seed_and_epoch() -> None:
    def order(seed: int, epoch: int) -> list[int]:
        sampler = EpochBatchSampler(50, 4, seed, shuffle=True)
        sampler.set_epoch(epoch)
        return [i for batch in sampler for i in batch]

    assert order(1, 0) == order(1, 0)
    assert sorted(order(1, 0)) == list(range(50))
    assert order(1, 0) != order(2, 0)
    assert order(1, 0) != order(1, 1)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_rank_shards_are_disjoint_equal_and_cover(world_size: int) -> None:
    per_rank = [
        [i for batch in EpochBatchSampler(50, 4, 0, True, rank, world_size) for i in batch]
        for rank in range(world_size)
    ]
    flat = [i for shard in per_rank for i in shard]
    assert len(set(flat)) == len(flat) == 50 // world_size * world_size
    assert len({len(shard) for shard in per_rank}) == 1


def test_resume_offset_starts_at_the_next_batch(prepared: tuple[TokenDataModule, list[str]]) -> None:
    dm, _ = prepared
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(2)
    full = [inputs for inputs, _ in loader]
    resumed = dm.train_dataloader()
    consumed = {"epoch": 2, "batches_consumed": 3, "samples_consumed": 3 * loader.sampler.batch_size}
    resumed.load_state_dict({**loader.state_dict(), **consumed})
    rest = [inputs for inputs, _ in resumed]
    assert len(rest) == len(full) - 3
    assert all(torch.equal(a, b) for a, b in zip(rest, full[3:], strict=True))
    assert len(list(resumed)) == len(full)  # the offset applies to one pass only


def test_resume_state_at_epoch_end_moves_to_next_epoch() -> None:
    sampler = EpochBatchSampler(20, 4, 0, True)
    loader = ResumableLoader(PackedTokenDataset("unused", "uint16", 21, 1), sampler, 0)
    at_end = {"epoch": 3, "batches_consumed": len(loader), "samples_consumed": 20}
    loader.load_state_dict({**loader.state_dict(), **at_end})
    assert (sampler.epoch, sampler.start, len(sampler)) == (4, 0, 5)


def test_changed_order_warns_and_restarts_epoch() -> None:
    """Another seed (or corpus, or seq_len: another number of samples) is another permutation."""
    loader = ResumableLoader(
        PackedTokenDataset("unused", "uint16", 21, 1), EpochBatchSampler(20, 4, 0, True), 0
    )
    with pytest.warns(UserWarning, match="cannot be restored exactly"):
        loader.load_state_dict({**loader.state_dict(), "seed": 8, "epoch": 1, "batches_consumed": 2})
    assert (loader.sampler.epoch, loader.sampler.start, len(loader)) == (1, 0, 5)


@pytest.mark.parametrize(
    ("before", "after"), [((4, 1), (6, 1)), ((4, 2), (3, 3)), ((5, 1), (2, 2)), ((3, 3), (8, 1))]
)
def test_resume_with_another_batch_or_world_size_sees_each_sample_once(before, after) -> None:
    """(batch size, world size) before and after the resume: the epoch goes on from the samples all ranks
    consumed, each sample once, and Lightning's batch count of the epoch ends where the batches do."""
    dataset = PackedTokenDataset("unused", "uint16", 21, 1)
    (size, world), steps = before, 3
    ranks = [
        ResumableLoader(dataset, EpochBatchSampler(50, size, 7, True, r, world), 0) for r in range(world)
    ]
    seen = [i for loader in ranks for batch in list(loader.sampler)[:steps] for i in batch]
    for _ in range(steps):
        ranks[0].mark_consumed()
    state = ranks[0].state_dict()
    assert state["samples_consumed"] == steps * size * world

    (size, world) = after
    resumed = [
        ResumableLoader(dataset, EpochBatchSampler(50, size, 7, True, r, world), 0) for r in range(world)
    ]
    for loader in resumed:
        loader.load_state_dict(state)
    rest = [list(loader.sampler) for loader in resumed]
    seen += [i for batches in rest for batch in batches for i in batch]
    order = np.random.default_rng([7, 0]).permutation(50)
    # Each once, and in the permutation's order: a prefix of it, short only of the < world samples that
    # cannot be dealt equally (they wait for the next epoch, as an epoch's tail always does).
    assert sorted(seen) == sorted(order[: len(seen)].tolist()) and len(seen) > 50 - world
    assert all(len(loader) == steps + len(batches) for loader, batches in zip(resumed, rest, strict=True))
    assert len(list(resumed[0].sampler)) == math.ceil(50 // world / size)  # a later pass: the whole epoch


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


def test_shipped_corpus(tmp_path: Path) -> None:
    start = time.perf_counter()
    dm = TokenDataModule(source=str(SHIPPED_CORPUS), cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    dm.setup()
    assert time.perf_counter() - start < 60
    assert (dm.cache.train_docs, dm.cache.val_docs, dm.cache.test_docs) == (45, 2, 2)
    assert dm.tokenizer_vocab_size == 4096 and dm.cache.dtype == "uint16"
    assert dm.train_tokens > 1_500_000 and min(dm.val_tokens, dm.cache.test_tokens) > dm.hparams.seq_len


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
