"""The LightningModule's pieces: schedule, optimiser groups, loss."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from sa_train import SAConfig
from sa_train.errors import ConfigError
from sa_train.training import CausalLM, build_optimizer, warmup_cosine


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
