"""Unit tests of the data pipeline on tiny synthetic corpora: what a prepared TokenDataModule holds
and serves. Its properties, shards split by document with EOS after each, the packed dataset, the
loaders, and the epoch batch sampler and resumable loader (order per seed and epoch, rank shards, resume
mid-epoch, at the epoch's end, with another order, batch or world size)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_cache import _dm, _docs, _jsonl, _tokens
from tokenizers import Tokenizer

from sa_train.data import TokenDataModule
from sa_train.data.dataset import PackedTokenDataset
from sa_train.data.loader import EpochBatchSampler, ResumableLoader


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
