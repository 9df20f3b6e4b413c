"""Analytic costs against what the model really does (FLOPs counted by torch, cache by structure)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sa_train import SAConfig, SAModel
from sa_train.cost import forward_flops_per_token, kv_cache_vectors_per_token, training_flops_per_token


@pytest.mark.parametrize("groups", ["dense", "every:4", "dense:2,every:3"])
def test_forward_flops_match_torch_count(groups):
    # The reference backend multiplies full T x T matrices, as the cost convention counts them.
    cfg = SAConfig(
        vocab_size=96,
        d_model=64,
        n_layers=8,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=16,
        sa_groups=groups,
        attention_backend="reference",
    )
    ids = torch.zeros(3, 16, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        SAModel(cfg)(ids)
    assert counter.get_total_flops() == ids.numel() * forward_flops_per_token(cfg, 16)


def test_sa_saves_query_key_work_and_cache():
    dense = SAConfig(n_layers=8, sa_groups="dense")
    sa = SAConfig(n_layers=8, sa_groups="every:4")
    assert kv_cache_vectors_per_token(dense) == 16
    assert kv_cache_vectors_per_token(sa) == 8 + 2
    assert training_flops_per_token(sa, 256) < training_flops_per_token(dense, 256)
    assert training_flops_per_token(dense, 256) == 3 * forward_flops_per_token(dense, 256)


def test_causal_count_keeps_the_mean_visible_context():
    cfg = SAConfig(d_model=64, n_layers=4, n_heads=4, sa_groups="every:2")
    full, causal = forward_flops_per_token(cfg, 16), forward_flops_per_token(cfg, 16, causal=True)
    assert full - causal == (2 + 4) * 2 * (16 - 8.5) * 64
