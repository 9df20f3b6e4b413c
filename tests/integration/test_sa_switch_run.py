"""model.sa_switch through ``python -m sa_train fit``: the switch, its metrics, and exact resume across it."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from test_cli import kill_module_when, tiny_run_config
from test_distributed import (
    LOSS_TOL,
    assert_bitwise_equal,
    checkpoints_every,
    final_weights,
    losses,
    quick,
    recording_losses,
)

from sa_train import SAModel
from sa_train.analysis import anchors_for_kv_budget
from sa_train.cli import main

DENSE = ["--model.config.sa_groups=dense", "--model.optimizer=muon"]


def rows(tmp_path: Path, version: int) -> list[dict[str, str]]:
    return list(csv.DictReader((tmp_path / "runs" / "tiny" / f"version_{version}" / "metrics.csv").open()))


def column(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    return {int(row["step"]): float(row[key]) for row in rows if row.get(key)}


def groups_logged(rows: list[dict[str, str]], n_layers: int) -> list[list[int]]:
    index = [next(iter(column(rows, f"sa_switch/group/{layer}").values())) for layer in range(n_layers)]
    return [[layer for layer in range(n_layers) if index[layer] == g] for g in sorted(set(index))]


@pytest.mark.slow
def test_a_run_resumed_across_its_switch_is_bitwise_the_uninterrupted_one(tmp_path, small_corpus):
    """Dense for 3 steps, then SA groups of 2 with heads matched, Muon and AdamW carried over; the cost
    metrics describe each model from its first step. Runs resumed from the step-6 checkpoint (SA) and from
    the step-2 one (dense: it switches after its resume) end on the uninterrupted run's weights and losses."""
    config = tiny_run_config(tmp_path, small_corpus)
    switch = [*DENSE, "--model.sa_switch.at_step=3", "--model.sa_switch.groups=every:2", *quick()]
    full, after, before = tmp_path / "full", tmp_path / "after", tmp_path / "before"

    def fit(*args: str) -> None:
        assert main(["fit", "--config", str(config), *switch, *args]) == 0

    costs = ["--trainer.callbacks+=sa_train.callbacks.InferenceCost", "--trainer.callbacks.measure=false"]
    fit(*checkpoints_every(full, 2), *recording_losses(full / "losses.json"), *costs)
    fit(
        *checkpoints_every(after, 2),
        *recording_losses(after / "losses.json"),
        f"--ckpt_path={full / 'step=6.ckpt'}",
    )
    fit(
        *checkpoints_every(before, 2),
        *recording_losses(before / "losses.json"),
        f"--ckpt_path={full / 'step=2.ckpt'}",
    )

    metrics = rows(tmp_path, 0)
    assert column(metrics, "sa_switch/step") == {3: 3.0}
    assert groups_logged(metrics, 4) == [[0, 1], [2, 3]]
    assert column(metrics, "cost/kv_vs_dense") == {0: 1.0, 3: 0.75}  # the dense model's, then the SA one's
    assert SAModel.from_checkpoint(full / "step=2.ckpt").config.groups == [[0], [1], [2], [3]]
    assert SAModel.from_checkpoint(full / "step=4.ckpt").config.groups == [[0, 1], [2, 3]]
    assert not column(rows(tmp_path, 1), "sa_switch/step")  # resumed past the switch: no second one
    assert column(rows(tmp_path, 2), "sa_switch/step") == {3: 3.0}  # resumed before it: switched again
    expected = final_weights(full / "step=8.ckpt")
    assert "model.layers.1.attn.q_proj.weight" not in expected
    assert_bitwise_equal(final_weights(after / "step=8.ckpt"), expected)
    assert_bitwise_equal(final_weights(before / "step=8.ckpt"), expected)
    assert losses(after / "losses.json") == losses(full / "losses.json")[6:]
    assert losses(before / "losses.json") == losses(full / "losses.json")[2:]


