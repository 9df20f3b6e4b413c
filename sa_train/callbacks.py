"""Lightning callbacks of the training layer: checkpoints, throughput, inference cost."""

from __future__ import annotations

import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from sa_train.atomic_files import atomic_hardlink, remove_stale_temp_files, warn_removed
from sa_train.checkpoint import link_resumed_run
from sa_train.checkpoint_io import relink_last_checkpoint
from sa_train.config import SAConfig
from sa_train.cost import cost_lines, cost_metrics, cost_report, training_flops_per_token
from sa_train.dtypes import DTYPES, precision_dtype
from sa_train.errors import ConfigError
from sa_train.measure import measure_decode, measure_matmul_flops, synchronize

# Stand-ins formatted into the filename template to find the step checkpoints it names.
_EPOCH_MARK, _STEP_MARK = 987654321, 123456789


class LastStepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that never loses the final steps and leaves a tidy folder after any kill.

    ``last.ckpt`` is also written when training stops between two save intervals (e.g. ``max_steps`` not a
    multiple of ``every_n_train_steps``): Lightning's ModelCheckpoint writes it at the end of training only
    if it never wrote one, so a run of 230 steps saving every 100 would end with a last.ckpt from step 200.

    A save is three file operations (write the new step checkpoint, delete the previous one, rewrite
    ``last.ckpt``), so a kill between them leaves two step checkpoints, or a ``last.ckpt`` one interval
    behind the step checkpoint, besides the temp file of a write cut short. When ``fit`` starts, the
    checkpoint folder and the folder of the checkpoint it resumed from are therefore tidied (:meth:`tidy`);
    the CLI relinks a ``last.ckpt`` that is behind before it is loaded (:func:`relink_last_checkpoint`).
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stepped_since_save = self._last_global_step_saved != trainer.global_step
        if self.save_last and stepped_since_save and not trainer.fast_dev_run:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        """At the step a step checkpoint was just written, ``last.ckpt`` is a hard link to it, not a second
        full copy (each tiny run kept two identical 89 MB files). DeepSpeed's folders are written anew."""
        linkable = (
            self.save_last is True
            and self.save_top_k != 0
            and self._last_checkpoint_saved
            and self._last_global_step_saved == trainer.global_step
            and not isinstance(trainer.strategy, DeepSpeedStrategy)
        )
        if not linkable:
            super()._save_last_checkpoint(trainer, monitor_candidates)
            return
        self.save_last = "link"
        try:
            super()._save_last_checkpoint(trainer, monitor_candidates)
        finally:
            self.save_last = True

    @staticmethod
    def _link_checkpoint(trainer: L.Trainer, filepath: str, linkpath: str) -> None:
        """A hard link (Lightning makes a symlink): ``last.ckpt`` stays whole when the step checkpoint it
        shares is deleted at the next save."""
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            atomic_hardlink(filepath, linkpath)
        trainer.strategy.barrier()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed run writes into a folder of its own (runs started together never share one), so the
        checkpoint always names another folder, and Lightning warned on every resume that the top-k
        bookkeeping of that folder is not carried over. sa_train checkpoints by step, without a monitored
        top k, so nothing is lost; :meth:`on_fit_start` says where the run came from instead."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The dirpath has changed")
            super().load_state_dict(state_dict)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Tidy once the resumed checkpoint (if any) is loaded and Lightning knows its path."""
        super().on_fit_start(trainer, pl_module)
        if not trainer.is_global_zero or self.dirpath is None:
            return
        resume = Path(trainer.ckpt_path).resolve() if trainer.ckpt_path else None
        folders = {Path(self.dirpath).resolve()}
        if resume is not None and resume.is_file():
            folders.add(resume.parent)
        for folder in sorted(folders):
            self.tidy(folder, keep=resume)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Link a resumed run's folder to the run it continues: here, because DeepSpeed restores its
        checkpoint after ``on_fit_start`` (``trainer.ckpt_path`` is still None there)."""
        super().on_train_start(trainer, pl_module)
        run = trainer.log_dir  # every rank asks: under DDP it is a broadcast from rank 0
        if not trainer.is_global_zero or not trainer.ckpt_path or not run:
            return
        resume = Path(trainer.ckpt_path).resolve()
        previous = link_resumed_run(Path(run), resume)
        if previous is not None:
            rank_zero_info(f"Resuming the run in {previous} from {resume.name}; this part logs to {run}.")

    def tidy(self, folder: Path, keep: Path | None = None) -> None:
        """Undo what a kill mid-save left in ``folder``; never deletes ``keep`` (the resumed checkpoint).

        Removes temp files of dead writers. When this callback keeps only the newest step checkpoint
        (``save_top_k=1``, no ``monitor``), removes the older step checkpoints its filename template names.
        Then points ``last.ckpt`` at the newest checkpoint if it is behind one.
        """
        if not folder.is_dir():
            return
        warn_removed(remove_stale_temp_files(folder))
        steps = self._step_checkpoints(folder) if self.monitor is None and self.save_top_k == 1 else {}
        if steps:
            newest = max(steps, key=steps.__getitem__)
            for path in steps:
                if path != newest and path != keep:
                    path.unlink()
                    warnings.warn(
                        f"Removed {path}: an older step checkpoint whose deletion a kill interrupted "
                        f"({newest.name} is newer).",
                        stacklevel=2,
                    )
        if self.save_last:
            relink_last_checkpoint(folder / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")

    def _step_checkpoints(self, folder: Path) -> dict[Path, int]:
        """The step checkpoints in ``folder`` that this callback's filename template names, by step."""
        marks = {"epoch": torch.tensor(_EPOCH_MARK), "step": torch.tensor(_STEP_MARK)}
        template = Path(self.format_checkpoint_name(marks)).name
        if str(_STEP_MARK) not in template:
            return {}
        pattern = re.escape(template).replace(str(_EPOCH_MARK), r"\d+")
        pattern = "^" + pattern.replace(str(_STEP_MARK), r"(?P<step>\d+)") + "$"
        steps = {}
        for path in folder.iterdir():
            match = re.match(pattern, path.name)
            if match and path.is_file() and not path.is_symlink():
                steps[path] = int(match["step"])
        return steps


class TrainingThroughput(L.Callback):
    """Logs ``train/tokens_per_sec`` (all devices), ``train/device/tokens_per_sec`` and ``train/mfu`` (model
    FLOPs utilisation per device), with Lightning's :class:`Throughput` over a window of logging steps.

    FLOPs are the analytic training FLOPs of :mod:`sa_train.cost` (causal attention), so SA and dense runs
    are compared by the work their architecture needs. The peak is Lightning's table for known GPUs at the
    run's compute dtype, or on CPU a fp32 matmul measured once at setup. Timing is taken only on logging
    steps, so on GPU the callback adds no synchronisation to the other steps.

    Args:
        window: Logging steps the rates are averaged over.
    """

    def __init__(self, window: int = 5) -> None:
        super().__init__()
        if window < 2:
            raise ConfigError(f"TrainingThroughput window={window} must be at least 2 logging steps.")
        self.window = window
        self.peak_flops: float | None = None
        self._meter: Throughput | None = None
        self._start = 0.0
        self._batches = self._samples = self._tokens = 0
        self._flops_since_update = 0.0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        device = trainer.strategy.root_device
        if device.type == "cpu":
            self.peak_flops = measure_matmul_flops()
        else:
            self.peak_flops = get_available_flops(device, DTYPES[precision_dtype(trainer.precision)])
        # A short run gets its first rates within its first half: a window of ``window`` logging steps
        # logged nothing before step 25 (log_every_n_steps 5), so a 20-step run had no throughput at all.
        updates = trainer.max_steps // trainer.log_every_n_steps if trainer.max_steps > 0 else self.window
        window = max(2, min(self.window, updates // 2))
        self._meter = Throughput(
            available_flops=self.peak_flops, world_size=trainer.world_size, window_size=window
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        assert self._meter is not None
        inputs = batch[0]
        self._batches += 1
        self._samples += inputs.shape[0]
        self._tokens += inputs.numel()
        self._flops_since_update += inputs.numel() * training_flops_per_token(
            pl_module.config, inputs.shape[1], causal=True
        )
        if (trainer.global_step % trainer.log_every_n_steps) != 0:
            return
        synchronize(inputs.device)
        self._meter.update(
            time=time.perf_counter() - self._start,
            batches=self._batches,
            samples=self._samples,
            lengths=self._tokens,
            flops=int(self._flops_since_update),
        )
        self._flops_since_update = 0.0
        rates = self._meter.compute()
        per_device = rates.get("device/items_per_sec")
        if per_device is not None:
            pl_module.log("train/device/tokens_per_sec", per_device)
            pl_module.log("train/tokens_per_sec", per_device * trainer.world_size)
        if "device/mfu" in rates:
            pl_module.log("train/mfu", rates["device/mfu"])


class InferenceCost(L.Callback):
    """What the architecture costs to serve, beside its dense twin: analytic at fit start, measured at
    every validation end.

    At fit start (step 0): ``cost/kv_bytes_per_token``, ``cost/kv_vs_dense`` ((L + anchors) / 2L),
    ``cost/decode_flops_per_token``, ``cost/decode_flops_vs_dense``, ``cost/train_flops_per_token``,
    ``cost/train_flops_vs_dense`` and ``cost/params``; the same line goes to the console once. After a
    ``model.sa_switch``, the SA model's, at the switch step.
    At each validation's end: greedy decoding of a fixed random batch through the model's KV cache,
    ``cost/decode_tokens_per_sec`` (new tokens, prefill excluded), ``cost/prefill_ms`` and
    ``cost/kv_cache_bytes`` (the bytes the cache holds for that batch), on the first rank; not under
    DeepSpeed ZeRO-3, whose ranks each hold a shard of the weights.

    Args:
        measure: Time decoding at each validation end (False: analytic figures only).
        batch_size: Rows of the timed batch.
        prompt_len: Prompt tokens per row (capped so prompt and new tokens fit the model's context).
        new_tokens: Tokens generated per row.
    """

    def __init__(
        self, measure: bool = True, batch_size: int = 4, prompt_len: int = 64, new_tokens: int = 32
    ) -> None:
        super().__init__()
        for name, value in (
            ("batch_size", batch_size),
            ("prompt_len", prompt_len),
            ("new_tokens", new_tokens),
        ):
            if value < 1:
                raise ConfigError(f"InferenceCost {name}={value} must be at least 1.")
        self.measure, self.batch_size, self.prompt_len, self.new_tokens = (
            measure,
            batch_size,
            prompt_len,
            new_tokens,
        )
        self._reported: SAConfig | None = None  # the model config whose costs were logged last

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, step=0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        """``model.sa_switch`` replaced the model: its costs, logged at the switch step."""
        if pl_module.config is not self._reported:
            self._report(trainer, pl_module, step=pl_module.switched_at or trainer.global_step)

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        config = self._reported = pl_module.config
        seq_len = getattr(trainer.datamodule, "seq_len", None) or config.max_seq_len
        report = cost_report(config, seq_len, config.max_seq_len, precision_dtype(trainer.precision))
        for logger in trainer.loggers:
            logger.log_metrics(cost_metrics(report), step=step)
        rank_zero_info(f"Model{f' from step {step}' if step else ''}: {cost_lines(config, report)}")
        switch = getattr(pl_module, "sa_switch", None)
        if switch is not None and pl_module.switched_at is None:
            rank_zero_info(f"model.sa_switch: {switch.plan()}; the SA model's costs follow at the switch.")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Logged through the module with the validation's own metrics, so they share its row and step."""
        if not self.measure or trainer.sanity_checking or not trainer.is_global_zero:
            return
        if isinstance(trainer.strategy, DeepSpeedStrategy) and trainer.strategy.zero_stage_3:
            return  # ZeRO-3 shards the weights across ranks, so a lone rank cannot decode; 1 and 2 do not
        with trainer.precision_plugin.forward_context():
            metrics = measure_decode(pl_module.model, self.batch_size, self.prompt_len, self.new_tokens)
        pl_module.log_dict(metrics, rank_zero_only=True)


class StepProgressBar(TQDMProgressBar):
    """One progress bar over the run's optimizer steps when ``trainer.max_steps`` bounds it.

    Lightning's bar counts the batches of an epoch, which a step-bounded run does not know in advance
    (it printed ``Epoch 0/-2``, and ``201/?`` after a resume); this one shows ``step/max_steps`` across
    epochs and resumes at the restored step. The logger's version number (``v_num``) is left out.
    """

    def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_start(trainer, *args)
        self._count_steps(trainer)  # a run resumed mid-epoch starts no epoch: Lightning skips that hook

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._count_steps(trainer)

    def _count_steps(self, trainer: L.Trainer) -> None:
        """Count ``global_step`` of ``max_steps``; the rate counts only this process's steps (``initial``),
        so a resumed run's rate is not its restored steps over seconds of this process."""
        bar = self.train_progress_bar
        if trainer.max_steps < 1 or bar.disable:
            return
        if bar.total != trainer.max_steps:
            bar.reset(total=trainer.max_steps)
            bar.n = bar.last_print_n = bar.initial = trainer.global_step
        bar.set_description(f"Epoch {trainer.current_epoch}")
        bar.refresh()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.max_steps < 1:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        bar, step = self.train_progress_bar, trainer.global_step
        if bar.disable or step == bar.n:
            return
        if step % self.refresh_rate == 0 or step == bar.total:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class AttentionSimilarity(L.Callback):
    """Logs how alike neighbouring layers attend as training goes (:mod:`sa_train.analysis`).

    Every ``every_n_steps`` optimizer steps, on a fixed batch of the validation split, the head-matched
    similarity (1 − Jensen–Shannon, bits) of each pair of neighbouring attention-computing layers (every
    layer of a dense model, the anchors of an SA model) goes to ``attn_sim/<a>-<b>``, and their mean to
    ``attn_sim/mean``: the evidence for choosing groups, and for when in training it appears.

    Args:
        every_n_steps: Optimizer steps between measurements.
        batch_size: Validation sequences in the fixed batch.
    """

    def __init__(self, every_n_steps: int = 100, batch_size: int = 2) -> None:
        super().__init__()
        if every_n_steps < 1 or batch_size < 1:
            raise ConfigError(
                f"AttentionSimilarity every_n_steps={every_n_steps} and batch_size={batch_size} must be >= 1."
            )
        self.every_n_steps, self.batch_size = every_n_steps, batch_size
        self._batch: torch.Tensor | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader = trainer.datamodule.val_dataloader() if trainer.datamodule is not None else None
        if loader is not None:
            inputs = next(iter(loader))[0]
            self._batch = inputs[: self.batch_size].to(pl_module.device)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self._batch is None or step % self.every_n_steps or not trainer.is_global_zero:
            return
        from sa_train.analysis import attention_maps, similarity

        model = pl_module.model
        was_training = model.training
        model.eval()
        try:
            result = similarity(attention_maps(model, self._batch))
        finally:
            model.train(was_training)
        layers, matched = result.layers, result.js["matched"]
        pairs = {f"attn_sim/{layers[i]}-{layers[i + 1]}": matched[i][i + 1] for i in range(len(layers) - 1)}
        if pairs:
            pairs["attn_sim/mean"] = sum(pairs.values()) / len(pairs)
            for logger in trainer.loggers:
                logger.log_metrics(pairs, step=step)
