"""One GPU session in one command (issue 20): every GPU figure of this version, time-boxed, into one folder.

    bash scripts/gpu_run.sh out/              # on one CUDA GPU: about 8 minutes at most
    bash scripts/gpu_run.sh --dry-run out/    # the same steps on CPU at tiny shapes (CI runs this)

Steps, in this order, each a subprocess under coreutils ``timeout`` so a hang or a crash costs only its
own time box:

0. ``prepare``: ``python -m sa_train prepare`` of the fits' data (BPE and token cache), on the CPU beside
   steps 1-3, so the fits' time boxes hold only training;
1. ``gpu_tests``: ``TRITON_INTERPRET=0 python -m pytest tests/gpu``;
2. ``kernels``: ``scripts/bench_kernels.py``, the anchor kernel against flash SDPA (forward and forward +
   backward, bf16, D 64 and 128, T 1024-8192) and a whole SA group, default tiles beside the backward at
   8 warps (``--backward-warps 8``);
3. ``training``: ``scripts/bench_gpu_training.py``, 350M training tokens/s and MFU of SA (triton), dense
   and HF ``LlamaForCausalLM``, eager and compiled, batch 8 x 2048, bf16;
4. ``fit_dense``, ``fit_sa``: ``python -m sa_train fit`` of configs/dense-350m.yaml and
   configs/sa-350m.yaml on the shipped corpus (offline), ``--trainer.strategy auto``, 60 optimizer steps
   of one batch each (no accumulation, so the run fits its time box), validation at steps 30 and 60:
   ``train/tokens_per_sec`` and ``train/mfu`` from ``metrics.csv``, and that the run validated and wrote
   ``last.ckpt``;
5. ``decode``: ``python -m sa_train bench --suite decode --device cuda``, batch 1 and 16 at context 2048.

The output folder gets ``summary.json`` and one log per step (``0-prepare.log`` ...): 8 files, as many
as the device tool brings back. The summary is rewritten after every step, so a run killed half-way
still says what it did: for each step its status (ok, failed, timeout), seconds, time box, command, key
figures and, where it failed, the log's tail; the versions and device; and the issue's targets with the
measured value beside each. Runs, checkpoints and caches go to a scratch folder (``--work``, a temporary
one by default, removed at the end unless ``--keep-work``).

Time: ``--budget`` seconds (450 on GPU) are shared by the steps in fixed proportions; a step's time box
is what is left of the budget less the shares of the steps after it, so time a step does not use goes
to the next one, and a step that overruns cannot take a later step's share. The benchmarks write their
figures as they go, so a step stopped by its time box still reports what it measured (``--steps`` runs
a subset, ``--budget`` changes the total).

The GPU machine has no network and lacks ``datasets`` and ``jsonargparse``: wheels in ``.gpu_wheels/``
(ignored by git; carry it) are installed into the scratch folder when those do not import. Fetch them
here once (pure-Python wheels for the GPU machine's Python 3.12; multiprocess is built per version):

    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .gpu_wheels \\
        datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 jsonargparse==4.53.0 docstring-parser==0.18.0 \\
        typeshed-client==2.15.0

``--dry-run`` runs every step on CPU (CUDA hidden, Triton in the interpreter): tiny models and shapes, no
compilation, a fit of a few steps on a slice of the corpus; tests/gpu skip themselves there. It checks
that the script, the benchmarks' flags and the summary keep working, not any speed.

This file is the run: its arguments, the time boxes, launching and finishing each step, and the summary
with the targets. Each step's command and the parser of its figures are in ``gpu_run_steps.py``; the
steps' environment (carried wheels, version probe) and the dry run's inputs in ``gpu_run_env.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpu_run_env import dry_inputs, environment
from gpu_run_steps import DECODE_PROMPT, PREPARE, ROOT, STEPS, Context, Step, StepFailed

GPU_BUDGET_S = 450.0
DRY_BUDGET_S = 300.0
KILL_AFTER_S = 10  # timeout's grace between TERM and KILL

# Targets of issue 20, each a ratio or rate from one run, higher is better.
TARGETS = {
    "fit_sa_vs_dense_tokens_per_sec": 1.25,
    "dense_compiled_mfu": 0.45,
    "kernel_fwdbwd_vs_flash_min": 1.0,
    "generate_sa_b1_tokens_per_sec": 2000.0,
    "generate_sa_vs_dense_b1": 1.3,
}


# ------------------------------------------------------------------------------------------ the run


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path, help="output folder (default: $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on CPU at tiny shapes")
    parser.add_argument("--budget", type=float, help=f"seconds for all steps ({GPU_BUDGET_S:.0f} on GPU)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch folder")
    parser.add_argument("--steps", nargs="+", choices=[s.name for s in STEPS], help="run only these steps")
    args = parser.parse_args(argv)
    if args.out is None:
        if not os.environ.get("OUT"):
            parser.error("give the output folder (or set $OUT)")
        args.out = Path(os.environ["OUT"])
    if os.environ.get("GPU_RUN_DRY", "").strip().lower() in {"1", "true", "yes"}:
        args.dry_run = True
    return args


def _write_summary(ctx: Context) -> None:
    ctx.summary["targets"] = _targets(ctx.summary["steps"])
    tmp = ctx.out / "summary.json.tmp"
    tmp.write_text(json.dumps(ctx.summary, indent=1, default=str))
    tmp.replace(ctx.out / "summary.json")


def _targets(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 20's targets beside what this run measured (None where a step gave no figure)."""
    fig = {step["name"]: step.get("figures", {}) for step in steps}

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    b1 = f"b1_p{DECODE_PROMPT}"
    b1 = next((key.split("/")[0] for key in fig.get("decode", {}) if key.startswith("b1_")), b1)
    values = {
        "fit_sa_vs_dense_tokens_per_sec": ratio(
            fig.get("fit_sa", {}).get("tokens_per_sec"), fig.get("fit_dense", {}).get("tokens_per_sec")
        ),
        "dense_compiled_mfu": fig.get("training", {}).get("dense/compiled/mfu"),
        "kernel_fwdbwd_vs_flash_min": fig.get("kernels", {}).get("anchor_vs_flash_fwdbwd_min"),
        "generate_sa_b1_tokens_per_sec": fig.get("decode", {}).get(f"{b1}/sa/tokens_per_sec"),
        "generate_sa_vs_dense_b1": fig.get("decode", {}).get(f"{b1}/sa_vs_dense"),
    }
    return {
        name: {
            "value": value,
            "target": TARGETS[name],
            "met": None if value is None else value >= TARGETS[name],
        }
        for name, value in values.items()
    }


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class Running:
    """A step's process under ``timeout``, its log and its record so far."""

    step: Step
    record: dict[str, Any]
    log: Path
    start: float
    process: subprocess.Popen | None = None
    ended: float | None = None  # set by a watcher thread, so a step run in the background is timed too

    def watch(self) -> None:
        assert self.process is not None
        self.process.wait()
        self.ended = time.monotonic()


