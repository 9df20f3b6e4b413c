"""Tokenise the corpus once into memory-mappable shard files, cached by a hash of everything that shapes them.

A cache folder ``<cache_dir>/<key>/`` holds ``tokenizer.json``, ``train.bin``, ``val.bin`` (flat token ids,
an EOS after every document) and ``manifest.json``, which records the SHA-256 of the tokenizer and of every
shard. Every file is written under a temporary name and moved in place with :func:`os.replace`, and the
manifest is written last, so a crash never leaves a folder that looks complete.

Before a cache is used its files are checked against the manifest, sizes and checksums alike, so a shard
damaged in place (flipped bytes, zeroed pages, even valid but wrong token ids) is caught before training.
A damaged cache is rebuilt with a warning naming the file rather than refused: the shards are derived data
that the source reproduces exactly, so rebuilding costs minutes and no user decision. Hashing is cheap:
SHA-256 runs at ~1.1 GB/s (hashlib, measured on the 2-core dev machine): checking the shipped corpus's
cache (4.3 MB of shards) takes 8 ms, against a training start of several seconds.

Checking and building happen under a lock file in the cache folder (:mod:`filelock`), so processes that
want the same cache at once (two ``fit`` runs, DDP ranks) build it once; the others wait, then reuse it.
Whoever holds the lock first removes what a killed build left (temp files, the ``hf/`` working folder).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from filelock import FileLock, Timeout
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from sa_train.data import sources
from sa_train.data.tokenizer import check_tokenizer_path, eos_token_id, file_sha256, load_tokenizer, train_bpe
from sa_train.errors import DataError

MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
LOCK_FILE = ".build.lock"
HF_WORK_DIR = "hf"
# Every temp file of a build ends in this marker plus the writer's pid, e.g. ``train.bin.tmp1234``.
TMP_MARKER = ".tmp"
SPLITS = ("train", "val", "test")
# Bump when the shard layout, manifest or tokenisation rules change, so old caches are not reused.
FORMAT_VERSION = 3
# Below this many documents per process, forking costs more than it saves (the Rust encoder is threaded).
_DOCS_PER_PROCESS = 256


@dataclass(frozen=True)
class ShardCache:
    """A complete, validated cache folder, as described by its manifest."""

    folder: str
    dtype: str
    vocab_size: int
    eos_token_id: int
    tokenizer_sha256: str
    train_tokens: int
    val_tokens: int
    test_tokens: int
    train_docs: int
    val_docs: int
    test_docs: int
    shard_sha256: dict[str, str]
    format_version: int = FORMAT_VERSION

    @property
    def tokenizer_path(self) -> str:
        return os.path.join(self.folder, TOKENIZER_FILE)

    def shard_path(self, split: str) -> str:
        return os.path.join(self.folder, f"{split}.bin")

    def num_tokens(self, split: str) -> int:
        return {"train": self.train_tokens, "val": self.val_tokens, "test": self.test_tokens}[split]


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves disk and page-cache use whenever every id fits; larger vocabularies need uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass(frozen=True)
class CorpusSpec:
    """Everything that shapes the shards; ``seq_len`` and ``batch_size`` deliberately do not."""

    source: str | list[str]
    text_field: str
    tokenizer: str | None
    vocab_size: int
    val_fraction: float
    test_fraction: float
    seed: int
    hub_split: str
    hub_subset: str | None = None
    tokenizer_docs: int | None = None

    def key(self) -> str:
        """Hash naming the cache folder: file fingerprints (path, size, mtime) or hub name, and settings."""
        parts = {
            "format": FORMAT_VERSION,
            "source": sources.source_fingerprint(self.source, self.hub_split, self.hub_subset),
            "tokenizer_docs": None if self.tokenizer else self.tokenizer_docs,
            "text_field": self.text_field,
            "tokenizer": file_sha256(check_tokenizer_path(self.tokenizer)) if self.tokenizer else None,
            "vocab_size": None if self.tokenizer else self.vocab_size,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "seed": self.seed,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _tmp_name(path: str) -> str:
    return f"{path}{TMP_MARKER}{os.getpid()}"


def _atomic_write_text(path: str, text: str) -> None:
    tmp = _tmp_name(path)
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def read_cache(folder: str) -> ShardCache | None:
    """Return the cache in ``folder`` if it is complete and consistent, else ``None`` (warning if damaged)."""
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.exists(manifest_path):
        return None
    try:
        with open(manifest_path, encoding="utf-8") as fh:
            cache = ShardCache(**{**json.load(fh), "folder": folder})
    except (ValueError, TypeError) as exc:
        return _damaged(folder, f"its manifest is unreadable ({exc})")
    if cache.format_version != FORMAT_VERSION:
        return _damaged(folder, f"it has format version {cache.format_version}, expected {FORMAT_VERSION}")
    if (
        not os.path.exists(cache.tokenizer_path)
        or file_sha256(cache.tokenizer_path) != cache.tokenizer_sha256
    ):
        return _damaged(folder, "its tokenizer.json is missing or was modified")
    itemsize = np.dtype(cache.dtype).itemsize
    for split in SPLITS:
        path = cache.shard_path(split)
        expected = cache.num_tokens(split) * itemsize
        actual = os.path.getsize(path) if os.path.exists(path) else None
        if actual != expected:
            return _damaged(folder, f"{path} has {actual} bytes where the manifest says {expected}")
    for split in SPLITS:
        path = cache.shard_path(split)
        if file_sha256(path) != cache.shard_sha256.get(split):
            return _damaged(folder, f"{path} does not match its checksum in the manifest (changed in place)")
    return cache


def _damaged(folder: str, why: str) -> None:
    warnings.warn(
        f"The token cache {folder} is damaged: {why}. Rebuilding it from data.source automatically.",
        stacklevel=4,
    )
    return None


_ENCODERS: dict[str, Tokenizer] = {}


def encode_documents(batch: dict[str, list[str]], tokenizer_json: str, eos_id: int) -> dict[str, list[Any]]:
    """``datasets.map`` worker: token ids of each document with EOS appended, plus their count."""
    if tokenizer_json not in _ENCODERS:  # parse once per process, not once per batch
        _ENCODERS[tokenizer_json] = Tokenizer.from_str(tokenizer_json)
    tokenizer = _ENCODERS[tokenizer_json]
    encodings = tokenizer.encode_batch_fast(batch["text"], add_special_tokens=False)
    ids = [[*enc.ids, eos_id] for enc in encodings]
    return {"ids": ids, "length": [len(x) for x in ids]}


def _write_shard(path: str, ids: pa.ChunkedArray, dtype: np.dtype, split: str) -> str:
    """Append the documents' ids chunk by chunk (the map's on-disk record batches), so memory holds one
    chunk, never the split's whole token stream; returns the shard's SHA-256."""
    tmp = _tmp_name(path)
    with open(tmp, "wb") as out:
        for chunk in tqdm(ids.chunks, desc=f"Writing {split}.bin", unit="chunk", disable=None):
            out.write(chunk.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False).tobytes())
        out.flush()
        os.fsync(out.fileno())
    digest = file_sha256(tmp)
    os.replace(tmp, path)
    return digest


def _processes(num_proc: int | None, num_docs: int) -> int:
    if num_proc is None:
        wanted = min(os.cpu_count() or 1, 8)
        return max(1, min(wanted, num_docs // _DOCS_PER_PROCESS))
    return max(1, min(num_proc, num_docs))


def _tokenise_split(
    docs: datasets.Dataset, split: str, tokenizer: Tokenizer, eos_id: int, num_proc: int | None
) -> datasets.Dataset:
    procs = _processes(num_proc, len(docs))
    if procs > 1:
        # The forked workers each encode serially; saying so up front silences the tokenizers fork warning.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return docs.map(
        encode_documents,
        batched=True,
        batch_size=64,
        num_proc=procs if procs > 1 else None,
        fn_kwargs={"tokenizer_json": tokenizer.to_str(), "eos_id": eos_id},
        remove_columns=docs.column_names,
        desc=f"Tokenising {split}",
    )


def remove_build_leftovers(folder: str) -> None:
    """Delete the temp files and the ``hf/`` working folder that a killed build left; call under the lock."""
    shutil.rmtree(os.path.join(folder, HF_WORK_DIR), ignore_errors=True)
    for name in os.listdir(folder):
        if name.rpartition(TMP_MARKER)[2].isdigit():
            os.remove(os.path.join(folder, name))


@contextlib.contextmanager
def _bars_only_on_a_terminal() -> Iterator[None]:
    """datasets' progress bars while stderr is a terminal, none in a log: there a tiny corpus's build
    wrote eight bars (loading, filtering, tokenising and writing each split), each as its 0% and 100%
    lines, where the one summary line the build ends with says what happened."""
    if sys.stderr.isatty() or not datasets.is_progress_bar_enabled():
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


def build_cache(folder: str, spec: CorpusSpec, num_proc: int | None) -> ShardCache:
    """:func:`_build_cache`, with progress bars only on a terminal."""
    with _bars_only_on_a_terminal():
        return _build_cache(folder, spec, num_proc)


def _build_cache(folder: str, spec: CorpusSpec, num_proc: int | None) -> ShardCache:
    """Load, split, obtain the tokenizer, tokenise and write the shards and manifest into ``folder``.

    The caller holds the folder's lock and has removed a killed build's leftovers (:func:`ensure_cache`);
    the folder may still hold a damaged older build, whose manifest goes first.
    """
    os.makedirs(folder, exist_ok=True)
    manifest_path = os.path.join(folder, MANIFEST)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)
    docs = sources.load_documents(
        spec.source, spec.text_field, spec.hub_split, os.path.join(folder, HF_WORK_DIR), spec.hub_subset
    )
    parts = sources.split_documents(docs, spec.val_fraction, spec.test_fraction, spec.seed)
    splits = dict(zip(SPLITS, parts, strict=True))
    if spec.tokenizer:
        user_path = check_tokenizer_path(spec.tokenizer)
        tok = load_tokenizer(user_path)
        eos_id = eos_token_id(tok, user_path)
    else:
        sample = splits["train"]
        if spec.tokenizer_docs is not None and spec.tokenizer_docs < len(sample):
            sample = sample.select(range(spec.tokenizer_docs))
        tok = train_bpe(sample, spec.vocab_size)
        eos_id = eos_token_id(tok, "the trained tokenizer")
    tokenizer_path = os.path.join(folder, TOKENIZER_FILE)
    _atomic_write_text(tokenizer_path, tok.to_str())
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab)
    counts, digests = {}, {}
    for split, split_docs in splits.items():
        encoded = _tokenise_split(split_docs, split, tok, eos_id, num_proc)
        counts[split] = pc.sum(encoded.data.column("length")).as_py() or 0
        digests[split] = _write_shard(
            os.path.join(folder, f"{split}.bin"), encoded.data.column("ids"), dtype, split
        )
    cache = ShardCache(
        folder=folder,
        dtype=dtype.name,
        vocab_size=vocab,
        eos_token_id=eos_id,
        tokenizer_sha256=file_sha256(tokenizer_path),
        train_tokens=counts["train"],
        val_tokens=counts["val"],
        test_tokens=counts["test"],
        train_docs=len(splits["train"]),
        val_docs=len(splits["val"]),
        test_docs=len(splits["test"]),
        shard_sha256=digests,
    )
    shutil.rmtree(os.path.join(folder, HF_WORK_DIR), ignore_errors=True)
    manifest = {k: v for k, v in asdict(cache).items() if k != "folder"}
    _atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return cache


def ensure_cache(spec: CorpusSpec, cache_dir: str, num_proc: int | None) -> tuple[ShardCache, bool]:
    """Return the valid cache for ``spec``, building it first if needed; the flag says if it was built.

    Holds the folder's lock throughout, so a concurrent build of the same cache is waited for, not raced.
    """
    folder = os.path.join(os.path.abspath(cache_dir), spec.key())
    lock = FileLock(os.path.join(folder, LOCK_FILE))
    try:
        os.makedirs(folder, exist_ok=True)
        try:
            lock.acquire(timeout=1)
        except Timeout:
            print(
                f"Waiting for another process to finish building the token cache {folder} ...",
                file=sys.stderr,
            )
            lock.acquire()
    except OSError as exc:
        cache = read_cache(folder) if os.path.isdir(folder) else None
        if cache is not None:  # a read-only cache, prepared elsewhere: nobody can write it, so no lock needed
            return cache, False
        raise DataError(
            f"data.cache_dir: cannot create or lock the token cache folder {folder} ({exc.strerror}). Set "
            "data.cache_dir to a folder you can write to."
        ) from exc
    try:
        remove_build_leftovers(folder)
        cache = read_cache(folder)
        if cache is not None:
            return cache, False
        return build_cache(folder, spec, num_proc), True
    finally:
        lock.release()
