"""model.sa_switch: its settings, and the optimizer carried from the dense model to the SA one."""

from __future__ import annotations

import copy

import pytest
import torch

from sa_train import SAConfig, SAModel
from sa_train.analysis import attention_maps
from sa_train.convert import build_converted, convert_to_sa, head_orders, retrofit_state
from sa_train.errors import ConfigError
from sa_train.optim import build_muon_optimizer, build_optimizer
from sa_train.sa_switch import SASwitch, carry_optimizer, switch_model
from sa_train.training import CausalLM

CONFIG = SAConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=16)
GROUPS = [[0, 1], [2, 3]]
ORDERS = {1: [1, 0], 3: [1, 0]}  # both shared layers swap their two kv heads (and their query heads)


def ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(seed))


def step(model: SAModel, optimizer: torch.optim.Optimizer, seed: int) -> None:
    batch = ids(seed)
    logits = model(batch[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
    optimizer.step()
    optimizer.zero_grad()


def optimizer_for(kind: str, model: SAModel) -> torch.optim.Optimizer:
    if kind == "muon":
        return build_muon_optimizer(model, 1e-2, 2e-2, 0.1, (0.9, 0.95), 1e-8)
    return build_optimizer(model, 1e-2, 0.1, (0.9, 0.95), 1e-8)


def carried(dense: SAModel, optimizer: torch.optim.Optimizer) -> SAModel:
    sa = build_converted(dense, GROUPS, ORDERS)
    old, new = dict(dense.named_parameters()), dict(sa.named_parameters())
    carry_optimizer(optimizer, old, new, lambda state: retrofit_state(state, dense.config, GROUPS, ORDERS))
    return sa


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_optimizer_buffers_move_with_their_weights_and_the_dropped_weights_buffers_go(kind):
    torch.manual_seed(0)
    dense = SAModel(CONFIG)
    optimizer = optimizer_for(kind, dense)
    for seed in range(2):
        step(dense, optimizer, seed)
    for param, state in optimizer.state.items():  # mark each buffer: it must land where its weight lands
        for value in state.values():
            if value.shape == param.shape:
                value.copy_(param)
    sa = carried(dense, optimizer)
    stepped = [p for group in optimizer.param_groups for p in group["params"]]
    assert sorted(map(id, stepped)) == sorted(map(id, sa.parameters()))
    assert len(optimizer.state) == len(stepped)  # no state left for the shared layers' dropped Q/K
    for name, param in sa.named_parameters():
        state = optimizer.state[param]
        buffers = [value for value in state.values() if value.shape == param.shape]
        assert buffers and all(torch.equal(value, param) for value in buffers), name
        if "step" in state:
            assert int(state["step"]) == 2  # AdamW's bias correction goes on where it was
    assert not torch.equal(sa.layers[1].attn.v_proj.weight, dense.layers[1].attn.v_proj.weight)  # permuted


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_a_carried_optimizer_steps_as_one_built_for_the_sa_model_and_loaded_from_its_state(kind):
    """What a resume after the switch does: build the optimizer for the SA model, load the saved state."""
    torch.manual_seed(0)
    dense = SAModel(CONFIG)
    optimizer = optimizer_for(kind, dense)
    step(dense, optimizer, 0)
    sa = carried(dense, optimizer)
    twin = copy.deepcopy(sa)
    rebuilt = optimizer_for(kind, twin)
    rebuilt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for seed in (1, 2):
        step(sa, optimizer, seed)
        step(twin, rebuilt, seed)
    for (name, p), q in zip(sa.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_the_switch_converts_as_convert_does():
    torch.manual_seed(0)
    dense = SAModel(CONFIG).eval()
    maps = attention_maps(dense, ids(0))
    switched = switch_model(dense, GROUPS, head_orders(maps, GROUPS, 2), None)
    reference = convert_to_sa(dense, GROUPS, maps)
    assert switched.config == reference.config
    for (name, p), q in zip(switched.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"groups": "every:2"}, "model.sa_switch.at_step is required"),
        ({"at_step": -1, "groups": "every:2"}, "model.sa_switch.at_step"),
        ({"at_step": 2, "groups": "every:2", "similarity": 1.5}, "model.sa_switch.similarity"),
        ({"at_step": 2, "groups": "every:2", "every_n_steps": 0}, "model.sa_switch.every_n_steps"),
        ({"at_step": 2}, "exactly one of groups"),
        ({"at_step": 2, "groups": "every:2", "kv_budget": 0.75}, "exactly one of groups"),
        ({"at_step": 2, "kv_budget": 1.0}, "model.sa_switch.kv_budget"),
        ({"at_step": 2, "groups": "every:2", "rows": 0}, "model.sa_switch.rows"),
    ],
)
def test_bad_switch_settings_name_the_field(settings, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        CausalLM(CONFIG, sa_switch=SASwitch(**settings))


@pytest.mark.parametrize(
    ("config", "groups", "message"),
    [
        ({"sa_groups": "every:2"}, "every:2", "converts a dense model"),
        ({}, "[[0, 1], [2, 3], [4]]", r"model\.sa_switch\.groups: layer 4"),
        ({}, "dense", r"model\.sa_switch\.groups=dense is dense"),
        ({"n_layers": 1, "sa_groups": "dense"}, "every:2", "at least two layers"),
    ],
)
def test_a_switch_that_does_not_fit_the_model_is_refused(config, groups, message):
    with pytest.raises(ConfigError, match=message):
        CausalLM(SAConfig(**{**CONFIG.to_dict(), **config}), sa_switch=SASwitch(at_step=2, groups=groups))