def _launch(ctx: Context, label: str, step: Step, box: int) -> Running:
    log = ctx.out / f"{label}-{step.name}.log"
    record: dict[str, Any] = {"name": step.name, "status": "failed", "timeout_s": box, "log": log.name}
    record["figures"] = {}
    running = Running(step, record, log, time.monotonic())
    try:
        command = step.command(ctx)
    except Exception as err:  # a step that cannot even be set up fails alone
        record["error"] = f"{type(err).__name__}: {err}"
        return running
    record["command"] = " ".join(command)
    print(f"[gpu_run] {label}. {step.name} (time box {box} s): {record['command']}", flush=True)
    with log.open("w") as f:
        f.write(f"$ {record['command']}\n\n")
        f.flush()
        running.process = subprocess.Popen(
            ["timeout", f"--kill-after={KILL_AFTER_S}", str(box), *command],
            cwd=ROOT,
            env=ctx.env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    threading.Thread(target=running.watch, daemon=True).start()
    return running


def _finish(ctx: Context, running: Running) -> dict[str, Any]:
    """Wait for the step, read its figures and set its status: ok, failed or timeout."""
    record = running.record
    if running.process is None:
        record["seconds"] = 0.0
        return record
    returncode = running.process.wait()
    while running.ended is None:  # the watcher notes the end an instant after wait() returns
        time.sleep(0.01)
    record["seconds"] = round(running.ended - running.start, 1)
    record["returncode"] = returncode
    try:
        running.step.parse(ctx, record)
        problem = None
    except StepFailed as err:
        problem = str(err)
    except Exception as err:  # nothing to read: the step died before writing it
        problem = f"no result to read ({type(err).__name__}: {err})"
    bad = {key: value for key, value in record["figures"].items() if not math.isfinite(value)}
    if bad:
        problem = f"non-finite figures {bad}" + (f"; {problem}" if problem else "")
    if returncode in (124, 137):  # timeout's TERM, then KILL
        record["status"] = "timeout"
    else:
        record["status"] = "failed" if returncode != 0 or problem else "ok"
    if problem:
        record["error"] = problem
    if record["status"] != "ok":
        record["log_tail"] = _tail(running.log)
    print(f"[gpu_run] {running.step.name}: {record['status']} in {record['seconds']} s", flush=True)
    return record


def _box(ctx: Context, step: Step, later_share: float, budget: float) -> int:
    """What is left of the budget less the later steps' shares, at least this step's share."""
    box = max(step.share * budget, ctx.deadline - time.monotonic() - later_share * budget)
    return max(5, int(box) - KILL_AFTER_S)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    budget = args.budget or (DRY_BUDGET_S if args.dry_run else GPU_BUDGET_S)
    started = time.monotonic()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = (args.work or Path(tempfile.mkdtemp(prefix="sa_gpu_run_"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env, info = environment(args.dry_run, work)
    summary: dict[str, Any] = {
        "mode": "dry-run" if args.dry_run else "gpu",
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "budget_s": budget,
        "work": str(work),
        "environment": info,
        "steps": [],
    }
    ctx = Context(out, work, args.dry_run, env, time.monotonic() + budget, summary)
    if args.dry_run:
        ctx.files = dry_inputs(work)
    steps = [step for step in STEPS if not args.steps or step.name in args.steps]
    _write_summary(ctx)
    prepare = None
    try:
        if any(step.name.startswith("fit_") for step in steps):
            # Tokenising the corpus is CPU work: done beside the first steps, so the fits' time boxes
            # hold only training. A fit builds the cache itself if this fails.
            before_fit = [s for s in steps if not s.name.startswith("fit_")][:3]
            box = max(30, int(sum(s.share for s in before_fit) * budget) - KILL_AFTER_S)
            prepare = _launch(ctx, "0", PREPARE, box)
        for index, step in enumerate(steps, 1):
            if step.name.startswith("fit_") and prepare is not None:
                summary["steps"].insert(0, _finish(ctx, prepare))
                prepare = None
            later = sum(s.share for s in steps[index:])
            summary["steps"].append(
                _finish(ctx, _launch(ctx, str(index), step, _box(ctx, step, later, budget)))
            )
            _write_summary(ctx)
    finally:
        if prepare is not None and prepare.process is not None:
            prepare.process.kill()
        summary["seconds"] = round(time.monotonic() - started, 1)
        summary["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
        _write_summary(ctx)
        if not args.keep_work and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    failed = [s["name"] for s in summary["steps"] if s["status"] != "ok"]
    print(
        f"[gpu_run] {len(steps) - len(failed)}/{len(steps)} steps ok in {summary['seconds']} s: "
        f"{out / 'summary.json'}"
    )
    for name, target in summary["targets"].items():
        print(f"[gpu_run] target {name}: {target['value']} (>= {target['target']}: {target['met']})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
