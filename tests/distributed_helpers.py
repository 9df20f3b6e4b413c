"""Test-only Lightning pieces for the distributed tests: DeepSpeed on CPU, and callbacks that record what
a multi-process run did (global loss, cluster environment) or stop it as a preemption would.

Lightning's strategy refuses any accelerator but CUDA, yet DeepSpeed itself trains on CPU with its CPU
accelerator (``DS_ACCELERATOR=cpu``) over gloo, with a plain torch optimizer so no op gets compiled
(measured: a 2-process ZeRO-2 or ZeRO-3 run of the tiny test model costs ~10 s of CPU, nearly all of it
Python start-up; training 8 steps takes under a second). Three spots of Lightning's strategy
assume CUDA; :class:`CPUDeepSpeedStrategy` replaces just those. It lives in tests/ because nobody should
train a real model this way: it exists so the DeepSpeed path of sa_train runs for real in CI.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

# DeepSpeed picks its accelerator when first imported; without a GPU it must be told to use the CPU.
os.environ.setdefault("DS_ACCELERATOR", "cpu")


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeedStrategy for ``accelerator="cpu"`` (gloo is chosen for CPU devices by Lightning itself)."""

    def setup_environment(self) -> None:
        # Skips DeepSpeedStrategy's CUDA-only check; the DDP set-up underneath is device-agnostic.
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        # DeepSpeed would compile its shared-memory all-reduce with g++ on first use (35-75 s on a fresh
        # machine); torch's gloo all-reduce does the same job for two tiny processes.
        import deepspeed.ops
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
        # Lightning checks that CUDA device indices equal local ranks; CPU devices carry no index.
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        # deepspeed.initialize takes the device rank from this device's index (None for plain "cpu").
        # torch places tensors for "cpu:N" on the one CPU device.
        return torch.device("cpu", self.local_rank)


class GlobalLossRecorder(Callback):
    """Writes the training loss of every batch, averaged over all ranks, to a JSON list.

    Each rank logs only its own micro-batch loss; the mean over ranks is the loss of the global batch, which
    a single process with ``world_size`` times the batch size computes on the same samples.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.losses: list[float] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = trainer.strategy.reduce(trainer.callback_metrics["train/loss"].clone(), reduce_op="mean")
        self.losses.append(float(loss))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.losses))


class StopAtStep(Callback):
    """Stops training after optimizer step ``step``, as a preempted job would, leaving ``max_steps`` (and so
    the learning-rate schedule) as it was. Checkpoint callbacks then write ``last`` at that step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class ClusterReport(Callback):
    """Each rank writes ``<folder>/restart<R>-rank<N>.json`` (R: the Slurm restart count): the cluster
    environment Lightning detected, the world it joined, and the Slurm node it ran on."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        report = {
            "environment": type(trainer.strategy.cluster_environment).__name__,
            "world_size": trainer.world_size,
            "global_rank": trainer.global_rank,
            "node_rank": trainer.node_rank,
            "num_nodes": trainer.num_nodes,
            "slurm_node": os.environ.get("SLURMD_NODENAME"),
            "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"restart{report['restart_count']}-rank{trainer.global_rank}.json"
        (self.folder / name).write_text(json.dumps(report))


class PauseForPreemption(Callback):
    """On a Slurm job's first run, holds every rank after optimizer step ``step`` for up to ``seconds``.

    A real training step takes seconds, the tiny test model's milliseconds: without the pause the job could
    finish before the test's SIGUSR1 arrives. Each rank touches ``<marker>.<rank>`` when it starts waiting,
    which tells the test when to signal. Lightning's handler runs during the wait, saves the checkpoint and
    requeues the job; Slurm then kills it. A requeued run (SLURM_RESTART_COUNT > 0) does not pause.
    """

    def __init__(self, step: int, marker: str, seconds: float = 120.0) -> None:
        self.step = step
        self.marker = marker
        self.seconds = seconds

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step != self.step or os.environ.get("SLURM_RESTART_COUNT", "0") != "0":
            return
        Path(f"{self.marker}.{trainer.global_rank}").touch()
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline:
            time.sleep(0.2)


class StepMarker(Callback):
    """Rank 0 writes the optimizer step it has reached to ``path`` after every batch (replaced whole), so a
    test can kill a run at a chosen point of training without guessing from the clock."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.is_global_zero:
            partial = self.path.with_suffix(".partial")
            partial.write_text(str(trainer.global_step))
            os.replace(partial, self.path)
