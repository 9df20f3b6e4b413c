"""Dense → SA retrofit: head permutations keep the dense function; matching recovers permuted heads."""

from __future__ import annotations

import torch

from sa_train import SAConfig, SAModel
from sa_train.analysis import attention_maps
from sa_train.convert import convert_to_sa, permute_heads

IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def test_permuting_a_layers_heads_keeps_the_dense_function():
    for kv_heads in (4, 2):
        model = SAModel(
            SAConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=kv_heads)
        ).eval()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        permute_heads(state, 1, model.config, list(reversed(range(kv_heads))))
        assert not torch.equal(
            state["layers.1.attn.v_proj.weight"], model.state_dict()["layers.1.attn.v_proj.weight"]
        )
        permuted = SAModel(model.config).eval()
        permuted.load_state_dict(state)
        torch.testing.assert_close(permuted(IDS), model(IDS))


def twin_layers(kv_heads: int) -> SAModel:
    """Layer 1 attends exactly like layer 0 with its heads shuffled: layer 0 writes nothing to the
    residual stream, so both see the same input, and layer 1's Q/K/V/O are layer 0's heads reordered."""
    config = SAConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=kv_heads, max_seq_len=16)
    torch.manual_seed(0)
    model = SAModel(config).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name in ("q_proj", "k_proj"):  # peaked attention, so heads differ clearly (init is near uniform)
        state[f"layers.0.attn.{name}.weight"] *= 30
    state["layers.0.attn.o_proj.weight"].zero_()
    state["layers.0.mlp.down_proj.weight"].zero_()
    order = [1, 0] if kv_heads == 2 else [2, 0, 3, 1]
    for name in ("q_proj", "k_proj"):
        state[f"layers.1.attn.{name}.weight"] = state[f"layers.0.attn.{name}.weight"].clone()
    permute_heads(state, 1, config, order)
    model.load_state_dict(state)
    return model


def test_head_matching_makes_the_retrofit_exact_when_attention_is_shared_up_to_order():
    for kv_heads in (4, 2):
        dense = twin_layers(kv_heads)
        maps = attention_maps(dense, IDS)
        matched = convert_to_sa(dense, [[0, 1]], maps).eval()
        plain = convert_to_sa(dense, [[0, 1]]).eval()
        assert matched.config.groups == [[0, 1]] and not hasattr(matched.layers[1].attn, "q_proj")
        torch.testing.assert_close(matched(IDS), dense(IDS))
        assert (plain(IDS) - dense(IDS)).abs().max() > 1e-2
