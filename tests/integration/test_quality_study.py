"""scripts/quality_study.py end to end in its smoke mode: every variant, seed and budget is trained,
converted, switched or fine-tuned through the CLI, and the JSON, tables, PNGs and docs block are written."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load(name, monkeypatch):
    """``scripts/<name>.py`` as a module, with scripts/ on sys.path as ``python scripts/quality_study.py``
    has it: the script and its quality_*.py modules import each other by name."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    return importlib.import_module(name)


def test_smoke_study_covers_every_variant_seed_and_budget(tmp_path, monkeypatch):
    study, config = load("quality_study", monkeypatch), load("quality_config", monkeypatch)
    out, docs = tmp_path / "study", tmp_path / "docs" / "quality.md"
    docs.parent.mkdir()
    docs.write_text("# Quality study\n\nProse written by hand.\n")
    # Budgets of 1 and 2 "passes" of 2 steps each: ten variants × two seeds × two budgets (40 fits, 8
    # retrofits) took 49–61 s on a loaded 2-core machine (user CPU 49–52 s against 39 s for the six issue-12
    # variants at 1 and 3 passes of 3 steps); 1 and 3 passes of 3 steps for all ten took 67 s (57 s).
    args = ["--smoke", "--steps", "2", "--passes", "1", "2", "--out", str(out), "--docs", str(docs)]
    study.main([*args, "--variants", *config.VARIANTS])

    report = json.loads((out / "results.json").read_text())
    runs = {(run["variant"], run["seed"], run["passes"]): run for run in report["runs"]}
    expected = {
        (variant, seed, passes) for variant in config.VARIANTS for seed in (1, 2) for passes in (1, 2)
    }
    assert set(runs) == expected
    for key, run in runs.items():
        results = run["results"]
        assert math.isfinite(results["val_ppl"]) and results["val_ppl"] > 1, key
        assert results["params"] > 0 and results["kv_bytes_per_token"] > 0, key
        assert run["train_tokens"] > 0, key
    for seed in (1, 2):
        dense, every4 = runs[("dense", seed, 1)], runs[("every4", seed, 1)]
        assert every4["results"]["kv_bytes_per_token"] < dense["results"]["kv_bytes_per_token"]
        for variant in ("retrofit", "retrofit-unmatched"):
            retrofit = runs[(variant, seed, 2)]
            assert math.isfinite(retrofit["results"]["val_ppl_converted"])
            assert retrofit["dense_tokens"] == runs[("dense", seed, 2)]["train_tokens"]

    for seed in (1, 2):
        dense, switched = runs[("dense", seed, 2)], runs[("switch-early", seed, 2)]
        assert runs[("dense-muon", seed, 2)]["optimizer"] == "muon" and dense["optimizer"] == "adamw"
        assert switched["switch_at"] == 1 and runs[("switch-late", seed, 2)]["switch_at"] == 2  # of 4 steps
        assert (
            switched["results"]["kv_bytes_per_token"]
            == runs[("every4", seed, 2)]["results"]["kv_bytes_per_token"]
        )
        assert switched["results"]["params"] == runs[("every4", seed, 2)]["results"]["params"]
        # One validation per pass, each placed at its FLOPs: dense before the switch (step 1), every:4 after.
        dense_curve, switched_curve = dense["results"]["curve"], switched["results"]["curve"]
        assert [point["step"] for point in switched_curve] == [2, 4]
        assert dense_curve[-1]["train_s"] > 0
        per_token = dense_curve[0]["flops"] / dense_curve[0]["tokens"]
        every4 = runs[("every4", seed, 2)]["results"]["curve"]
        sa_per_token = every4[0]["flops"] / every4[0]["tokens"]
        step_tokens = dense_curve[0]["tokens"] / 2
        assert math.isclose(switched_curve[0]["flops"], step_tokens * (per_token + sa_per_token))
        assert (
            every4[-1]["flops"]
            < switched_curve[-1]["flops"]
            < runs[("switch-late", seed, 2)]["results"]["curve"][-1]["flops"]
            < dense_curve[-1]["flops"]
        )

    compute = report["compute"]["micro"]["2"]
    dense_final = [runs[("dense", seed, 2)]["results"]["val_loss"] for seed in (1, 2)]
    assert math.isclose(compute["target_val_loss"], sum(dense_final) / 2)
    assert set(compute["variants"]) == set(config.VARIANTS) - set(config.RETROFITS)
    assert compute["variants"]["dense"]["flops_to_target_vs_dense"] == 1
    for variant, figures in compute["variants"].items():
        assert len(figures["flops_to_target_per_seed"]) == 2 and len(figures["curve"]) == 2, variant

    table = (out / "table.md").read_text()
    for label in (
        "| dense |",
        "| every2 |",
        "| every4 |",
        "| paper |",
        "retrofit, converted",
        "retrofit-unmatched, fine-tuned",
        "| dense-muon |",
        "`dense` → `every:4` after step 1",
        "| 2 passes | switch-late | adamw |",
        "FLOPs to reach dense's loss",
    ):
        assert label in table
    for png in (
        out / "loss.png",
        out / "compute.png",
        docs.parent / "quality-loss-smoke.png",
        docs.parent / "quality-compute-smoke.png",
        docs.parent / "quality-similarity-dense-smoke.png",
    ):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    text = docs.read_text()
    assert text.startswith("# Quality study\n\nProse written by hand.\n")
    assert text.count("<!-- quality-study:smoke -->") == 1 and "| 2 passes | paper |" in text


def test_compute_to_reach_a_loss_is_interpolated_between_validations(monkeypatch):
    metrics = load("quality_metrics", monkeypatch)
    curve = [
        {"flops": 10.0, "train_s": 1.0, "val_loss": 6.0},
        {"flops": 20.0, "train_s": 3.0, "val_loss": 5.0},
        {"flops": 30.0, "train_s": None, "val_loss": 4.0},
    ]
    assert metrics.reach(curve, 5.5, "flops") == 15.0 and metrics.reach(curve, 5.5, "train_s") == 2.0
    assert metrics.reach(curve, 6.5, "flops") == 10.0  # the first validation is already below
    assert metrics.reach(curve, 4.5, "train_s") is None and metrics.reach(curve, 3.0, "flops") is None


def test_docs_block_is_replaced_and_the_prose_around_it_kept(tmp_path, monkeypatch):
    report = load("quality_report", monkeypatch)
    docs = tmp_path / "quality.md"
    docs.write_text("# Title\n\nBefore.\n")
    report.update_docs(docs, "cpu", "first table")
    docs.write_text(docs.read_text() + "\nAfter.\n")
    report.update_docs(docs, "cpu", "second table")
    report.update_docs(docs, "cuda", "gpu table")
    text = docs.read_text()
    assert "first table" not in text and text.count("second table") == 1
    assert text.index("Before.") < text.index("second table") < text.index("After.") < text.index("gpu table")
