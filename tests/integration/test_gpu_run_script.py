"""scripts/gpu_run.sh, the one-command GPU session of issue 20: its CPU dry run runs every step (tiny
shapes, the Triton interpreter, a few fit steps) so the script cannot rot between GPU visits, and a step
that fails or overruns its time box is recorded as such without stopping the others."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_run.py"
STEPS = ["prepare", "gpu_tests", "kernels", "training", "fit_dense", "fit_sa", "decode"]


def load_script(monkeypatch):
    """The entry as a module; its sibling modules (gpu_run_steps, gpu_run_env) import from scripts/."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("gpu_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_runs_every_step_and_summarises_finite_figures(tmp_path):
    out = tmp_path / "out"
    start = time.monotonic()
    done = subprocess.run(
        [
            "bash",
            str(ROOT / "scripts" / "gpu_run.sh"),
            "--dry-run",
            str(out),
            "--work",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=420,
        check=False,
    )
    seconds = time.monotonic() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "dry-run"
    assert summary["environment"]["torch"] and summary["environment"]["missing"] == []
    assert [step["name"] for step in summary["steps"]] == STEPS
    for step in summary["steps"]:
        name = step["name"]
        assert step["status"] == "ok", (name, step.get("error"), step.get("log_tail"))
        assert step["figures"], name
        assert all(math.isfinite(value) for value in step["figures"].values()), (name, step["figures"])
        assert 0 < step["seconds"] <= step["timeout_s"] + 10, (name, step["seconds"], step["timeout_s"])
        assert (out / step["log"]).read_text().startswith("$ "), name
    assert summary["seconds"] <= seconds

    figures = {step["name"]: step["figures"] for step in summary["steps"]}
    assert figures["prepare"]["train_tokens"] > 0
    assert figures["gpu_tests"]["tests"] > 0 and figures["gpu_tests"]["failed"] == 0
    assert figures["kernels"]["anchor_vs_flash_fwdbwd_min"] > 0
    assert figures["kernels"]["group_default_vs_sa-warps8_fwdbwd/d16_t16"] > 0
    for case in ("sa-triton", "dense", "hf-llama"):
        assert figures["training"][f"{case}/eager/tokens_per_sec"] > 0
    for fit in ("fit_dense", "fit_sa"):
        assert figures[fit]["tokens_per_sec"] > 0 and figures[fit]["validations"] == 2, figures[fit]
        assert figures[fit]["checkpoint_mb"] > 0
    for setting in ("b1_p8", "b2_p8"):
        assert figures["decode"][f"{setting}/sa/tokens_per_sec"] > 0
    targets = summary["targets"]
    assert targets["fit_sa_vs_dense_tokens_per_sec"]["value"] > 0
    assert targets["generate_sa_vs_dense_b1"]["value"] > 0
    # What the device tool brings back from $OUT: at most 8 files.
    assert len(list(out.iterdir())) <= 8
    assert not (tmp_path / "work" / "runs" / "fit-sa" / "version_0" / "checkpoints").exists()


def test_a_failing_or_overrunning_step_is_recorded_and_the_next_still_runs(tmp_path, monkeypatch):
    gpu_run = load_script(monkeypatch)
    ctx = gpu_run.Context(tmp_path, tmp_path, True, {"PATH": "/usr/bin:/bin"}, time.monotonic() + 60, {})

    def no_figures(ctx, record):
        record["figures"] = {"n": 1.0}

    steps = [
        gpu_run.Step("crash", 0.5, lambda ctx: ["sh", "-c", "echo broken; exit 3"], no_figures),
        gpu_run.Step("hang", 0.5, lambda ctx: ["sleep", "60"], no_figures),
        gpu_run.Step("fine", 0.5, lambda ctx: ["true"], no_figures),
    ]
    records = [
        gpu_run._finish(ctx, gpu_run._launch(ctx, str(i), step, box=2)) for i, step in enumerate(steps)
    ]
    crash, hang, fine = records
    assert crash["status"] == "failed" and crash["returncode"] == 3 and "broken" in crash["log_tail"]
    assert hang["status"] == "timeout" and hang["seconds"] < 10
    assert fine["status"] == "ok" and fine["figures"] == {"n": 1.0}
