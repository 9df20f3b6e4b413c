"""Retrofit a trained dense model into an SA model: the paper's own setting.

A layer that becomes shared keeps its V, O, norms and MLP and loses Q and K: from then on it applies its
anchor's attention weights. Head h of a shared layer then reads the anchor's head h, so first its heads
are permuted (V rows and O columns together, which leaves the dense model's function unchanged) so that
head h is the one whose attention is most like the anchor's head h: the best one-to-one matching of the
Jensen–Shannon similarities of :mod:`sa_train.analysis`. With grouped-query attention the unit that can
move is a kv head with its query heads.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from sa_train.analysis import head_pair_similarity
from sa_train.config import SAConfig, parse_groups
from sa_train.errors import ConfigError
from sa_train.model import SAModel


def kv_head_permutation(anchor: Tensor, layer: Tensor, n_kv_heads: int) -> list[int]:
    """For each kv head of the anchor, the kv head of ``layer`` whose query heads attend most alike.

    ``anchor`` and ``layer`` are attention maps (B, H, T, T) on the same tokens.
    """
    from scipy.optimize import linear_sum_assignment

    pairs, _ = head_pair_similarity(anchor, layer)  # (H, H)
    rep = pairs.shape[0] // n_kv_heads
    # Similarity of kv head a (anchor) and b (layer): their query heads compared in order.
    per_kv = torch.stack(
        [
            torch.stack(
                [
                    pairs[a * rep : (a + 1) * rep, b * rep : (b + 1) * rep].diagonal().mean()
                    for b in range(n_kv_heads)
                ]
            )
            for a in range(n_kv_heads)
        ]
    )
    rows, cols = linear_sum_assignment(per_kv.numpy(), maximize=True)
    return [int(cols[list(rows).index(a)]) for a in range(n_kv_heads)]


def permute_heads(state: dict[str, Tensor], layer: int, config: SAConfig, kv_order: list[int]) -> None:
    """Reorder layer ``layer``'s heads in ``state`` so kv head i is the old kv head ``kv_order[i]`` (its query
    heads moving with it): Q and V rows, K rows, O columns. The dense function stays the same."""
    head_dim, rep = config.head_dim, config.n_heads // config.n_kv_heads
    query_order = [kv * rep + r for kv in kv_order for r in range(rep)]

    def rows(order: list[int]) -> Tensor:
        return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in order])

    prefix = f"layers.{layer}.attn."
    for name, order in (("q_proj", query_order), ("k_proj", kv_order), ("v_proj", kv_order)):
        key = f"{prefix}{name}.weight"
        if key in state:
            state[key] = state[key][rows(order)]
    key = f"{prefix}o_proj.weight"
    if key in state:
        state[key] = state[key][:, rows(query_order)]


def head_orders(maps: dict[int, Tensor], groups: list[list[int]], n_kv_heads: int) -> dict[int, list[int]]:
    """For each shared layer of ``groups``, the kv-head order that matches its heads to its anchor's
    (:func:`kv_head_permutation` on the attention ``maps`` of every layer)."""
    return {
        layer: kv_head_permutation(maps[group[0]], maps[layer], n_kv_heads)
        for group in groups
        for layer in group[1:]
    }


def retrofit_state(
    state: dict[str, Tensor], config: SAConfig, groups: list[list[int]], orders: dict[int, list[int]]
) -> dict[str, Tensor]:
    """A dense model's tensors by parameter name (its weights, or an optimizer buffer of each) as the SA
    model's: each shared layer's heads permuted by ``orders`` (where given), then its Q and K dropped."""
    state = dict(state)
    for group in groups:
        for layer in group[1:]:
            if layer in orders:
                permute_heads(state, layer, config, orders[layer])
            for name in ("q_proj", "k_proj"):
                state.pop(f"layers.{layer}.attn.{name}.weight", None)
    return state


def convert_to_sa(
    model: SAModel, sa_groups: str | list[list[int]], maps: dict[int, Tensor] | None = None
) -> SAModel:
    """An SA model from a dense one: each group's first layer keeps Q/K, the others lose them, their
    heads matched to the anchor's first when attention ``maps`` of every layer are given."""
    config = model.config
    if not config.is_dense:
        raise ConfigError(
            "convert takes a dense model (every group of size one); this one has SA groups already."
        )
    groups = parse_groups(sa_groups, config.n_layers)
    assert config.n_kv_heads is not None
    orders = head_orders(maps, groups, config.n_kv_heads) if maps is not None else {}
    return build_converted(model, groups, orders)


def build_converted(model: SAModel, groups: list[list[int]], orders: dict[int, list[int]]) -> SAModel:
    """The SA model of ``groups`` holding the dense ``model``'s weights (:func:`retrofit_state`), on its
    device and in its dtype."""
    state = retrofit_state(model.state_dict(), model.config, groups, orders)
    converted = SAModel(dataclasses.replace(model.config, sa_groups=groups))
    converted.load_state_dict(state)
    weight = next(model.parameters())
    return converted.to(device=weight.device, dtype=weight.dtype)
