"""scripts/quality_study.py end to end in its smoke mode: every variant, seed and budget is trained,
converted or fine-tuned through the CLI, and the JSON, table, PNGs and docs block are written."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "quality_study.py"


def load_script():
    """The script as a module; registered in sys.modules first, as its dataclasses need."""
    spec = importlib.util.spec_from_file_location("quality_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_smoke_study_covers_every_variant_seed_and_budget(tmp_path):
    study = load_script()
    out, docs = tmp_path / "study", tmp_path / "docs" / "quality.md"
    docs.parent.mkdir()
    docs.write_text("# Quality study\n\nProse written by hand.\n")
    study.main(["--smoke", "--out", str(out), "--docs", str(docs)])

    report = json.loads((out / "results.json").read_text())
    runs = {(run["variant"], run["seed"], run["passes"]): run for run in report["runs"]}
    expected = {(variant, seed, passes) for variant in study.VARIANTS for seed in (1, 2) for passes in (1, 3)}
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
            retrofit = runs[(variant, seed, 3)]
            assert math.isfinite(retrofit["results"]["val_ppl_converted"])
            assert retrofit["dense_tokens"] == runs[("dense", seed, 3)]["train_tokens"]

    table = (out / "table.md").read_text()
    for label in (
        "| dense |",
        "| every2 |",
        "| every4 |",
        "| paper |",
        "retrofit, converted",
        "retrofit-unmatched, fine-tuned",
    ):
        assert label in table
    for png in (
        out / "loss.png",
        docs.parent / "quality-loss-smoke.png",
        docs.parent / "quality-similarity-dense-smoke.png",
    ):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    text = docs.read_text()
    assert text.startswith("# Quality study\n\nProse written by hand.\n")
    assert text.count("<!-- quality-study:smoke -->") == 1 and "| 3 passes | paper |" in text


def test_docs_block_is_replaced_and_the_prose_around_it_kept(tmp_path):
    study = load_script()
    docs = tmp_path / "quality.md"
    docs.write_text("# Title\n\nBefore.\n")
    study.update_docs(docs, "cpu", "first table")
    docs.write_text(docs.read_text() + "\nAfter.\n")
    study.update_docs(docs, "cpu", "second table")
    study.update_docs(docs, "cuda", "gpu table")
    text = docs.read_text()
    assert "first table" not in text and text.count("second table") == 1
    assert text.index("Before.") < text.index("second table") < text.index("After.") < text.index("gpu table")
