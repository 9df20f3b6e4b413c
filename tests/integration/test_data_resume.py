"""Resuming from a mid-epoch checkpoint continues with exactly the batches an uninterrupted run would see."""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from sa_train.data import TokenDataModule

WORDS = "the king queen sword crown night day love death speak hath thou art sir lord lady"
TOTAL_STEPS = 16


def _corpus(path: Path) -> Path:
    rng = random.Random(0)
    with path.open("w") as fh:
        for i in range(30):
            fh.write(
                json.dumps({"id": i, "text": " ".join(rng.choices(WORDS.split(), k=rng.randint(20, 60)))})
                + "\n"
            )
    return path


class TinyLM(L.LightningModule):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, 8)
        self.head = torch.nn.Linear(8, vocab_size)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        return torch.nn.functional.cross_entropy(
            self.head(self.embed(inputs)).flatten(0, 1), targets.flatten()
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._loss(batch)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class BatchRecorder(Callback):
    """Hashes every training batch and notes the optimizer step count after it."""

    def __init__(self) -> None:
        self.hashes: list[str] = []
        self.samples: list[str] = []
        self.steps_after: list[int] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx
    ) -> None:
        self.hashes.append(hashlib.sha1(batch[0].numpy().tobytes()).hexdigest())
        self.samples += [hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in batch[0]]

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        self.steps_after.append(trainer.global_step)


def _fit(
    tmp_path: Path,
    corpus: Path,
    num_workers: int,
    accumulate: int,
    max_steps: int = TOTAL_STEPS,
    ckpt_path: str | None = None,
    batch_size: int = 8,
) -> tuple[BatchRecorder, TokenDataModule]:
    """Train ``TinyLM``, checkpointing after every optimizer step, as a run that may crash would."""
    dm = TokenDataModule(
        source=str(corpus),
        vocab_size=300,
        seq_len=32,
        batch_size=batch_size,
        cache_dir=str(tmp_path / "cache"),
        num_workers=num_workers,
        num_proc=1,
    )
    recorder = BatchRecorder()
    checkpoints = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1
    )
    callbacks: list[Callback] = [recorder, checkpoints]
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
        num_sanity_val_steps=1,
        default_root_dir=tmp_path,
    )
    dm.prepare_data()
    dm.setup()
    trainer.fit(TinyLM(dm.tokenizer_vocab_size), datamodule=dm, ckpt_path=ckpt_path)
    return recorder, dm


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("num_workers", "accumulate"), [(0, 1), (0, 2), (1, 2)])
def test_resume_mid_epoch_repeats_uninterrupted_order(
    tmp_path: Path, num_workers: int, accumulate: int
) -> None:
    corpus = _corpus(tmp_path / "c.jsonl")
    full, dm = _fit(tmp_path / "full", corpus, num_workers, accumulate)
    # Lightning also steps after a short accumulation at the end of an epoch.
    steps_per_epoch = math.ceil(len(dm.train_dataloader()) / accumulate)
    assert 2 * steps_per_epoch < TOTAL_STEPS, "the run must cross at least two epoch boundaries"
    # Stop mid-way through the second epoch, and exactly at the end of the first; then resume to TOTAL_STEPS.
    for stop in (steps_per_epoch + steps_per_epoch // 2, steps_per_epoch):
        run = tmp_path / f"stop{stop}"
        first, _ = _fit(run, corpus, num_workers, accumulate, max_steps=stop)
        consumed = len(first.hashes)
        assert first.hashes == full.hashes[:consumed] and full.steps_after[consumed - 1] == stop
        resumed, _ = _fit(run, corpus, num_workers, accumulate, ckpt_path=str(run / f"ckpt/step={stop}.ckpt"))
        assert resumed.hashes == full.hashes[consumed:], f"resume after step {stop} diverged"


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("after", [4, 12])
def test_a_resume_with_another_batch_size_goes_on_with_the_next_sample(tmp_path: Path, after: int) -> None:
    """A real fit with batch 8 stopped after 3 steps, resumed with batch ``after``: the samples trained on,
    before and after, are the uninterrupted run's sequence of samples, none twice and none skipped."""
    corpus = _corpus(tmp_path / "c.jsonl")
    full, dm = _fit(tmp_path / "full", corpus, num_workers=0, accumulate=1)
    epoch = dm.train_dataloader().sampler.usable  # samples in an epoch on one rank
    run = tmp_path / "run"
    first, _ = _fit(run, corpus, num_workers=0, accumulate=1, max_steps=3)
    steps = (epoch - len(first.samples)) // after  # the rest of the first epoch, in whole batches
    resumed, _ = _fit(
        run, corpus, 0, 1, max_steps=3 + steps, ckpt_path=str(run / "ckpt/step=3.ckpt"), batch_size=after
    )
    seen = first.samples + resumed.samples
    assert len(resumed.samples) == steps * after > 0
    assert seen == full.samples[: len(seen)]
