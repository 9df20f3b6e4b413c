"""DeepSpeed as sa_train runs it: a check of its settings, and a precision plugin scaling the loss once."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins import DeepSpeedPrecision
from lightning.pytorch.strategies import DeepSpeedStrategy

from sa_train.errors import ConfigError


def check_deepspeed_offload(strategy: DeepSpeedStrategy) -> None:
    """DeepSpeed refuses a client optimizer with optimizer offload (it wants its own CPU Adam, a compiled
    op), and CausalLM builds torch's AdamW; say so before the run instead of from inside deepspeed.initialize.
    """
    zero = strategy.config.get("zero_optimization") or {}
    if zero.get("offload_optimizer") and strategy.config.get("zero_force_ds_cpu_optimizer", True):
        raise ConfigError(
            "trainer.strategy.init_args.offload_optimizer=true: DeepSpeed offloads optimizer states only "
            "with its own CPU Adam, and sa_train's model builds torch's AdamW. Set offload_optimizer to "
            "false."
        )


class DeepSpeedPrecisionScalingOnce(DeepSpeedPrecision):
    """DeepSpeed's precision with one division of the loss by the accumulated batches, not two.

    Lightning divides each micro-batch loss by ``accumulate_grad_batches`` before the backward, and
    DeepSpeed's ``engine.backward`` divides it again by its ``gradient_accumulation_steps`` (which
    Lightning sets to the same number). Measured on two CPU ranks with ZeRO-2, two accumulated batches
    per step: every gradient norm was exactly half that of one process on the same samples. With
    sa-350m's eight the gradients were an eighth, so ``gradient_clip_val: 1.0`` clipped at a true norm
    of 8.
    """

    def backward(
        self, tensor: torch.Tensor, model: LightningModule, optimizer: Any, *args: Any, **kwargs: Any
    ) -> None:
        model.trainer.model.backward(tensor, *args, scale_wrt_gas=False, **kwargs)
