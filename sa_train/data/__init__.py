"""Data pipeline: corpus loading, tokenizer, cached token shards, packed samples and resumable loaders."""

from sa_train.data.datamodule import TokenDataModule

__all__ = ["TokenDataModule"]
