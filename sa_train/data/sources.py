"""Load a text corpus (local files or a hub dataset) as documents and split it train/val by document.

Every loader returns a :class:`datasets.Dataset` with a single ``text`` column, one row per document, in a
stable order (files sorted by path), so the split and the cache key depend only on the inputs.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np

from sa_train.errors import DataError

_JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
_PARQUET_SUFFIXES = (".parquet",)
_TEXT_SUFFIXES = (".txt",)
_ALL_SUFFIXES = _JSON_SUFFIXES + _PARQUET_SUFFIXES + _TEXT_SUFFIXES


def _format_of(path: str) -> str | None:
    name = path.lower()
    for fmt, suffixes in (("json", _JSON_SUFFIXES), ("parquet", _PARQUET_SUFFIXES), ("text", _TEXT_SUFFIXES)):
        if name.endswith(suffixes):
            return fmt
    return None


def _looks_local(spec: str) -> bool:
    """A spec is a local path if it exists, has a glob or path prefix, or ends with a corpus suffix.

    Anything else (``"roneneldan/TinyStories"``) is treated as a hub dataset name.
    """
    return (
        os.path.exists(spec)
        or any(ch in spec for ch in "*?[")
        or spec.startswith((".", "/", "~"))
        or _format_of(spec) is not None
    )


def is_hub_source(source: str | list[str]) -> bool:
    """True when ``source`` names a single hub dataset rather than local files."""
    return isinstance(source, str) and not _looks_local(source)


def resolve_files(source: str | list[str]) -> list[str]:
    """Expand paths, globs and folders into a sorted list of supported files, or raise :class:`DataError`."""
    specs = [source] if isinstance(source, str) else list(source)
    if not specs:
        raise DataError("data.source is an empty list; give at least one file, glob or hub dataset name.")
    files: list[str] = []
    for spec in specs:
        expanded = os.path.expanduser(spec)
        if os.path.isdir(expanded):
            found = sorted(str(p) for p in Path(expanded).iterdir() if _format_of(p.name) is not None)
            if not found:
                raise DataError(
                    f"data.source: the folder {spec!r} holds no corpus files "
                    f"(expected {', '.join(_ALL_SUFFIXES)})."
                )
        else:
            found = sorted(glob.glob(expanded))
            if not found:
                raise DataError(
                    f"data.source: no file matches {spec!r} (working directory {os.getcwd()}). Check the "
                    "path, or point data.source at an existing .txt, .jsonl, .jsonl.gz or .parquet file, "
                    "a glob or a folder."
                )
        for path in found:
            if _format_of(path) is None:
                raise DataError(
                    f"data.source: {path!r} has an unsupported extension; "
                    f"use one of {', '.join(_ALL_SUFFIXES)}."
                )
        files.extend(os.path.abspath(p) for p in found)
    return files


def source_fingerprint(source: str | list[str], hub_split: str, hub_subset: str | None = None) -> str:
    """A string that changes when the corpus may have: file paths, sizes and mtimes, or the hub name."""
    if is_hub_source(source):
        return json.dumps({"hub": source, "subset": hub_subset, "split": hub_split})
    entries = []
    for path in resolve_files(source):
        stat = os.stat(path)
        entries.append([path, stat.st_size, stat.st_mtime_ns])
    return json.dumps(entries)


def _select_text(ds: datasets.Dataset, text_field: str, where: str) -> datasets.Dataset:
    if text_field not in ds.column_names:
        raise DataError(
            f"data.text_field: {where} has no field {text_field!r}; its fields are {ds.column_names}. "
            "Set data.text_field to the field that holds the document text."
        )
    ds = ds.select_columns([text_field])
    return ds.rename_column(text_field, "text") if text_field != "text" else ds


def _read_text_files(paths: list[str]) -> Iterator[dict[str, str]]:
    for path in paths:
        yield {"text": Path(path).read_text(encoding="utf-8", errors="replace")}


def _load_local(files: list[str], text_field: str, hf_cache: str) -> datasets.Dataset:
    parts: list[datasets.Dataset] = []
    by_format: dict[str, list[str]] = {}
    for path in files:
        by_format.setdefault(_format_of(path) or "", []).append(path)
    for fmt, paths in by_format.items():
        if fmt == "text":
            # One document per .txt file: a file is the natural unit (a book, an article) for split and EOS.
            # Written to arrow files on disk a file at a time, so later steps memory-map it, never hold it.
            parts.append(
                datasets.Dataset.from_generator(
                    _read_text_files, gen_kwargs={"paths": paths}, cache_dir=hf_cache, keep_in_memory=False
                )
            )
            continue
        try:
            ds = datasets.load_dataset(fmt, data_files=paths, split="train", cache_dir=hf_cache)
        except Exception as exc:
            raise DataError(
                f"data.source: could not read {len(paths)} {fmt} file(s) starting with {paths[0]!r}: {exc}. "
                "Check that every line is one JSON object (jsonl) or that the parquet file is intact."
            ) from exc
        parts.append(_select_text(ds, text_field, f"the {fmt} file(s) {paths[0]!r}"))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _load_hub(name: str, text_field: str, split: str, subset: str | None) -> datasets.Dataset:
    """A hub dataset, downloaded into (or read from) the Hugging Face cache."""
    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as exc:
        raise DataError(
            f"data.source: {name!r} is neither an existing local path nor a loadable hub dataset "
            f"(subset data.hub_subset={subset!r}, split data.hub_split={split!r}): {exc}. Fix the path or "
            "the names, or make the dataset available offline in the Hugging Face cache."
        ) from exc
    return _select_text(ds, text_field, f"the hub dataset {name!r}")


def load_documents(
    source: str | list[str], text_field: str, hub_split: str, hf_cache: str, hub_subset: str | None = None
) -> datasets.Dataset:
    """Load the corpus as a ``text``-only dataset minus empty documents; :class:`DataError` if none remain."""
    if is_hub_source(source):
        ds = _load_hub(source, text_field, hub_split, hub_subset)
    else:
        ds = _load_local(resolve_files(source), text_field, hf_cache)
    ds = ds.filter(
        lambda batch: [isinstance(t, str) and bool(t.strip()) for t in batch["text"]],
        batched=True,
        desc="Dropping empty documents",
    )
    if len(ds) == 0:
        raise DataError(
            f"data.source: the corpus {source!r} contains no text (every {text_field!r} value is empty or "
            "missing). "
            "Point data.source at a corpus with text, or data.text_field at the field that holds it."
        )
    return ds


def check_held_out_fractions(val_fraction: float, test_fraction: float) -> None:
    """Reject fractions that cannot leave train, val and test documents."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise DataError(
                f"data.{name} must lie strictly between 0 and 1 (the share of documents held out for "
                f"{name.split('_')[0]}), got {value}. A typical value is 0.05."
            )
    if val_fraction + test_fraction >= 1.0:
        raise DataError(
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} hold out every "
            "document; together they must stay below 1 so the train split keeps some (e.g. 0.05 each)."
        )


def split_documents(
    ds: datasets.Dataset, val_fraction: float, test_fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset, datasets.Dataset]:
    """Split by document into train, val and test, deterministically from ``seed``; no document is in two.

    Val gets ``round(n * val_fraction)`` documents and test ``round(n * test_fraction)``, each at least
    one; val is drawn first from the seeded permutation, so adding the test split kept the val documents
    of earlier versions (and the evaluation tasks built from them) unchanged.
    """
    check_held_out_fractions(val_fraction, test_fraction)
    n = len(ds)
    if n < 3:
        raise DataError(
            f"data.source: the corpus has {n} document(s), but the train/val/test split is by document and "
            "needs at least three. Split the text into several files (one document per .txt file) or jsonl "
            "lines."
        )
    n_val = min(n - 2, max(1, round(n * val_fraction)))
    n_test = min(n - 1 - n_val, max(1, round(n * test_fraction)))
    order = np.random.default_rng(seed).permutation(n)
    val_idx = np.sort(order[:n_val])
    test_idx = np.sort(order[n_val : n_val + n_test])
    train_idx = np.sort(order[n_val + n_test :])
    return ds.select(train_idx), ds.select(val_idx), ds.select(test_idx)
