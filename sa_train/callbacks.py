"""Lightning callbacks of the training layer."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class LastStepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that never loses the final steps: ``last.ckpt`` is also written when training
    stops between two save intervals (e.g. ``max_steps`` not a multiple of ``every_n_train_steps``).

    Lightning's ModelCheckpoint writes ``last.ckpt`` at the end of training only if it never wrote one, so
    a run of 230 steps saving every 100 would end with a last.ckpt from step 200.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stepped_since_save = self._last_global_step_saved != trainer.global_step
        if self.save_last and stepped_since_save and not trainer.fast_dev_run:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)
