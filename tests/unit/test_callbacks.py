"""Callbacks of the training layer on tiny in-memory runs."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from sa_train import SAConfig, SAModel
from sa_train.callbacks import (
    AttentionSimilarity,
    StepProgressBar,
    TrainingThroughput,
)
from sa_train.cost import kv_cache_bytes_per_token
from sa_train.dtypes import precision_dtype
from sa_train.errors import ConfigError
from sa_train.measure import measure_decode, measure_matmul_flops
from sa_train.tools.plot import read_metrics
from sa_train.training import CausalLM

CONFIG = SAConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=8, sa_groups="every:2")


def batches(n: int) -> DataLoader:
    tokens = torch.randint(0, 64, (2 * n, 9), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=2)


def test_step_progress_bar_counts_optimizer_steps_across_epochs(tmp_path):
    bar = StepProgressBar()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=7,
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        limit_val_batches=0,
        callbacks=[bar],
    )
    trainer.fit(CausalLM(CONFIG, warmup_steps=1), train_dataloaders=batches(3))  # 3 batches an epoch
    assert trainer.current_epoch == 3 and trainer.global_step == 7
    assert bar.train_progress_bar.total == 7 and bar.train_progress_bar.n == 7
    assert "v_num" not in bar.get_metrics(trainer, trainer.lightning_module)


def test_step_progress_bar_of_a_run_resumed_mid_epoch_counts_from_the_restored_step(tmp_path):
    """Lightning calls no on_train_epoch_start in an epoch it resumes: the bar printed ``9/?``."""
    settings = dict(accelerator="cpu", logger=False, enable_model_summary=False, limit_val_batches=0)
    saver = ModelCheckpoint(tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    first = L.Trainer(max_steps=4, callbacks=[saver, StepProgressBar()], **settings)
    first.fit(CausalLM(CONFIG, warmup_steps=1), train_dataloaders=batches(20))
    bar = StepProgressBar()
    resumed = L.Trainer(max_steps=7, callbacks=[bar], enable_checkpointing=False, **settings)
    resumed.fit(CausalLM(CONFIG, warmup_steps=1), batches(20), ckpt_path=tmp_path / "step=4.ckpt")
    assert resumed.global_step == 7, resumed.current_epoch
    progress = bar.train_progress_bar
    assert (progress.n, progress.total, progress.initial) == (7, 7, 4)  # the rate counts steps 5 to 7


def fit_with_throughput(tmp_path, steps: int, log_every: int, callback: TrainingThroughput) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=log_every,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[callback],
    )
    trainer.fit(CausalLM(CONFIG, warmup_steps=1), train_dataloaders=batches(steps))
    return trainer


def test_throughput_logs_tokens_per_second_and_mfu_below_one(tmp_path):
    logged = fit_with_throughput(tmp_path, 6, 1, TrainingThroughput(window=2)).logged_metrics
    assert logged["train/tokens_per_sec"] > 0 and 0 < logged["train/mfu"] < 1
    assert logged["train/device/tokens_per_sec"] == logged["train/tokens_per_sec"]  # one device


def test_a_short_run_logs_throughput_from_its_first_half(tmp_path):
    """20 steps logged every 5 with the default window of 5 logging steps: no rate at all before."""
    trainer = fit_with_throughput(tmp_path, 20, 5, TrainingThroughput())
    logged = [step for step, _ in read_metrics(Path(trainer.logger.log_dir)).get("train/tokens_per_sec", [])]
    assert logged and logged[0] < 10, logged


def test_throughput_settings_and_peaks():
    with pytest.raises(ConfigError, match="window"):
        TrainingThroughput(window=1)
    assert [precision_dtype(p) for p in ("bf16-mixed", "bf16-true", "16-mixed", "32-true", 64)] == [
        "bf16", "bf16", "fp16", "fp32", "fp32"
    ]  # fmt: skip
    assert measure_matmul_flops(repeats=2) > 1e6


def test_measured_decode_holds_exactly_the_sa_cache():
    model = SAModel(CONFIG)  # 2 layers in one group: 1 key + 2 values per token
    metrics = measure_decode(model, batch_size=3, prompt_len=5, new_tokens=2)
    assert metrics["cost/kv_cache_bytes"] == 3 * (5 + 2) * kv_cache_bytes_per_token(CONFIG, 4)
    assert kv_cache_bytes_per_token(CONFIG, 4) == (2 + 1) * 2 * 16 * 4
    assert metrics["cost/decode_tokens_per_sec"] > 0 and metrics["cost/prefill_ms"] > 0
    assert model.training  # restored


class _Data(L.LightningDataModule):
    def __init__(self, loader: DataLoader) -> None:
        super().__init__()
        self.loader = loader

    def train_dataloader(self) -> DataLoader:
        return self.loader

    def val_dataloader(self) -> DataLoader:
        return self.loader


def test_attention_similarity_is_logged_every_n_steps(tmp_path):
    dense = SAConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, max_seq_len=8)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=CSVLogger(tmp_path),
        limit_val_batches=0,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[AttentionSimilarity(every_n_steps=2)],
    )
    trainer.fit(CausalLM(dense, warmup_steps=1), datamodule=_Data(batches(4)))
    rows = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"attn_sim/0-1", "attn_sim/1-2", "attn_sim/mean"} <= set(header)
    logged = [row for row in rows[1:] if row.split(",")[header.index("attn_sim/mean")]]
    assert [int(row.split(",")[header.index("step")]) for row in logged] == [2, 4]
    assert all(0 <= float(row.split(",")[header.index("attn_sim/0-1")]) <= 1 for row in logged)
