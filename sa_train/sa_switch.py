"""``model.sa_switch``: train dense, then convert the model to SA in place and train on (issue 24).

At the start of the chosen optimizer step the dense model becomes an SA model by ``convert``'s own
retrofit (:mod:`sa_train.convert`: each shared layer's heads matched to its anchor's, its Q and K
dropped), with fixed groups or the groups the measured similarity suggests for a KV budget
(:mod:`sa_train.analysis`, as ``analyze --kv-budget``). The optimizer keeps its object, param groups,
schedule position and hyperparameters: its parameters are pointed at the SA model's, and each surviving
weight's buffers (AdamW's moments, Muon's momentum) are permuted with its heads; the dropped Q/K weights'
buffers go with them.

A model option rather than a callback: the switch replaces the LightningModule's model and re-points its
optimizer, and a run resumed after the switch must rebuild the SA model before Lightning loads the
checkpoint's weights, which only the module's ``on_load_checkpoint`` can do (Lightning restores callback
state after the weights); ``validate`` and ``test`` of such a checkpoint need the same, with no callbacks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sa_train.analysis import (
    anchors_for_kv_budget,
    attention_maps,
    groups_for_budget,
    neighbour_similarity,
    similarity,
)
from sa_train.config import GroupSpec, SAConfig, parse_groups
from sa_train.convert import build_converted, head_orders, retrofit_state
from sa_train.cost import kv_fraction
from sa_train.errors import ConfigError
from sa_train.model import SAModel

SWITCH_KEY = "sa_switch"  # checkpoint entry of a run that has switched: {"step": k, "groups": [...]}
# Tokens per measured row: attention maps grow with its square (convert matches heads on 256 tokens too).
MEASURE_LEN = 256


@dataclass
class SASwitch:
    """When and into which groups a dense run becomes SA (``model.sa_switch``).

    Args:
        at_step: The switch happens at the start of the step after ``at_step`` optimizer steps of dense
            training; with ``similarity``, at the first measurement from then on that passes it.
        similarity: Switch once the mean head-matched similarity of neighbouring layers (1 − Jensen–Shannon
            in bits, as ``analyze`` and ``AttentionSimilarity``) is at least this. Freshly initialised
            layers all attend almost uniformly, hence alike; ``at_step`` sets how long to train before a
            measurement counts.
        every_n_steps: Optimizer steps between measurements, from ``at_step`` on (with ``similarity``).
        groups: The SA groups to convert to, as ``model.config.sa_groups`` ('every:G', ...).
        kv_budget: Instead of ``groups``: the groups the similarity measured at the switch suggests for a KV
            cache of at most this fraction of the dense one (``analyze --kv-budget``).
        head_matching: Reorder each shared layer's heads to attend most like its anchor's before its Q and K
            are dropped (``convert``'s default).
        rows: Rows of the batch about to be trained on (their first 256 tokens) that the similarity and the
            head matching measure: text the model has not yet seen, and the same text in a resumed run.
    """

    at_step: int | None = None
    similarity: float | None = None
    every_n_steps: int = 50
    groups: GroupSpec | None = None
    kv_budget: float | None = None
    head_matching: bool = True
    rows: int = 2

    def check(self, config: SAConfig) -> None:
        """Every setting in range, the model to switch dense, and fixed groups that fit it and share
        attention. (Checked by the model, not at construction: the CLI's parser would bury a refusal raised
        while it builds this object in a traceback of its own.)"""
        problems = []
        if self.at_step is None:
            problems.append("model.sa_switch.at_step is required: the optimizer steps to train dense first")
        elif isinstance(self.at_step, bool) or not isinstance(self.at_step, int) or self.at_step < 0:
            problems.append(f"model.sa_switch.at_step={self.at_step} must be a step >= 0")
        if self.similarity is not None and not 0.0 < self.similarity <= 1.0:
            problems.append(f"model.sa_switch.similarity={self.similarity} must lie in (0, 1], e.g. 0.6")
        if self.every_n_steps < 1:
            problems.append(f"model.sa_switch.every_n_steps={self.every_n_steps} must be >= 1")
        if (self.groups is None) == (self.kv_budget is None):
            problems.append(
                "model.sa_switch needs exactly one of groups (e.g. every:4) and kv_budget (e.g. 0.75)"
            )
        if self.kv_budget is not None and not 0.0 < self.kv_budget < 1.0:
            problems.append(
                f"model.sa_switch.kv_budget={self.kv_budget} must lie in (0, 1): a fraction of the dense KV "
                "cache"
            )
        if self.rows < 1:
            problems.append(f"model.sa_switch.rows={self.rows} must be >= 1")
        if problems:
            raise ConfigError("; ".join(problems) + ".")
        if not config.is_dense:
            raise ConfigError(
                f"model.sa_switch converts a dense model, but model.config.sa_groups is {config.groups}; set "
                "model.config.sa_groups: dense and give the SA groups as model.sa_switch.groups."
            )
        if config.n_layers < 2:
            raise ConfigError(
                "model.sa_switch needs at least two layers to share attention; model.config.n_layers is 1."
            )
        if self.groups is not None:
            try:
                groups = parse_groups(self.groups, config.n_layers)
            except ConfigError as error:
                raise ConfigError(
                    str(error).replace("model.config.sa_groups", "model.sa_switch.groups")
                ) from None
            if all(len(group) == 1 for group in groups):
                raise ConfigError(
                    f"model.sa_switch.groups={self.groups} is dense: nothing would change at the switch; "
                    "give groups that share attention, e.g. every:2."
                )

    def plan(self) -> str:
        """When and into what the run switches, in words."""
        target = self.groups or f"the groups of a KV budget of {self.kv_budget} of dense"
        if self.similarity is None:
            return f"dense for {self.at_step} steps, then {target}"
        return (
            f"dense for at least {self.at_step} steps, until neighbouring layers' attention similarity "
            f"reaches {self.similarity} (measured every {self.every_n_steps} steps), then {target}"
        )

    def due(self, step: int) -> bool:
        """Whether the start of the step after ``step`` steps decides (a switch or a measurement)."""
        assert self.at_step is not None
        if step < self.at_step:
            return False
        return self.similarity is None or (step - self.at_step) % self.every_n_steps == 0


def mean_neighbour_similarity(maps: dict[int, Tensor]) -> float:
    values = neighbour_similarity(maps)
    return sum(values) / len(values)


def choose_groups(switch: SASwitch, config: SAConfig, maps: dict[int, Tensor] | None) -> list[list[int]]:
    """The fixed groups, or those the similarity of ``maps`` suggests for the KV budget."""
    if switch.groups is not None:
        return parse_groups(switch.groups, config.n_layers)
    assert maps is not None and switch.kv_budget is not None
    matrix = similarity(maps).js["matched"]
    groups, _ = groups_for_budget(matrix, anchors_for_kv_budget(config.n_layers, switch.kv_budget))
    return groups


def new_sa_model(dense: SAModel, groups: list[list[int]], orders: dict[int, list[int]]) -> SAModel:
    """:func:`~sa_train.convert.build_converted`, leaving the global RNG as it was (the SA model's random
    init, overwritten at once, would otherwise shift every later draw of the run)."""
    with torch.random.fork_rng(devices=[]):
        model = build_converted(dense, groups, orders)
    model.checkpoint_groups = dense.checkpoint_groups
    model.train(dense.training)
    return model


def switch_model(
    dense: SAModel, groups: list[list[int]], orders: dict[int, list[int]], optimizer: Any
) -> SAModel:
    """The SA model of ``groups`` from ``dense`` (shared layers' heads reordered by ``orders``), with
    ``optimizer`` (if any) re-pointed at it."""
    config = dense.config
    model = new_sa_model(dense, groups, orders)
    if optimizer is not None:
        carry_optimizer(
            optimizer,
            dict(dense.named_parameters()),
            dict(model.named_parameters()),
            lambda state: retrofit_state(state, config, groups, orders),
        )
    return model


def carry_optimizer(
    optimizer: torch.optim.Optimizer,
    old: dict[str, nn.Parameter],
    new: dict[str, nn.Parameter],
    convert: Callable[[dict[str, Tensor]], dict[str, Tensor]],
) -> None:
    """Point ``optimizer``'s param groups from the ``old`` model's parameters to the ``new`` one's (same
    names; a name missing from ``new`` is dropped), and its state with them: each buffer shaped like its
    weight goes through ``convert`` (the weights' own head permutation), the rest (AdamW's step count) is
    kept as it is. Groups, hyperparameters and the LR schedule stay untouched."""
    name_of = {id(p): name for name, p in old.items()}
    state = {name_of[id(p)]: values for p, values in optimizer.state.items()}
    carried: dict[str, dict[str, Any]] = {name: {} for name in state if name in new}
    buffers = {
        key
        for name, values in state.items()
        for key, value in values.items()
        if torch.is_tensor(value) and value.shape == old[name].shape
    }
    for name, values in state.items():
        for key, value in values.items():
            if name in carried and key not in buffers:
                carried[name][key] = value
    for key in buffers:
        converted = convert({name: values[key] for name, values in state.items() if key in values})
        for name, value in converted.items():
            carried[name][key] = value
    for group in optimizer.param_groups:
        group["params"] = [new[name_of[id(p)]] for p in group["params"] if name_of[id(p)] in new]
    optimizer.state.clear()  # in place: a composed optimizer's inner optimizers share this mapping
    for name, values in carried.items():
        optimizer.state[new[name]] = values


Decision = tuple[list[list[int]] | None, dict[int, list[int]], dict[str, float]]


def decide(switch: SASwitch, model: SAModel, inputs: Tensor) -> Decision:
    """At a step where :meth:`SASwitch.due`, on the batch's ``inputs``: the groups to switch to (None: not
    yet), the kv-head order of each shared layer (empty without head matching), and the measurement's
    metrics."""
    rows = inputs[: switch.rows, :MEASURE_LEN]
    maps = None
    metrics: dict[str, float] = {}
    if switch.similarity is not None:
        maps = attention_maps(model, rows)
        metrics["sa_switch/similarity"] = mean_neighbour_similarity(maps)
        if metrics["sa_switch/similarity"] < switch.similarity:
            return None, {}, metrics
    if maps is None and (switch.head_matching or switch.kv_budget is not None):
        maps = attention_maps(model, rows)
    groups = choose_groups(switch, model.config, maps)
    if not switch.head_matching:
        return groups, {}, metrics
    assert maps is not None and model.config.n_kv_heads is not None
    return groups, head_orders(maps, groups, model.config.n_kv_heads), metrics


def switch_metrics(step: int, groups: list[list[int]]) -> dict[str, float]:
    """``sa_switch/step``, the number of anchors, the KV cache against the dense one, and the group of each
    layer (``sa_switch/group/<layer>``, 0 for the first group)."""
    n_layers = sum(len(group) for group in groups)
    metrics = {
        "sa_switch/step": float(step),
        "sa_switch/anchors": float(len(groups)),
        "sa_switch/kv_vs_dense": kv_fraction(n_layers, len(groups)),
    }
    for index, group in enumerate(groups):
        for layer in group:
            metrics[f"sa_switch/group/{layer}"] = float(index)
    return metrics
