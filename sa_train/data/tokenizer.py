"""Obtain the tokenizer: load a ``tokenizer.json`` or train a byte-level BPE on the training documents."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator

import datasets
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from sa_train.errors import DataError

EOS_TOKEN = "<|endoftext|>"
# End-of-document markers of common pretrained tokenizers, accepted when a user brings their own.
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>")


def file_sha256(path: str) -> str:
    """Content hash: keys the cache on a user tokenizer, so editing the file invalidates the shards."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_tokenizer_path(path: str) -> str:
    """Return the absolute path of an existing tokenizer file or raise :class:`DataError`."""
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(full):
        raise DataError(
            f"data.tokenizer: no file at {path!r}. Give the path of a Hugging Face tokenizer.json, "
            "or leave data.tokenizer unset (null) to train a byte-level BPE of data.vocab_size on the corpus."
        )
    return full


def load_tokenizer(path: str) -> Tokenizer:
    """Load a ``tokenizer.json``, turning parse errors into :class:`DataError`."""
    try:
        return Tokenizer.from_file(path)
    except Exception as exc:
        raise DataError(
            f"data.tokenizer: {path!r} is not a valid tokenizer.json ({exc}). Use a file saved by the "
            "Hugging Face `tokenizers` library, or leave data.tokenizer unset to train one."
        ) from exc


def eos_token_id(tokenizer: Tokenizer, path: str) -> int:
    """The id of the end-of-document token that separates documents in the token stream."""
    for token in _EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise DataError(
        f"data.tokenizer: {path!r} has none of the end-of-document tokens {list(_EOS_CANDIDATES)}; documents "
        f"could not be separated. Add {EOS_TOKEN!r} as a special token, or leave data.tokenizer unset."
    )


def _text_batches(ds: datasets.Dataset, batch_size: int = 256) -> Iterator[list[str]]:
    for start in range(0, len(ds), batch_size):
        yield ds[start : start + batch_size]["text"]


def train_bpe(train_docs: datasets.Dataset, vocab_size: int) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE (no unknown tokens) with ``EOS_TOKEN`` as its only special token.

    ``vocab_size`` counts the 256 byte symbols and the special token, so it must exceed 257.
    """
    if vocab_size <= 257:
        raise DataError(
            f"data.vocab_size={vocab_size} is too small for a byte-level BPE: it needs the 256 byte symbols "
            "plus the end-of-text token plus merges. Use at least 300 (4096 suits small corpora)."
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),  # in a log its bars were blank lines
    )
    tokenizer.train_from_iterator(_text_batches(train_docs), trainer=trainer, length=len(train_docs))
    return tokenizer
