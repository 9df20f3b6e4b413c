"""model.optimizer=muon: the split of the weights, one optimizer that steps as torch's two, exact resume."""

from __future__ import annotations

import io

import pytest
import torch

from sa_train import SAConfig
from sa_train.model import SAModel
from sa_train.optim import MUON_ADJUST_LR, build_muon_optimizer, uses_muon
from sa_train.training import warmup_cosine

CONFIG = SAConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)


def batches(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 64, (2, 9), generator=generator) for _ in range(count)]


def train(model: SAModel, optimizer: torch.optim.Optimizer, schedule, data: list[torch.Tensor]) -> None:
    for ids in data:
        logits = model(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()


def schedule_of(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps=2, total_steps=8, min_lr_ratio=0.1)
    )


@pytest.mark.parametrize("tie", [False, True])
def test_muon_takes_the_layers_matrices_and_adamw_the_rest(tie):
    model = SAModel(SAConfig(**{**CONFIG.to_dict(), "tie_embeddings": tie, "sa_groups": "every:2"}))
    optimizer = build_muon_optimizer(
        model, lr=1e-3, muon_lr=5e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8
    )
    decayed, plain, muon = optimizer.param_groups
    names = {id(p): name for name, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in muon["params"]) == sorted(
        name for name, p in model.named_parameters() if name.startswith("layers.") and p.ndim == 2
    )
    assert all(names[id(p)].endswith(("_proj.weight",)) for p in muon["params"])
    assert {names[id(p)] for p in decayed["params"]} == (
        {"embed.weight"} if tie else {"embed.weight", "lm_head.weight"}
    )
    assert all(names[id(p)].endswith("norm.weight") for p in plain["params"])
    assert (decayed["lr"], decayed["weight_decay"], plain["weight_decay"]) == (1e-3, 0.1, 0.0)
    assert (muon["lr"], muon["weight_decay"], muon["adjust_lr_fn"]) == (5e-3, 0.1, MUON_ADJUST_LR)
    counted = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    assert counted == model.num_parameters()  # every weight once, the tied one too
    assert not uses_muon("embed.weight", model.embed.weight)


def test_one_optimizer_steps_as_torch_muon_and_adamw_under_one_schedule():
    torch.manual_seed(0)
    model = SAModel(CONFIG)
    twin = SAModel(CONFIG)
    twin.load_state_dict(model.state_dict())
    optimizer = build_muon_optimizer(
        model, lr=1e-2, muon_lr=2e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8
    )
    named = dict(twin.named_parameters())
    hidden = [p for name, p in named.items() if uses_muon(name, p)]
    rest = [p for name, p in named.items() if not uses_muon(name, p)]
    adamw = torch.optim.AdamW(
        [
            {"params": [p for p in rest if p.ndim == 2]},
            {"params": [p for p in rest if p.ndim == 1], "weight_decay": 0.0},
        ],
        lr=1e-2,
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=0.1,
        fused=True,
    )
    muon = torch.optim.Muon(hidden, lr=2e-2, weight_decay=0.1, adjust_lr_fn=MUON_ADJUST_LR)
    data = batches(5)
    train(model, optimizer, schedule_of(optimizer), data)
    schedules = [schedule_of(adamw), schedule_of(muon)]
    for ids in data:
        logits = twin(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        for inner, schedule in zip((adamw, muon), schedules, strict=True):
            inner.step()
            schedule.step()
            inner.zero_grad()
    assert optimizer.param_groups[2]["lr"] == muon.param_groups[0]["lr"] < 2e-2  # the schedule reached Muon
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert any(
        not torch.equal(p, q) for p, q in zip(model.parameters(), SAModel(CONFIG).parameters(), strict=True)
    )


def test_a_resumed_muon_run_is_bitwise_the_uninterrupted_one():
    """State saved after 3 steps (through torch.save and a weights_only load, as checkpoints are read),
    loaded into a freshly built model, optimizer and schedule: 3 more steps end on the weights of 6."""
    data = batches(6)

    def built(state=None):
        torch.manual_seed(0)
        model = SAModel(CONFIG)
        optimizer = build_muon_optimizer(
            model, lr=1e-2, muon_lr=2e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8
        )
        schedule = schedule_of(optimizer)
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
        return model, optimizer, schedule

    model, optimizer, schedule = built()
    train(model, optimizer, schedule, data)
    first = built()
    train(*first, data[:3])
    buffer = io.BytesIO()
    torch.save(
        {
            "model": first[0].state_dict(),
            "optimizer": first[1].state_dict(),
            "schedule": first[2].state_dict(),
        },
        buffer,
    )
    buffer.seek(0)
    resumed = built(torch.load(buffer, weights_only=True))
    assert (
        resumed[1].muon.state is resumed[1].state
        and resumed[1].adamw.param_groups[0] is resumed[1].param_groups[0]
    )
    train(*resumed, data[3:])
    for (name, p), q in zip(model.named_parameters(), resumed[0].parameters(), strict=True):
        assert torch.equal(p, q), name


def test_a_grad_scaler_unscales_for_both_optimizers_before_they_step():
    """16-mixed's path: GradScaler.unscale_ (before clipping) and GradScaler.step on the one optimizer; with
    a power-of-two scale and no overflow, the steps are bitwise those of unscaled gradients."""
    data = batches(3)
    runs = []
    for scaled in (False, True):
        torch.manual_seed(0)
        model = SAModel(CONFIG)
        optimizer = build_muon_optimizer(
            model, lr=1e-2, muon_lr=2e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, fused=False
        )
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=scaled)
        for ids in data:
            logits = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
        runs.append(list(model.parameters()))
    assert not getattr(optimizer, "_step_supports_amp_scaling", False)
    for p, q in zip(*runs, strict=True):
        assert torch.equal(p, q)
