"""The LightningModule: next-token loss, AdamW (or Muon) with warmup + cosine decay, logging.

Lightning owns the loop (precision, accumulation, clipping, strategies, checkpoints); this module
only says what one step computes and how the optimiser is built. The model stays plain torch.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from torchmetrics.aggregation import MeanMetric

from sa_train.checkpoint import add_model_entries, read_checkpoint
from sa_train.config import SAConfig
from sa_train.errors import ConfigError, SATrainError
from sa_train.model import SAModel, next_token_loss
from sa_train.optim import (
    build_muon_optimizer,
    build_optimizer,
    check_optimizer_fits_strategy,
    check_optimizer_settings,
    fused_optimizer_fits,
)
from sa_train.sa_switch import SWITCH_KEY, SASwitch, decide, new_sa_model, switch_metrics, switch_model


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def check_data_fits_model(config: SAConfig, datamodule: Any) -> None:
    """The data's sequence length and vocabulary must fit the model's (model.config states its own)."""
    seq_len = getattr(datamodule, "seq_len", None)
    if seq_len is not None and seq_len > config.max_seq_len:
        raise ConfigError(
            f"data.seq_len={seq_len} exceeds model.config.max_seq_len={config.max_seq_len}; lower "
            "data.seq_len or raise max_seq_len."
        )
    vocab = getattr(datamodule, "expected_vocab_size", None)
    if vocab is not None and vocab > config.vocab_size:
        raise ConfigError(
            f"the tokenizer has {vocab} tokens but model.config.vocab_size={config.vocab_size}; set "
            f"model.config.vocab_size to at least {vocab} (or use a smaller data.vocab_size / tokenizer)."
        )


# model.nonfinite_loss=skip returns None from training_step on purpose (Lightning then skips the update).
warnings.filterwarnings("ignore", message=r"`training_step` returned `None`")


class NonFiniteLossError(SATrainError):
    """Training produced a NaN or infinite loss or gradient norm."""


class CausalLM(L.LightningModule):
    """Trains an :class:`SAModel` on packed token batches ``(inputs, targets)``.

    Args:
        config: The model architecture, shared-attention groups included.
        lr: Peak learning rate, reached after warmup.
        min_lr_ratio: The cosine decays to ``lr * min_lr_ratio`` at the last step.
        warmup_steps: Optimizer steps of linear warmup.
        weight_decay: AdamW decay, applied to matrices only (not to norms).
        betas: AdamW betas.
        eps: AdamW epsilon.
        compile: Compile the forward pass and the loss with ``torch.compile`` (first steps are slow
            while it compiles).
        activation_checkpointing: Keep only each SA group's input in memory during training and recompute
            the group in backward (one more forward pass of compute, for activations of one group at a time).
        init_from: Start ``fit`` from the weights of this checkpoint (e.g. one written by ``convert``),
            without its optimizer and loop state (``--ckpt_path`` resumes a run instead). Its architecture
            must be this config's.
        nonfinite_loss: What a NaN/inf training loss does: ``stop`` ends the run with an error naming the
            step and the last checkpoint (which is kept), ``skip`` skips that batch's update and counts it
            in ``train/skipped_batches``.
        optimizer: ``adamw`` for every weight, or ``muon``: torch's Muon for the decoder layers' matrices
            and AdamW (``lr``, ``betas``, ``eps``) for the embedding, head and norms
            (:mod:`sa_train.optim`); the schedule drives both.
        muon_lr: Muon's peak learning rate, its update scaled to AdamW's RMS; None takes ``lr``
            (:func:`~sa_train.optim.build_muon_optimizer`).
        sa_switch: Train dense, then convert to SA in place at a step or a measured similarity
            (:class:`~sa_train.sa_switch.SASwitch`); ``model.config`` must be dense.
    """

    def __init__(
        self,
        config: SAConfig,
        lr: float = 3e-4,
        min_lr_ratio: float = 0.1,
        warmup_steps: int = 100,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        compile: bool = False,
        activation_checkpointing: bool = False,
        nonfinite_loss: Literal["stop", "skip"] = "stop",
        init_from: str | None = None,
        optimizer: Literal["adamw", "muon"] = "adamw",
        muon_lr: float | None = None,
        sa_switch: SASwitch | None = None,
    ) -> None:
        super().__init__()
        check_optimizer_settings(lr, min_lr_ratio, warmup_steps, weight_decay, betas, eps, optimizer, muon_lr)
        if nonfinite_loss not in ("stop", "skip"):
            raise ConfigError(f"model.nonfinite_loss={nonfinite_loss!r} must be 'stop' or 'skip'.")
        if sa_switch is not None:
            sa_switch.check(config)
        # Checkpoints are read without unpickling objects: the switch is kept there as plain data.
        self.save_hyperparameters(ignore=["config", "sa_switch"])
        self.hparams["sa_switch"] = asdict(sa_switch) if sa_switch is not None else None
        self.sa_switch = sa_switch
        self.switched_at: int | None = None  # the step the model became SA at (model.sa_switch)
        self._decided_at: int | None = None
        self.config = config
        self.model = SAModel(config)
        self.model.checkpoint_groups = activation_checkpointing
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped_batches", torch.zeros((), dtype=torch.long))
        # Token-weighted mean NLL, summed across batches and processes before the exp: perplexity.
        self.val_nll = MeanMetric()
        self.test_nll = MeanMetric()
        self._loss_fn = self._logits_loss
        # No example_input_array: Lightning's summary would run a FLOP-counting forward before training,
        # after which Dynamo silently skips the model for good (compile had no effect through the CLI).

    def check_strategy(self, trainer: L.Trainer) -> None:
        """What the optimizer and the switch need of the strategy (the CLI checks it before the run folder
        exists). The switch replaces the model's parameters: DDP's wrapper is rebuilt around the SA model,
        but DeepSpeed's engine (and FSDP's shards) hold the dense model's for the whole run."""
        check_optimizer_fits_strategy(self.hparams["optimizer"], trainer.strategy)
        strategy = trainer.strategy
        rebuildable = isinstance(strategy, SingleDeviceStrategy | DDPStrategy)
        if self.sa_switch is not None and (not rebuildable or isinstance(strategy, DeepSpeedStrategy)):
            raise ConfigError(
                f"model.sa_switch cannot run under trainer.strategy {type(strategy).__name__}: its engine "
                "holds the dense model's parameters (and optimizer) for the whole run. Train with "
                "trainer.strategy=ddp or on one device, or convert between runs (`convert`, then fit "
                "--model.init_from) for a DeepSpeed fine-tune."
            )

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.check_strategy(self.trainer)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            check_data_fits_model(self.config, datamodule)
        if stage == "fit" and self.hparams["init_from"] and self.trainer.ckpt_path is None:
            self._load_weights(self.hparams["init_from"])
        if self.hparams["compile"]:
            # The loss is compiled with the model: Inductor fuses the fp32 upcast of the logits into the
            # cross-entropy instead of materialising a (batch, seq, vocab) fp32 copy.
            self._loss_fn = torch.compile(self._logits_loss)

    def _load_weights(self, path: str) -> None:
        saved = read_checkpoint(path)
        differ = saved.config.architecture_differences(self.config)
        if differ:
            raise ConfigError(
                f"model.init_from: {path} holds a model of another architecture: {'; '.join(differ)}. Set "
                "model.config to the checkpoint's (config.yaml of its run, or the groups given to convert)."
            )
        self.model.load_state_dict(saved.state_dict)
        step = saved.global_step
        rank_zero_info(f"model initialised from {path} (trained {step} steps); this run starts at step 0")

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids)

    def on_train_batch_start(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """``model.sa_switch``: decide once per optimizer step, at its first batch, before its forward; a
        run resumed at that step decides again, on the same batch and weights, as the first run did. The
        first rank decides on its batch, and every rank converts by its decision; DDP then wraps the SA
        model (its wrapper reduces the gradients of the parameters it was given)."""
        switch, step, trainer = self.sa_switch, self.trainer.global_step, self.trainer
        if switch is None or self.switched_at is not None or step == self._decided_at or not switch.due(step):
            return
        self._decided_at = step
        decision = decide(switch, self.model, batch[0]) if trainer.is_global_zero else None
        groups, orders, metrics = trainer.strategy.broadcast(decision)
        if groups is not None:
            optimizer = trainer.optimizers[0] if trainer.optimizers else None
            self.model = switch_model(self.model, groups, orders, optimizer)
            self.config, self.switched_at = self.model.config, step
            if isinstance(trainer.strategy, DDPStrategy):
                trainer.strategy.model = self
                trainer.strategy.configure_ddp()
            metrics |= switch_metrics(step, groups)
            rank_zero_info(
                f"sa_switch: at step {step} the dense model became SA, groups {groups} ({len(groups)} "
                f"anchors, KV cache {metrics['sa_switch/kv_vs_dense']:.3f} of dense), heads "
                f"{'matched' if switch.head_matching else 'as they were'}."
            )
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _logits_loss(self, inputs: Tensor, targets: Tensor) -> Tensor:
        logits = self.model(inputs)
        return next_token_loss(logits, targets)

    def _loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """Mean next-token cross-entropy (nats) of a batch ``(inputs, targets)``."""
        return self._loss_fn(*batch)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        loss = self._loss(batch)
        if self._checks_loss() and not self._finite_on_every_rank(loss):
            return self._handle_nonfinite(loss)
        self.tokens_seen += batch[0].numel() * self.trainer.world_size
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/tokens", self.tokens_seen.float(), reduce_fx="max")
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def _checks_gradients(self) -> bool:
        """Whether :meth:`configure_gradient_clipping` checks the gradient norm before each update: not
        under a GradScaler (it skips non-finite steps itself) nor DeepSpeed (which clips on its own)."""
        trainer = self.trainer
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        return not scaled and not isinstance(trainer.strategy, DeepSpeedStrategy)

    def _checks_loss(self) -> bool:
        """A non-finite loss gives non-finite gradients, which the gradient check stops before the update;
        so ``stop`` reads the loss on the host only where no gradient check runs: one device sync per step,
        not two. ``skip`` must decide before the backward pass."""
        return self.hparams["nonfinite_loss"] == "skip" or not self._checks_gradients()

    def _finite_on_every_rank(self, value: Tensor) -> bool:
        """One flag for all ranks, so they stop or skip together (a lone rank skipping would hang DDP)."""
        finite = torch.isfinite(value.detach()).to(torch.float32)
        if self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce(finite, reduce_op="min")
        return bool(finite.item())

    def _handle_nonfinite(self, loss: Tensor) -> None:
        step = self.trainer.global_step
        if self.hparams["nonfinite_loss"] == "skip":
            self.skipped_batches += 1
            self.log("train/skipped_batches", self.skipped_batches.float(), reduce_fx="max")
            return None
        raise NonFiniteLossError(
            f"the training loss became {loss.item()} at step {step}, so the run stopped before that update; "
            f"{self._last_checkpoint_words()} Lower model.lr, raise model.warmup_steps or set "
            "trainer.gradient_clip_val, then resume from that checkpoint with --ckpt_path (or set "
            "model.nonfinite_loss: skip to skip such batches)."
        )

    def _last_checkpoint_words(self) -> str:
        callback = self.trainer.checkpoint_callback
        path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        return (
            f"the newest checkpoint, {path}, holds finite weights."
            if path
            else "no checkpoint was written yet."
        )

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip, log ``train/grad_norm``, and stop before an update with non-finite gradients.

        Runs after Lightning has unscaled fp16 gradients, so it also serves the fused optimizer under
        bf16-mixed, which Lightning's own clipping refuses (see :func:`fused_optimizer_fits`). DeepSpeed
        clips by its own config (Lightning writes gradient_clip_val there) and keeps its gradients out of
        ``p.grad``, where this norm read 0.0 at every step; its norm is logged after its step instead.
        """
        if isinstance(self.trainer.strategy, DeepSpeedStrategy):
            return
        params = [p for p in self.parameters() if p.grad is not None]
        if gradient_clip_algorithm == "value" and gradient_clip_val:
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        max_norm = gradient_clip_val if gradient_clip_val and gradient_clip_algorithm != "value" else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.log("train/grad_norm", norm)
        if self._checks_gradients() and not self._finite_on_every_rank(norm):
            raise NonFiniteLossError(
                f"the loss or the gradients became non-finite at step {self.trainer.global_step}, so the run "
                f"stopped before that update; {self._last_checkpoint_words()} Lower model.lr, raise "
                "model.warmup_steps or set trainer.gradient_clip_val, then resume from that checkpoint with "
                "--ckpt_path (or set model.nonfinite_loss: skip to skip such batches)."
            )

    def on_train_start(self) -> None:
        self._norm_logged_at = self.trainer.global_step  # a resumed run has not stepped since its restore

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Validate after the last optimizer step too. Lightning validates every ``val_check_interval``
        batches and stops at ``max_steps`` without checking, so a run of 50,000 steps validated every 3,000
        would end 2,000 steps after its last validation, its final perplexity unknown; Lightning does
        validate the batch at which training is asked to stop."""
        trainer = self.trainer
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True
        if isinstance(trainer.strategy, DeepSpeedStrategy) and trainer.global_step > self._norm_logged_at:
            # The batch that completed an optimizer step: DeepSpeed's norm of that step, before clipping.
            self._norm_logged_at = trainer.global_step
            norm = trainer.strategy.deepspeed_engine.get_global_grad_norm()
            if norm is not None:
                self.log("train/grad_norm", float(norm))

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.val_nll.update(self._loss(batch), weight=batch[1].numel())

    def on_validation_epoch_end(self) -> None:
        self._log_nll("val", self.val_nll)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.test_nll.update(self._loss(batch), weight=batch[1].numel())

    def on_test_epoch_end(self) -> None:
        self._log_nll("test", self.test_nll)

    def _log_nll(self, split: str, metric: MeanMetric) -> None:
        """``{split}/loss`` (mean NLL per token, nats) and ``{split}/ppl`` = exp of it, over all processes."""
        nll = metric.compute()
        metric.reset()
        self.log(f"{split}/loss", nll, prog_bar=split == "val", sync_dist=False)
        self.log(f"{split}/ppl", nll.exp(), sync_dist=False)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        settings = (hp["weight_decay"], tuple(hp["betas"]), hp["eps"])
        fused = fused_optimizer_fits(str(self.trainer.precision))
        if hp["optimizer"] == "muon":
            muon_lr = hp["muon_lr"] if hp["muon_lr"] is not None else hp["lr"]
            optimizer = build_muon_optimizer(self.model, hp["lr"], muon_lr, *settings, fused=fused)
        else:
            optimizer = build_optimizer(self.model, hp["lr"], *settings, fused=fused)
        schedule = functools.partial(
            warmup_cosine,
            warmup_steps=hp["warmup_steps"],
            total_steps=int(self.trainer.estimated_stepping_batches),
            min_lr_ratio=hp["min_lr_ratio"],
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The architecture and the tokenizer travel with the weights (:mod:`sa_train.checkpoint`), and the
        step of an SA switch (:mod:`sa_train.sa_switch`)."""
        add_model_entries(checkpoint, self.config, self._tokenizer_json())
        if self.switched_at is not None:
            checkpoint[SWITCH_KEY] = {"step": self.switched_at, "groups": self.config.groups}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint written after an SA switch holds the SA model: build it before its weights load. A
        checkpoint of the model alone (:func:`sa_train.checkpoint.model_checkpoint`, what ``convert``
        writes) holds no run counters: they start at zero."""
        state = checkpoint.get("state_dict", {})  # none in DeepSpeed's: it restores the weights itself
        if state:
            for name, counter in self.named_buffers(recurse=False):
                state.setdefault(name, torch.zeros_like(counter))
        switched = checkpoint.get(SWITCH_KEY)
        if switched is not None and self.switched_at is None:
            self.model = new_sa_model(self.model, switched["groups"], {})
            self.config, self.switched_at = self.model.config, switched["step"]

    def _tokenizer_json(self) -> str | None:
        datamodule = getattr(self.trainer, "datamodule", None)
        path = getattr(datamodule, "tokenizer_path", None)
        return Path(path).read_text(encoding="utf-8") if path else None
