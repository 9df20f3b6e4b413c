"""The LightningModule's pieces: schedule, optimiser groups, loss."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from sa_train import SAConfig
from sa_train.errors import ConfigError
from sa_train.training import CausalLM, build_optimizer, fused_optimizer_fits, warmup_cosine


def test_warmup_then_cosine_to_the_floor():
    lr = [warmup_cosine(step, warmup_steps=10, total_steps=110, min_lr_ratio=0.1) for step in range(120)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert all(a < b for a, b in itertools.pairwise(lr[:10]))
    assert lr[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in itertools.pairwise(lr[10:111]))
    assert lr[110] == pytest.approx(0.1) and lr[119] == pytest.approx(0.1)


def test_weight_decay_only_on_matrices():
    module = CausalLM(SAConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, tie_embeddings=True))
    optimizer = build_optimizer(module.model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    n_params = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    assert n_params == module.model.num_parameters()  # the tied embedding appears once


def test_loss_is_next_token_cross_entropy():
    module = CausalLM(SAConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16))
    inputs = torch.randint(0, 64, (2, 16))
    targets = torch.randint(0, 64, (2, 16))
    expected = F.cross_entropy(module(inputs).reshape(-1, 64), targets.reshape(-1))
    torch.testing.assert_close(module._loss((inputs, targets)), expected)


def test_bad_schedule_settings_name_the_field():
    with pytest.raises(ConfigError, match=r"model\.min_lr_ratio"):
        CausalLM(SAConfig(), min_lr_ratio=1.5)
    with pytest.raises(ConfigError, match=r"model\.warmup_steps"):
        CausalLM(SAConfig(), warmup_steps=-1)


def test_fused_adamw_except_where_a_grad_scaler_must_unscale_before_clipping():
    assert fused_optimizer_fits("bf16-mixed") and fused_optimizer_fits("32-true")
    assert not fused_optimizer_fits("16-mixed")
    module = CausalLM(SAConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2))
    foreach = build_optimizer(module.model, 1e-3, 0.1, (0.9, 0.95), 1e-8, fused=False)
    assert not getattr(foreach, "_step_supports_amp_scaling", False)


@pytest.mark.parametrize(
    ("setting", "field"),
    [
        ({"lr": -1.0}, "model.lr"),
        ({"lr": 0.0}, "model.lr"),
        ({"betas": (0.9, 1.0)}, "model.betas"),
        ({"weight_decay": -0.1}, "model.weight_decay"),
        ({"eps": 0.0}, "model.eps"),
        ({"nonfinite_loss": "ignore"}, "model.nonfinite_loss"),
        ({"optimizer": "sgd"}, "model.optimizer"),
        ({"muon_lr": 0.0}, "model.muon_lr"),
    ],
)
def test_out_of_range_optimizer_settings_name_the_field(setting, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        CausalLM(SAConfig(), **setting)


class _NaNOnSomeBatches(CausalLM):
    """Returns a NaN loss for the listed batch indices, as a diverging step would."""

    nan_batches = (2,)

    def _loss(self, batch):
        loss = super()._loss(batch)
        return loss * math.nan if self.trainer.training and self._batch in self.nan_batches else loss

    def training_step(self, batch, batch_idx):
        self._batch = batch_idx
        return super().training_step(batch, batch_idx)


def test_skip_mode_skips_the_update_of_a_nonfinite_batch_and_counts_it():
    import lightning as L

    torch.manual_seed(0)
    tokens = torch.randint(0, 64, (12, 9))
    batches = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=2)
    module = _NaNOnSomeBatches(
        SAConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=8), nonfinite_loss="skip"
    )
    snapshots = []

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots.append([p.detach().clone() for p in pl_module.parameters()])

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[Snapshot()],
        gradient_clip_val=1.0,
    )
    trainer.fit(module, train_dataloaders=batches)
    assert int(module.skipped_batches) == 1
    assert trainer.global_step == 5  # five updates from six batches: batch 2 was skipped
    unchanged = [torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2], strict=True)]
    assert all(unchanged)
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3], strict=True))
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_activation_checkpointing_keeps_gradients_and_saves_memory():
    config = SAConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=2, max_seq_len=16, sa_groups="every:2")
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    results = {}
    for flag in (False, True):
        torch.manual_seed(0)
        module = CausalLM(config, activation_checkpointing=flag)
        saved: list[int] = []

        def pack(tensor: torch.Tensor, saved: list[int] = saved) -> torch.Tensor:
            saved.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = module._loss((ids[:, :-1], ids[:, 1:]))
        loss.backward()
        results[flag] = (loss.detach(), [p.grad.clone() for p in module.parameters()], sum(saved))
    (loss_a, grads_a, saved_a), (loss_b, grads_b, saved_b) = results[False], results[True]
    torch.testing.assert_close(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b)
    assert saved_b < saved_a / 2