@pytest.mark.slow
def test_the_switch_waits_for_the_measured_similarity_and_takes_the_groups_of_the_kv_budget(
    tmp_path, small_corpus
):
    """Measured every 2 steps from step 2: with a threshold no measurement reaches, the run stays dense;
    with the threshold at a value the first run measured, the second switches at the first measurement
    that reaches it (the two runs measure the same values until then), into groups within the budget;
    validate reads its checkpoint with the run's config."""
    config = tiny_run_config(tmp_path, small_corpus)
    measured = [
        *DENSE,
        "--model.sa_switch.at_step=2",
        "--model.sa_switch.every_n_steps=2",
        "--model.sa_switch.kv_budget=0.7",
        *quick(),
    ]
    assert main(["fit", "--config", str(config), *measured, "--model.sa_switch.similarity=1.0"]) == 0
    curve = column(rows(tmp_path, 0), "sa_switch/similarity")
    assert sorted(curve) == [2, 4, 6]  # at the start of steps 3, 5 and 7
    assert all(0 < value < 1 for value in curve.values())
    assert not column(rows(tmp_path, 0), "sa_switch/step")
    threshold = curve[6]
    switch_step = min(step for step, value in curve.items() if value >= threshold)

    assert main(["fit", "--config", str(config), *measured, f"--model.sa_switch.similarity={threshold}"]) == 0
    metrics = rows(tmp_path, 1)
    assert column(metrics, "sa_switch/step") == {switch_step: float(switch_step)}
    assert column(metrics, "sa_switch/similarity") == {s: v for s, v in curve.items() if s <= switch_step}
    groups = groups_logged(metrics, 4)
    assert len(groups) <= anchors_for_kv_budget(4, 0.7) and len(groups) < 4
    checkpoint = tmp_path / "runs" / "tiny" / "version_1" / "checkpoints" / "last.ckpt"
    assert SAModel.from_checkpoint(checkpoint).config.groups == groups
    assert torch.load(checkpoint, weights_only=True)["sa_switch"] == {"step": switch_step, "groups": groups}
    # validate with the run's config rebuilds the SA model and scores what fit's last validation scored
    assert main(["validate", "--config", str(config), *measured, f"--ckpt_path={checkpoint}"]) == 0
    validated = list(csv.DictReader((checkpoint.parent.parent / "validate" / "metrics.csv").open()))
    assert float(validated[0]["val/loss"]) == list(column(metrics, "val/loss").values())[-1]


@pytest.mark.slow
def test_a_compiled_run_killed_after_its_switch_resumes_bitwise_and_trains_as_the_eager_one(
    tmp_path, small_corpus
):
    """``compile: true`` with Muon and the switch at step 3, as a user runs it: SIGKILLed (the whole process
    group) once step 5 is done, resumed from its step-4 checkpoint (the SA model's first), it ends on the
    uninterrupted compiled run's weights bitwise. Every step's loss of the compiled run is the eager run's
    to Muon's bf16 tolerance, so the compiled loss runs the SA model after the switch, not the dense one
    its first graph was traced with."""
    config = tiny_run_config(tmp_path, small_corpus)
    switch = [*DENSE, "--model.sa_switch.at_step=3", "--model.sa_switch.groups=every:2", *quick()]
    compiled = [*switch, "--model.compile=true"]
    eager, full, killed = tmp_path / "eager", tmp_path / "full", tmp_path / "killed"
    assert main(["fit", "--config", str(config), *switch, *recording_losses(eager / "losses.json")]) == 0
    assert (
        main(
            [
                "fit",
                "--config",
                str(config),
                *compiled,
                *checkpoints_every(full, 4),
                *recording_losses(full / "losses.json"),
            ]
        )
        == 0
    )
    marker = tmp_path / "step"
    kill_module_when(
        [
            "fit",
            "--config",
            str(config),
            *compiled,
            *checkpoints_every(killed, 2),
            "--trainer.callbacks+=distributed_helpers.StepMarker",
            f"--trainer.callbacks.path={marker}",
        ],
        tmp_path,
        lambda: marker.exists() and int(marker.read_text() or 0) >= 5,
        timeout=400,
    )
    assert (killed / "step=4.ckpt").exists() and not (killed / "step=6.ckpt").exists()
    resumed = [*compiled, *checkpoints_every(killed, 2), f"--ckpt_path={killed / 'step=4.ckpt'}"]
    assert main(["fit", "--config", str(config), *resumed]) == 0

    assert_bitwise_equal(final_weights(killed / "step=8.ckpt"), final_weights(full / "step=8.ckpt"))
    assert losses(full / "losses.json") == pytest.approx(losses(eager / "losses.json"), abs=LOSS_TOL)
