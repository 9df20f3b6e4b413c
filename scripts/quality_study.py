"""Quality study of issues 12 and 24: SA against its dense twin on the same tokens and seeds.

Variants of issue 12 (the default): dense; SA groups of 2; groups of 4; paper-style (dense early layers,
then groups of 3); a retrofit (each dense run converted to groups of 4 with head matching, then fine-tuned
for a fraction of a pass); and the same retrofit without head matching (``retrofit-unmatched``). Issue 24
adds, when listed in ``--variants``: dense and groups of 4 trained with Muon (``dense-muon``,
``every4-muon``), and dense runs switched to groups of 4 after a quarter and a half of their steps
(``switch-early``, ``switch-late``: ``model.sa_switch``). Every variant trains once
per seed and per data budget (one pass, several passes), each run with its own full warmup + cosine
schedule, so the one-pass figure comes from a finished run rather than a snapshot of a longer one. Each
validation point is also placed against the training FLOPs spent so far (``sa_train.cost``: dense FLOPs
before a switch, SA FLOPs after) and the training time, and the report gives the compute each variant needs
to reach the dense/AdamW runs' final validation loss. A seed
is ``seed_everything``, i.e. the initialisation: the data split and the batch order (``data.seed``) are
the same for every run, so variants see the same tokens in the same order.

The study drives the project's CLI (``python -m sa_train fit|validate|convert|analyze`` in subprocesses), so
it measures what users get, and writes into ``--out``: ``results.json`` (every raw figure), ``loss.png``
(training curves, one panel per budget), ``similarity-dense-<shape>.png`` (``analyze`` of a dense run),
``table.md``; with ``--docs`` it also updates its block in that markdown file and copies the PNGs beside
it. ``--report-only`` rewrites those outputs from a finished study without training.

    python scripts/quality_study.py                     # CPU scale, ~35 min on one core
    python scripts/quality_study.py --scale cuda        # the tiny shape at batch 16 and a wider model, bf16
    python scripts/quality_study.py --smoke --out /tmp/q  # the whole pipeline in seconds (the test's mode)
    python scripts/quality_study.py --variants dense every4 dense-muon every4-muon switch-early \
        switch-late --passes 1 --val-per-pass 4 --jobs 2       # quality at equal compute, ~35 min
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "sa-tiny.yaml"
ISSUE12_VARIANTS = ("dense", "every2", "every4", "paper", "retrofit", "retrofit-unmatched")
VARIANTS = (*ISSUE12_VARIANTS, "dense-muon", "every4-muon", "switch-early", "switch-late")
RETROFITS = ("retrofit", "retrofit-unmatched")  # converted with and without head matching
RETROFIT_GROUPS = "every:4"
MUON = ("dense-muon", "every4-muon")  # model.optimizer: muon; every other variant trains with AdamW
# model.sa_switch: dense for this fraction of the run's steps, then SWITCH_GROUPS for the rest.
SWITCHES = {"switch-early": 0.25, "switch-late": 0.5}
SWITCH_GROUPS = "every:4"


class StudyError(Exception):
    """A bad option or a failed step: the message names it and the fix."""


@dataclass(frozen=True)
class Shape:
    """One model and batch shape of the study; everything else comes from configs/sa-tiny.yaml."""

    name: str
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    seq_len: int
    batch_size: int
    lr: float
    vocab_size: int = 4096
    # Paper-style groups: dense early layers, then groups of 3, with as many anchors as groups of 2 have,
    # so the two compare at the same KV cache.
    paper_groups: str = "dense:2,every:3"

    def groups(self, variant: str) -> str:
        return {
            "dense": "dense",
            "every2": "every:2",
            "every4": "every:4",
            "paper": self.paper_groups,
            "retrofit": RETROFIT_GROUPS,
            "retrofit-unmatched": RETROFIT_GROUPS,
            "dense-muon": "dense",
            "every4-muon": "every:4",
            "switch-early": "dense",
            "switch-late": "dense",
        }[variant]

    def model_config(self, groups: str) -> Any:
        """The ``SAConfig`` of this shape with ``groups``, for the analytic costs of ``sa_train.cost``."""
        from sa_train.config import SAConfig

        return SAConfig(
            vocab_size=self.vocab_size,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            max_seq_len=self.seq_len,
            sa_groups=groups,
        )

    def train_flops_per_token(self, groups: str) -> float:
        from sa_train.cost import training_flops_per_token

        return training_flops_per_token(self.model_config(groups), self.seq_len, causal=True)

    def describe(self) -> str:
        return (
            f"d {self.d_model}, {self.n_layers} layers, {self.n_heads} heads ({self.n_kv_heads} KV), "
            f"vocab {self.vocab_size}, seq {self.seq_len}, batch {self.batch_size}, peak lr {self.lr:g}"
        )


SHAPES = {
    # CPU: the tiny config's family at half width and half the batch. One training step costs a quarter
    # of sa-tiny's on one thread (0.2 s instead of 1.4 s for the dense twin), which is what lets 16 runs
    # and 4 retrofits fit in ~35 minutes on one core.
    "small": Shape("small", 128, 8, 4, 2, 256, 4, 3e-3),
    # CUDA: the issue's two shapes, configs/sa-tiny.yaml at batch 16 and the wider model.
    "tiny": Shape("tiny", 256, 8, 8, 4, 256, 16, 3e-3),
    "wide": Shape("wide", 512, 12, 8, 4, 256, 16, 1e-3, paper_groups="dense:3,every:3"),
    # --smoke: the smallest model that still has 8 layers for the paper-style groups.
    "micro": Shape("micro", 32, 8, 2, 1, 32, 2, 3e-3, vocab_size=512),
}


@dataclass(frozen=True)
class Scale:
    """Where and on what a study runs: its shapes, its corpus and the trainer's device settings."""

    shapes: tuple[str, ...]
    works: int | None  # the first N works of the shipped corpus; None: all of it
    accelerator: str
    precision: str
    threads: int | None  # OMP/MKL threads of every run; None leaves the default
    log_every: int
    chars_per_work: int | None = None  # keep only the start of each work (smoke)
    val_batches: float | int = 1.0  # trainer.limit_val_batches: the whole val split but in smoke


SCALES = {
    # 7 works: the default split holds out coriolanus (val) and hamlet (test), leaving 5 plays (~180k
    # tokens) for training, so a pass takes ~40 s on one core and three passes ~2 minutes.
    "cpu": Scale(("small",), 7, "cpu", "32-true", 1, 5),
    "cuda": Scale(("tiny", "wide"), None, "gpu", "bf16-mixed", None, 5),
    # A pipeline check, not a measurement: 20k characters of 3 works and 4 validation batches.
    "smoke": Scale(("micro",), 3, "cpu", "32-true", 1, 1, chars_per_work=20_000, val_batches=4),
}


@dataclass
class Run:
    """One fit of the study (a from-scratch run or a retrofit's fine-tune) and what it measured."""

    shape: str
    variant: str
    seed: int
    passes: int
    groups: str
    steps: int
    train_tokens: int
    name: str
    val_every: int  # steps between validations: a fraction of a pass, or the whole fine-tune
    dense_tokens: int = 0  # retrofit: tokens of the dense run it was converted from
    optimizer: str = "adamw"  # model.optimizer
    switch_at: int | None = None  # model.sa_switch.at_step: dense steps before becoming SWITCH_GROUPS
    results: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataStats:
    """Split sizes of a prepared corpus, from which a pass's steps and tokens follow."""

    train_tokens: int
    val_tokens: int
    samples: int  # packed training samples of seq_len + 1 tokens

    def steps_per_pass(self, batch_size: int) -> int:
        return math.ceil(self.samples / batch_size)

    def tokens_in(self, steps: int, batch_size: int, seq_len: int) -> int:
        """Training tokens of the first ``steps`` steps: a pass ends with a short batch."""
        passes, rest = divmod(steps, self.steps_per_pass(batch_size))
        return (passes * self.samples + min(rest * batch_size, self.samples)) * seq_len


class SATrainCLI:
    """Runs ``python -m sa_train ARGS``, its output into a log file; fails with the log's tail.

    ``in_process`` calls the CLI's ``main`` with the same arguments instead of a subprocess: each process
    pays ~7 s of imports, which the smoke mode (30 commands of a few steps) cannot afford. The study itself
    runs subprocesses, so each run has a fresh process and its own thread setting.
    """

    def __init__(self, in_process: bool, threads: int | None) -> None:
        self.in_process = in_process
        self.threads = threads
        self.env = dict(os.environ)
        if threads is not None:
            self.env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))

    def call_in_process(self, args: Sequence[str], out: Any) -> int:
        """The CLI's ``main`` on this process's torch threads, set for the call as a subprocess's would be
        (two threads of a loaded 2-core machine made a 3-step fit take 15 s instead of 1 s)."""
        import torch

        from sa_train.cli import main

        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads or threads)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                return main(list(args))
        finally:
            torch.set_num_threads(threads)

    def __call__(self, args: Sequence[str], log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w", encoding="utf-8") as out:
            if self.in_process:
                status = self.call_in_process(args, out)
            else:
                status = subprocess.run(
                    [sys.executable, "-m", "sa_train", *args],
                    cwd=ROOT,
                    env=self.env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                ).returncode
        if status != 0:
            tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:])
            raise StudyError(
                f"`python -m sa_train {' '.join(args)}` failed with exit status {status}; its output is in "
                f"{log}, ending:\n{tail}"
            )


def write_corpus(works: int | None, chars_per_work: int | None, out: Path) -> Path:
    """The shipped corpus, or its first ``works`` works as a file of their own; the default split then
    holds out whole works of that file for validation and test, as it does for the full corpus."""
    from sa_train.data.datamodule import SHIPPED_CORPUS

    if works is None:
        return SHIPPED_CORPUS
    with gzip.open(SHIPPED_CORPUS, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()][:works]
    for record in records:
        record["text"] = record["text"][:chars_per_work]
    path = out / f"corpus-{works}-works.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def prepare(data: dict[str, Any]) -> DataStats:
    """Tokenise once (what ``python -m sa_train prepare`` does) and read the split sizes from the cache."""
    from sa_train.data import TokenDataModule

    module = TokenDataModule(**data)
    module.prepare_data()
    samples = (module.train_tokens - 1) // data["seq_len"]
    return DataStats(module.train_tokens, module.val_tokens, samples)


class Study:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.scale = SCALES[args.scale]
        self.out: Path = args.out.resolve()
        self.cli = SATrainCLI(args.scale == "smoke", args.threads)
        self.base = yaml.safe_load(BASE_CONFIG.read_text(encoding="utf-8"))
        self.corpus = write_corpus(self.scale.works, self.scale.chars_per_work, self.out)
        self.stats: dict[str, DataStats] = {}
        self.runs: list[Run] = []
        self.analysis: dict[str, Any] = {}

    # Configs ---------------------------------------------------------------------------------------

    def shape(self, name: str) -> Shape:
        shape = SHAPES[name]
        return shape if self.args.lr is None else Shape(**{**asdict(shape), "lr": self.args.lr})

    def data_section(self, shape: Shape) -> dict[str, Any]:
        return {
            **self.base["data"],
            "source": str(self.corpus),
            "vocab_size": shape.vocab_size,
            "seq_len": shape.seq_len,
            "batch_size": shape.batch_size,
            "cache_dir": str(self.out / "cache"),
        }

    def run_dir(self, run: Run) -> Path:
        return self.out / "runs" / run.name

    def write_config(self, run: Run, init_from: Path | None = None) -> Path:
        """configs/sa-tiny.yaml with the shape, groups, optimizer, switch, budget and outputs of ``run``.
        Validation covers the whole val split (but in smoke) every ``--val-per-pass``-th of a pass, the last
        step included, so the final perplexity is the full held-out one; decode timing is off (the table's
        speed is training's).

        A retrofit's fine-tune peaks at ``--retrofit-lr-scale`` of the shape's learning rate, warmed up
        over a tenth of its steps: enough to move the shared layers onto their anchor's attention in a
        short stretch, without re-warming the whole converted model to its from-scratch peak."""
        shape, scale = self.shape(run.shape), self.scale
        config = json.loads(json.dumps(self.base))
        config["seed_everything"] = run.seed
        config["model"]["config"].update(
            vocab_size=shape.vocab_size,
            d_model=shape.d_model,
            n_layers=shape.n_layers,
            n_heads=shape.n_heads,
            n_kv_heads=shape.n_kv_heads,
            max_seq_len=shape.seq_len,
            sa_groups=run.groups,
        )
        config["model"]["lr"] = shape.lr
        config["model"]["optimizer"] = run.optimizer
        if run.switch_at is not None:
            config["model"]["sa_switch"] = {"at_step": run.switch_at, "groups": SWITCH_GROUPS}
        if init_from is not None:
            config["model"]["lr"] = shape.lr * self.args.retrofit_lr_scale
            config["model"]["warmup_steps"] = max(1, run.steps // 10)
            config["model"]["init_from"] = str(init_from)
        config["data"] = self.data_section(shape)
        folder = self.run_dir(run)
        config["trainer"].update(
            accelerator=scale.accelerator,
            precision=scale.precision,
            max_steps=run.steps,
            val_check_interval=run.val_every,
            limit_val_batches=scale.val_batches,
            log_every_n_steps=scale.log_every,
            default_root_dir=str(folder),
            logger={
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(folder.parent), "name": run.name, "version": "train"},
            },
            callbacks=[
                {"class_path": "sa_train.callbacks.TrainingThroughput"},
                {"class_path": "sa_train.callbacks.InferenceCost", "init_args": {"measure": False}},
                {
                    "class_path": "sa_train.callbacks.LastStepCheckpoint",
                    "init_args": {"every_n_train_steps": run.steps, "save_last": True},
                },
            ],
        )
        path = self.out / "configs" / f"{run.name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        return path

    # Plan ------------------------------------------------------------------------------------------

    def plan(self) -> list[Run]:
        """Budget by budget, seed by seed, so a study cut short still holds complete comparisons."""
        runs = []
        for shape_name in self.scale.shapes:
            shape = self.shape(shape_name)
            stats = self.stats[shape_name]
            per_pass = self.args.steps or stats.steps_per_pass(shape.batch_size)
            fine_tune = max(1, round(per_pass * self.args.retrofit_fraction))
            val_every = max(1, per_pass // self.args.val_per_pass)
            for passes in self.args.passes:
                dense_tokens = stats.tokens_in(per_pass * passes, shape.batch_size, shape.seq_len)
                for seed in self.args.seeds:
                    for variant in self.args.variants:
                        retrofit = variant in RETROFITS
                        steps = fine_tune if retrofit else per_pass * passes
                        switch = SWITCHES.get(variant)
                        runs.append(
                            Run(
                                shape=shape_name,
                                variant=variant,
                                seed=seed,
                                passes=passes,
                                groups=shape.groups(variant),
                                steps=steps,
                                train_tokens=stats.tokens_in(steps, shape.batch_size, shape.seq_len),
                                name=run_name(shape_name, passes, variant, seed),
                                val_every=steps if retrofit else val_every,
                                dense_tokens=dense_tokens if retrofit else 0,
                                optimizer="muon" if variant in MUON else "adamw",
                                switch_at=None if switch is None else max(1, round(steps * switch)),
                            )
                        )
        return runs

    # Execution -------------------------------------------------------------------------------------

    def fit(self, run: Run) -> None:
        folder = self.run_dir(run)
        shutil.rmtree(folder, ignore_errors=True)  # a run cut short earlier starts afresh
        config = self.write_config(run)
        self.cli(["fit", "--config", str(config)], folder / "fit.log")
        run.results.update(read_fit(folder / "train"))
        run.results.update(
            from_scratch_figures(
                asdict(run), self.shape(run.shape), self.stats[run.shape], self.scale.log_every
            )
        )

    def retrofit(self, run: Run) -> None:
        """Convert the same seed and budget's dense run (heads matched, or as they are for
        ``retrofit-unmatched``), score it on the full val split, then fine-tune it."""
        dense = self.out / "runs" / run_name(run.shape, run.passes, "dense", run.seed)
        source = dense / "train" / "checkpoints" / "last.ckpt"
        if not source.is_file():
            raise StudyError(
                f"retrofit needs the dense run's checkpoint {source}; keep 'dense' in --variants before "
                "'retrofit'."
            )
        folder = self.run_dir(run)
        shutil.rmtree(folder, ignore_errors=True)
        converted = folder / "convert" / "checkpoints" / "converted.ckpt"
        self.cli(
            ["convert", "--checkpoint", str(source), "--groups", run.groups, "--out", str(converted)]
            + (["--no-head-matching"] if run.variant == "retrofit-unmatched" else []),
            folder / "convert.log",
        )
        config = self.write_config(run, init_from=converted)
        self.cli(
            ["validate", "--config", str(config), "--ckpt_path", str(converted)], folder / "validate.log"
        )
        after_conversion = read_metrics_file(folder / "convert" / "validate")
        run.results["val_ppl_converted"] = after_conversion["val/ppl"][-1][1]
        self.cli(["fit", "--config", str(config)], folder / "fit.log")
        run.results.update(read_fit(folder / "train"))

    def analyze(self) -> None:
        """Attention similarity of the longest-trained dense run of the first seed, per shape."""
        for shape_name in self.scale.shapes:
            name = run_name(shape_name, max(self.args.passes), "dense", self.args.seeds[0])
            checkpoint = self.out / "runs" / name / "train" / "checkpoints" / "last.ckpt"
            target = self.out / "analysis" / shape_name
            self.cli(
                ["analyze", "--checkpoint", str(checkpoint), "--out", str(target)], target / "analyze.log"
            )
            report = json.loads((target / "similarity.json").read_text(encoding="utf-8"))
            self.analysis[shape_name] = {"checkpoint": name, "suggested": report.get("suggested")}
            shutil.copyfile(target / "similarity.png", self.out / f"similarity-dense-{shape_name}.png")

    def execute(self) -> dict[str, Any]:
        started = time.perf_counter()
        for shape_name in self.scale.shapes:
            self.stats[shape_name] = prepare(self.data_section(self.shape(shape_name)))
        self.runs = self.plan()
        total_tokens = sum(run.train_tokens for run in self.runs)
        print(
            f"quality study, scale {self.args.scale}: {len(self.runs)} runs, "
            f"{total_tokens / 1e6:.2f}M training tokens in all, threads per run: "
            f"{self.args.threads or 'default'}; outputs in {self.out}",
            flush=True,
        )
        progress = Progress(total_tokens, len(self.runs))

        def finished(run: Run) -> None:
            self.save(time.perf_counter() - started)
            print(progress.line(run), flush=True)

        # From-scratch runs --jobs at a time, in plan order; retrofits after them, since each converts the
        # dense run of its seed and budget.
        with ThreadPoolExecutor(self.args.jobs) as pool:
            futures = {
                pool.submit(self.timed, self.fit, run): run
                for run in self.runs
                if run.variant not in RETROFITS
            }
            try:
                for future in as_completed(futures):
                    future.result()
                    finished(futures[future])
            except BaseException:
                for future in futures:
                    future.cancel()  # the runs not started yet; those running end on their own
                raise
        for run in self.runs:
            if run.variant in RETROFITS:
                self.timed(self.retrofit, run)
                finished(run)
        if "dense" in self.args.variants:
            self.analyze()
        report = self.save(time.perf_counter() - started)
        write_outputs(report, self.out, self.args.docs, self.args.label)
        return report

    @staticmethod
    def timed(step: Callable[[Run], None], run: Run) -> None:
        """``step(run)``, its wall time (start-up, training and validation) into the run's results."""
        run_started = time.perf_counter()
        step(run)
        run.results["wall_s"] = time.perf_counter() - run_started

    def save(self, wall_s: float) -> dict[str, Any]:
        report = {
            "settings": {
                "scale": self.args.scale,
                "command": self.args.command_line,
                "corpus": str(self.corpus.relative_to(self.out) if self.scale.works else self.corpus.name),
                "works": self.scale.works,
                "seeds": self.args.seeds,
                "passes": self.args.passes,
                "variants": self.args.variants,
                "steps_per_pass_override": self.args.steps,
                "retrofit_fraction": self.args.retrofit_fraction,
                "retrofit_lr_scale": self.args.retrofit_lr_scale,
                "val_per_pass": self.args.val_per_pass,
                "jobs": self.args.jobs,
                "threads_per_run": self.args.threads,
                "accelerator": self.scale.accelerator,
                "precision": self.scale.precision,
                "shapes": {name: asdict(self.shape(name)) for name in self.scale.shapes},
            },
            "data": {
                name: {**asdict(stats), "steps_per_pass": stats.steps_per_pass(self.shape(name).batch_size)}
                for name, stats in self.stats.items()
            },
            "runs": [asdict(run) for run in self.runs],
            "analysis": self.analysis,
            "wall_s": wall_s,
        }
        report["compute"] = compute_summary(report)
        (self.out / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        return report


class Progress:
    """One line per finished run with an ETA: seconds per planned training token so far, times the
    tokens left (process start-up and validation are folded into that rate)."""

    def __init__(self, total_tokens: int, total_runs: int) -> None:
        self.total_tokens, self.total_runs = total_tokens, total_runs
        self.done_tokens = self.done_runs = 0
        self.started = time.perf_counter()

    def line(self, run: Run) -> str:
        self.done_tokens += run.train_tokens
        self.done_runs += 1
        elapsed = time.perf_counter() - self.started
        eta = elapsed / self.done_tokens * (self.total_tokens - self.done_tokens)
        results = run.results
        speed = results.get("tokens_per_sec")
        return (
            f"[{self.done_runs}/{self.total_runs}] {run.name}: {run.steps} steps, "
            f"{run.train_tokens:,} tokens, "
            f"val ppl {results['val_ppl']:.2f}"
            + (f" (converted {results['val_ppl_converted']:.2f})" if "val_ppl_converted" in results else "")
            + (f", {speed:,.0f} tokens/s" if speed else "")
            + f", {results['wall_s']:.0f} s; elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min"
        )


# Reading runs --------------------------------------------------------------------------------------


def run_name(shape: str, passes: int, variant: str, seed: int) -> str:
    return f"{shape}-{passes}pass-{variant}-seed{seed}"


def read_metrics_file(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from sa_train.tools.plot import read_metrics

    return read_metrics(folder)


def read_fit(folder: Path) -> dict[str, Any]:
    """The figures of a finished fit from its metrics.csv: the last validation (which the config places at
    the last step), the mean training loss over the last 10% of steps, the cost the InferenceCost callback
    logged at step 0, the median training speed."""
    metrics = read_metrics_file(folder)
    if not metrics.get("val/ppl"):
        raise StudyError(f"{folder}/metrics.csv holds no val/ppl; the run did not validate (see fit.log).")
    speeds = [value for _, value in metrics.get("train/tokens_per_sec", [])]
    losses = metrics["train/loss"]
    last_steps = [loss for step, loss in losses if step >= 0.9 * losses[-1][0]]
    return {
        # Beside the validation loss: a model that fits its training data worse yet validates better is
        # regularised; one better on both is optimised better.
        "train_loss_end": statistics.fmean(last_steps),
        "val_ppl": metrics["val/ppl"][-1][1],
        "val_loss": metrics["val/loss"][-1][1],
        "val_step": metrics["val/ppl"][-1][0],
        "params": int(metrics["cost/params"][0][1]),
        "kv_bytes_per_token": int(metrics["cost/kv_bytes_per_token"][0][1]),
        "tokens_per_sec": statistics.median(speeds) if speeds else None,
        "run_dir": str(folder),
    }


def throughput_window_steps(log_every: int) -> int:
    """Steps over which TrainingThroughput averages a logged rate at most: its default window of logging
    steps (a short run's is smaller)."""
    import inspect

    from sa_train.callbacks import TrainingThroughput

    return inspect.signature(TrainingThroughput).parameters["window"].default * log_every


def from_scratch_figures(
    run: dict[str, Any], shape: Shape, stats: DataStats, log_every: int
) -> dict[str, Any]:
    """A fit's validation curve against compute, and a switched run's final costs.

    ``curve``: one point per validation with the steps done, the training tokens, the training FLOPs
    (``sa_train.cost.training_flops_per_token`` with causal attention: the dense model's before a switch,
    ``SWITCH_GROUPS``' after), the training seconds and the validation loss. Training seconds are each
    phase's tokens (before and after a switch) over that phase's median logged ``train/tokens_per_sec``,
    leaving out the rates whose averaging window may hold a validation or the switch (all of the phase's
    rates where none is left): the validations are the study's, not the recipe's, and at the CPU scale one
    validation of the whole split took as long as ~15 training steps. None where no rate was logged.

    A switched run logged its parameters and KV cache at step 0, as the dense model; its final model's are
    the analytic parameter count and the logged KV bytes times ``sa_switch/kv_vs_dense``."""
    from sa_train.cost import parameter_count

    metrics = read_metrics_file(Path(run["results"]["run_dir"]))
    window = throughput_window_steps(log_every)
    switch = run["switch_at"]
    val_steps = [step for step, _ in metrics["val/loss"]]
    rates = metrics.get("train/tokens_per_sec", [])

    def phase_rate(first: int, end: int) -> float | None:
        inside = [(step, rate) for step, rate in rates if first <= step - window and step < end]
        clean = [rate for step, rate in inside if not any(step - window <= v <= step for v in val_steps)]
        chosen = (
            clean or [rate for _, rate in inside] or [rate for step, rate in rates if first <= step < end]
        )
        return statistics.median(chosen) if chosen else None

    def tokens(steps: int) -> int:
        return stats.tokens_in(steps, shape.batch_size, shape.seq_len)

    dense_flops = shape.train_flops_per_token("dense")
    if switch is None:
        phases = [
            (run["steps"], shape.train_flops_per_token(run["groups"]), phase_rate(-window, run["steps"]))
        ]
    else:
        phases = [
            (switch, dense_flops, phase_rate(-window, switch)),
            (run["steps"], shape.train_flops_per_token(SWITCH_GROUPS), phase_rate(switch, run["steps"])),
        ]
    curve = []
    for step, loss in metrics["val/loss"]:
        done = step + 1  # validation runs after the step it is logged at (0-based)
        flops, seconds, start = 0.0, 0.0, 0
        for end, per_token, rate in phases:
            spent = tokens(min(done, end)) - tokens(start) if done > start else 0
            flops += spent * per_token
            seconds = None if seconds is None or rate is None else seconds + spent / rate
            start = end
        curve.append(
            {"step": done, "tokens": tokens(done), "flops": flops, "train_s": seconds, "val_loss": loss}
        )
    figures: dict[str, Any] = {"curve": curve}
    if switch is not None:
        figures["params"] = parameter_count(shape.model_config(SWITCH_GROUPS))
        figures["kv_bytes_per_token"] = round(
            int(metrics["cost/kv_bytes_per_token"][0][1]) * metrics["sa_switch/kv_vs_dense"][-1][1]
        )
    return figures


def mean_curve(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The seeds' curves averaged point by point (their validations fall on the same steps)."""
    curves = [run["results"]["curve"] for run in runs]
    if len({tuple(point["step"] for point in curve) for curve in curves}) != 1:
        raise StudyError("the seeds of one variant validated at different steps; rerun the study whole.")
    points = []
    for same in zip(*curves, strict=True):
        seconds = [point["train_s"] for point in same]
        points.append(
            {
                "step": same[0]["step"],
                "flops": statistics.fmean(point["flops"] for point in same),
                "train_s": None if None in seconds else statistics.fmean(seconds),
                "val_loss": statistics.fmean(point["val_loss"] for point in same),
            }
        )
    return points


def reach(curve: list[dict[str, Any]], target: float, key: str) -> float | None:
    """``key`` (flops or train_s) where the validation loss first reaches ``target``, linear between
    validation points; the first point's if that one already does; None if it never does (or, for
    train_s, if the run logged no rate)."""
    previous = None
    for point in curve:
        if point["val_loss"] <= target:
            if previous is None or point[key] is None:
                return point[key]
            share = (previous["val_loss"] - target) / (previous["val_loss"] - point["val_loss"])
            return previous[key] + share * (point[key] - previous[key])
        previous = point
    return None


def compute_summary(report: dict[str, Any]) -> dict[str, Any]:
    """Per shape and budget: the target (the dense/AdamW runs' final validation loss, mean over seeds) and,
    per from-scratch or switched variant, its final loss, its FLOPs and training seconds, and what it spent
    to reach the target: on the seeds' mean curve, and seed by seed against the same target. A retrofit's
    compute is its dense run's plus the fine-tune's and is left out here. Ratios are to dense/AdamW's own
    (the end of its mean curve, which reaches the target there by construction)."""
    summary: dict[str, Any] = {}
    for shape_name in report["settings"]["shapes"]:
        for passes in report["settings"]["passes"]:
            runs = [
                run
                for run in report["runs"]
                if run["shape"] == shape_name and run["passes"] == passes and "curve" in run["results"]
            ]
            dense = [run for run in runs if run["variant"] == "dense"]
            if not dense:
                continue
            target = statistics.fmean(run["results"]["curve"][-1]["val_loss"] for run in dense)
            variants: dict[str, Any] = {}
            for variant in report["settings"]["variants"]:
                chosen = [run for run in runs if run["variant"] == variant]
                if not chosen:
                    continue
                curve = mean_curve(chosen)
                variants[variant] = {
                    "seeds": [run["seed"] for run in chosen],
                    "final_val_loss": [run["results"]["curve"][-1]["val_loss"] for run in chosen],
                    "flops": curve[-1]["flops"],
                    "train_s": curve[-1]["train_s"],
                    "curve": curve,
                    "flops_to_target": reach(curve, target, "flops"),
                    "train_s_to_target": reach(curve, target, "train_s"),
                    "flops_to_target_per_seed": [
                        reach(run["results"]["curve"], target, "flops") for run in chosen
                    ],
                }
            reference = variants["dense"]
            for figures in variants.values():
                for key in ("flops", "train_s"):
                    spent, own = figures[f"{key}_to_target"], reference[f"{key}_to_target"]
                    figures[f"{key}_to_target_vs_dense"] = None if spent is None or not own else spent / own
            summary.setdefault(shape_name, {})[str(passes)] = {
                "target_val_loss": target,
                "variants": variants,
            }
    return summary


# Outputs -------------------------------------------------------------------------------------------

COLOURS = dict(
    zip(
        VARIANTS,
        (
            "black",
            "tab:blue",
            "tab:orange",
            "tab:green",
            "tab:red",
            "tab:purple",
            "tab:gray",
            "tab:brown",
            "tab:cyan",
            "tab:pink",
        ),
        strict=True,
    )
)


def groups_label(run: dict[str, Any]) -> str:
    if run["switch_at"] is None:
        return f"`{run['groups']}`"
    return f"`{run['groups']}` → `{SWITCH_GROUPS}` after step {run['switch_at']}"


def si(value: float | None, digits: int = 2) -> str:
    """A FLOP count with its SI prefix (P, T, G, M); '—' for None."""
    if value is None:
        return "—"
    for prefix, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if value >= size:
            return f"{value / size:.{digits}f} {prefix}"
    return f"{value:.0f}"


def count(tokens: int) -> str:
    if tokens >= 1e6:
        return f"{tokens / 1e6:.2f}M"
    return f"{tokens / 1e3:.1f}k" if tokens >= 1e3 else str(tokens)


def spread(values: list[float], digits: int) -> str:
    """Mean and min–max over seeds."""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def table(report: dict[str, Any], shape_name: str) -> str:
    """Markdown table of one shape: a row per budget and variant, seeds pooled; the ratio to dense is taken
    seed by seed (same init seed, same tokens), then pooled."""
    runs = [run for run in report["runs"] if run["shape"] == shape_name and "val_ppl" in run["results"]]
    dense = {
        (run["passes"], run["seed"]): run["results"]["val_ppl"] for run in runs if run["variant"] == "dense"
    }
    lines = [
        "| budget | variant | groups | params | train tokens | val ppl, mean (min–max) | / dense | "
        "KV B/token | train tokens/s | train loss, last 10% | val loss |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for passes in report["settings"]["passes"]:
        for variant in report["settings"]["variants"]:
            chosen = [run for run in runs if run["passes"] == passes and run["variant"] == variant]
            if not chosen:
                continue
            rows = [(f"{variant}, converted", "val_ppl_converted"), (f"{variant}, fine-tuned", "val_ppl")]
            for label, key in rows if variant in RETROFITS else [(variant, "val_ppl")]:
                ppl = [run["results"][key] for run in chosen]
                ratios = [
                    run["results"][key] / dense[(passes, run["seed"])]
                    for run in chosen
                    if (passes, run["seed"]) in dense
                ]
                first = chosen[0]
                ratio = "1 (reference)" if variant == "dense" else spread(ratios, 3) if ratios else "—"
                tokens = first["train_tokens"] + first["dense_tokens"]
                fit_losses = "— | —"
                if key == "val_ppl_converted":
                    tokens, speed = first["dense_tokens"], "—"
                else:
                    speeds = [
                        run["results"]["tokens_per_sec"] for run in chosen if run["results"]["tokens_per_sec"]
                    ]
                    speed = f"{statistics.fmean(speeds):,.0f}" if speeds else "—"
                    train = statistics.fmean(run["results"]["train_loss_end"] for run in chosen)
                    val = statistics.fmean(run["results"]["val_loss"] for run in chosen)
                    fit_losses = f"{train:.3f} | {val:.3f}"
                budget = f"{passes} pass" + ("es" if passes > 1 else "")
                lines.append(
                    f"| {budget} | {label} | {groups_label(first)} | "
                    f"{first['results']['params'] / 1e6:.2f}M | "
                    f"{count(tokens)} | {spread(ppl, 2)} | {ratio} | "
                    f"{first['results']['kv_bytes_per_token']:,} | {speed} | {fit_losses} |"
                )
    return "\n".join(lines)


def plot_curves(report: dict[str, Any], out: Path) -> Path:
    """Training loss (smoothed, one thin line per seed) and validation loss (markers) against training
    tokens, one panel per budget and a row per shape; a retrofit's fine-tune starts where its dense run
    ended."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sa_train.tools.plot import moving_average

    settings = report["settings"]
    shapes, budgets = list(settings["shapes"]), settings["passes"]
    fig, axes = plt.subplots(
        len(shapes), len(budgets), figsize=(5.5 * len(budgets), 4 * len(shapes)), dpi=90, squeeze=False
    )
    for row, shape_name in enumerate(shapes):
        for column, passes in enumerate(budgets):
            ax, floor, ceiling = axes[row][column], math.inf, -math.inf
            for run in report["runs"]:
                if run["shape"] != shape_name or run["passes"] != passes or "run_dir" not in run["results"]:
                    continue
                metrics = read_metrics_file(Path(run["results"]["run_dir"]))
                tokens = dict(metrics.get("train/tokens", []))
                losses = [(tokens[step], loss) for step, loss in metrics["train/loss"] if step in tokens]
                if not losses:
                    continue
                offset = run["dense_tokens"]
                x = [(offset + seen) / 1e6 for seen, _ in losses]
                smoothed = moving_average([loss for _, loss in losses], 10)
                first = run["seed"] == settings["seeds"][0]
                colour = COLOURS[run["variant"]]
                groups = "" if run["variant"] == "dense" else f" ({run['groups']})"
                label = run["variant"] + groups if first else None
                ax.plot(x, smoothed, color=colour, linewidth=0.9, alpha=0.8, label=label)
                # Validation runs after the step it is logged at (0-based), not always a logging step.
                per_step = run["train_tokens"] / run["steps"]
                val = [((offset + (step + 1) * per_step) / 1e6, loss) for step, loss in metrics["val/loss"]]
                ax.plot(*zip(*val, strict=True), "o", color=colour, markersize=4, alpha=0.8)
                tail = smoothed[len(smoothed) // 5 :] or smoothed
                val_losses = [loss for _, loss in val]
                floor = min(floor, *tail, *val_losses)
                ceiling = max(ceiling, *tail, *val_losses)
            if math.isfinite(floor):
                ax.set_ylim(floor - 0.1, ceiling + 0.1)
            ax.set_title(f"{shape_name}: {passes} pass{'es' if passes > 1 else ''}", fontsize=10)
            ax.set_xlabel("training tokens (M)")
            ax.set_ylabel("loss (nats/token); dots: validation")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def compute_table(report: dict[str, Any], shape_name: str) -> str:
    """Markdown table of one shape's compute to reach the dense/AdamW final loss (``report["compute"]``)."""
    lines = [
        "| budget | variant | optimizer | groups | final val loss, mean (min–max) | training FLOPs | "
        "training time (s) | FLOPs to reach dense's loss | / dense | per seed | time to reach (s) | "
        "/ dense |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def number(value: float | None, digits: int) -> str:
        return "—" if value is None else f"{value:,.{digits}f}"

    for passes, budget in report["compute"].get(shape_name, {}).items():
        for variant, figures in budget["variants"].items():
            first = next(
                run
                for run in report["runs"]
                if run["shape"] == shape_name and str(run["passes"]) == passes and run["variant"] == variant
            )
            per_seed = " / ".join(
                si(value) if value else "not reached" for value in figures["flops_to_target_per_seed"]
            )
            reached = figures["flops_to_target"]
            lines.append(
                f"| {passes} pass{'es' if passes != '1' else ''} | {variant} | {first['optimizer']} | "
                f"{groups_label(first)} | {spread(figures['final_val_loss'], 3)} | {si(figures['flops'])} | "
                f"{number(figures['train_s'], 0)} | {si(reached) if reached else 'not reached'} | "
                f"{number(figures['flops_to_target_vs_dense'], 3)} | {per_seed} | "
                f"{number(figures['train_s_to_target'], 0)} | "
                f"{number(figures['train_s_to_target_vs_dense'], 3)} |"
            )
    return "\n".join(lines)


def plot_compute(report: dict[str, Any], out: Path) -> Path:
    """Validation loss against training FLOPs and against training seconds, one line per variant (the
    seeds' mean, a marker per validation; each seed thin), a row per shape and budget; the dashed line is
    the dense/AdamW runs' final loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        (shape, passes, budget)
        for shape, budgets in report["compute"].items()
        for passes, budget in budgets.items()
    ]
    fig, axes = plt.subplots(len(rows), 2, figsize=(12, 4.5 * len(rows)), dpi=90, squeeze=False)
    for (shape_name, passes, budget), pair in zip(rows, axes, strict=True):
        for ax, key, scale, unit in (
            (pair[0], "flops", 1e12, "training FLOPs (10^12)"),
            (pair[1], "train_s", 1, "training time (s)"),
        ):
            for variant, figures in budget["variants"].items():
                colour = COLOURS[variant]
                for run in report["runs"]:
                    if (
                        run["shape"] == shape_name
                        and str(run["passes"]) == passes
                        and run["variant"] == variant
                    ):
                        points = [p for p in run["results"]["curve"] if p[key] is not None]
                        ax.plot(
                            [p[key] / scale for p in points],
                            [p["val_loss"] for p in points],
                            color=colour,
                            linewidth=0.6,
                            alpha=0.35,
                        )
                points = [p for p in figures["curve"] if p[key] is not None]
                ax.plot(
                    [p[key] / scale for p in points],
                    [p["val_loss"] for p in points],
                    "o-",
                    color=colour,
                    linewidth=1.4,
                    markersize=3,
                    label=variant,
                )
            ax.axhline(budget["target_val_loss"], color="black", linestyle="--", linewidth=0.8)
            ax.set_title(
                f"{shape_name}: {passes} pass{'es' if passes != '1' else ''}; dashed: dense/AdamW final",
                fontsize=10,
            )
            ax.set_xlabel(unit)
            ax.set_ylabel("validation loss (nats/token)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def markdown(report: dict[str, Any], images: dict[str, str]) -> str:
    """The study's block for docs: how it was run, then a table per shape."""
    settings = report["settings"]
    corpus = (
        f"the first {settings['works']} works of the shipped corpus"
        if settings["works"]
        else "the shipped corpus"
    )
    parts = [
        f"Measured with `{settings['command']}`: {len(report['runs'])} runs on {corpus}, "
        f"{settings['accelerator']} ({settings['precision']}, "
        f"{settings['threads_per_run'] or 'default'} thread(s) per run), seeds {settings['seeds']}, "
        f"budgets of {settings['passes']} passes, validated {settings['val_per_pass']} time(s) per pass, "
        f"{settings['jobs']} run(s) at a time; wall time {report['wall_s'] / 60:.1f} min.",
    ]
    for name, shape in settings["shapes"].items():
        data = report["data"][name]
        parts.append(
            f"**{name}** ({Shape(**shape).describe()}): {data['train_tokens']:,} training tokens; a pass is "
            f"{data['steps_per_pass']} steps over {data['samples'] * shape['seq_len']:,} of them (whole "
            f"samples); {data['val_tokens']:,} validation tokens.\n\n" + table(report, name)
        )
        if report["compute"].get(name):
            parts.append(
                f"Compute to reach the dense/AdamW runs' final validation loss ({name}; FLOPs from "
                "`sa_train.cost`, training time without validation and start-up):\n\n"
                + compute_table(report, name)
            )
        analysis = report["analysis"].get(name)
        if analysis and analysis.get("suggested"):
            suggested = analysis["suggested"]
            parts.append(
                f"`analyze` of `{analysis['checkpoint']}` suggests `sa_groups: {suggested['sa_groups']}` at "
                f"similarity ≥ {suggested['threshold']}."
            )
    parts += [f"![{alt}]({path})" for alt, path in images.items()]
    return "\n\n".join(parts)


def update_docs(path: Path, label: str, block: str) -> None:
    """Replace the study's block between its markers, or append it: the prose around it is kept."""
    start, end = f"<!-- quality-study:{label} -->", f"<!-- /quality-study:{label} -->"
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Quality study\n"
    new = f"{start}\n{block}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + new + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + new + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def rerender(out: Path, docs: Path | None, label: str) -> dict[str, Any]:
    """Outputs of a finished study again, its runs' figures re-read from their metrics.csv files."""
    path = out / "results.json"
    if not path.is_file():
        raise StudyError(f"--report-only: no results.json in {out}; point --out at a study's folder.")
    report = json.loads(path.read_text(encoding="utf-8"))
    settings = report["settings"]
    for run in report["runs"]:
        if "run_dir" in run["results"]:
            run["results"].update(read_fit(Path(run["results"]["run_dir"])))
            if run["variant"] not in RETROFITS:
                data = report["data"][run["shape"]]
                stats = DataStats(data["train_tokens"], data["val_tokens"], data["samples"])
                shape = Shape(**settings["shapes"][run["shape"]])
                run["results"].update(
                    from_scratch_figures(run, shape, stats, SCALES[settings["scale"]].log_every)
                )
    report["compute"] = compute_summary(report)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    write_outputs(report, out, docs, label)
    return report


def write_outputs(report: dict[str, Any], out: Path, docs: Path | None, label: str) -> None:
    """loss.png, compute.png (with a dense run to compare against) and table.md in ``out``; with
    ``docs``, the block labelled ``label`` in that file and the PNGs beside it (the default CPU study's
    without a suffix, the others' with their label)."""
    loss = plot_curves(report, out / "loss.png")
    compute = plot_compute(report, out / "compute.png") if report["compute"] else None
    similarity = sorted(out.glob("similarity-dense-*.png"))
    (out / "table.md").write_text(markdown(report, {}) + "\n", encoding="utf-8")
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {loss}" + (f", {compute}" if compute else ""))
    if docs is None:
        return
    suffix = "" if label == "cpu" else f"-{label}"
    images = {"loss curves": f"quality-loss{suffix}.png"}
    docs.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(loss, docs.parent / images["loss curves"])
    if compute is not None:
        images["validation loss against training compute"] = f"quality-compute{suffix}.png"
        shutil.copyfile(compute, docs.parent / images["validation loss against training compute"])
    for png in similarity:
        name = png.stem.removeprefix("similarity-dense-")
        target = (
            f"quality-similarity-dense{suffix}.png"
            if len(similarity) == 1
            else f"quality-similarity-{name}.png"
        )
        images[f"attention similarity of the dense {name} model"] = target
        shutil.copyfile(png, docs.parent / target)
    update_docs(docs, label, markdown(report, images))
    print(f"updated {docs}")


# Command line --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--scale", choices=("cpu", "cuda"), default="cpu", help="(cpu)")
    parser.add_argument("--smoke", action="store_true", help="a micro model for a few steps, in-process")
    parser.add_argument("--out", type=Path, help="output folder (runs/quality/<scale>)")
    parser.add_argument("--docs", type=Path, help="markdown file to update, e.g. docs/quality.md")
    parser.add_argument("--label", help="name of the study's block and PNGs in --docs (the scale)")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the outputs of the study in --out, run nothing"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="init seeds (1 2)")
    parser.add_argument("--passes", type=int, nargs="+", default=[1, 3], help="data budgets in passes (1 3)")
    parser.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=list(ISSUE12_VARIANTS), help="(issue 12's six)"
    )
    parser.add_argument(
        "--val-per-pass", type=int, default=1, help="validations per pass, each on the whole val split (1)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process (1)")
    parser.add_argument("--steps", type=int, help="steps per 'pass' instead of a real pass (quick checks)")
    parser.add_argument("--lr", type=float, help="peak learning rate of every shape (the shape's own)")
    parser.add_argument("--threads", type=int, help="threads per run (cpu: 1, cuda: torch's default)")
    parser.add_argument(
        "--retrofit-fraction", type=float, default=0.25, help="retrofit fine-tune, in passes (0.25)"
    )
    parser.add_argument(
        "--retrofit-lr-scale",
        type=float,
        default=0.3,
        help="retrofit fine-tune peak lr as a fraction of the shape's (0.3)",
    )
    args = parser.parse_args(argv)
    args.command_line = "python scripts/quality_study.py " + " ".join(
        sys.argv[1:] if argv is None else list(argv)
    )
    if args.smoke:
        args.scale = "smoke"
        args.steps = args.steps or 3
    args.out = args.out or ROOT / "runs" / "quality" / args.scale
    args.label = args.label or args.scale
    if args.threads is None:
        args.threads = SCALES[args.scale].threads
    checks: list[tuple[bool, str]] = [
        (len(set(args.seeds)) >= 1 and len(set(args.seeds)) == len(args.seeds), "--seeds must be distinct"),
        (all(p >= 1 for p in args.passes), "--passes must be whole passes of at least 1"),
        (args.steps is None or args.steps >= 1, "--steps must be at least 1"),
        (args.threads is None or args.threads >= 1, "--threads must be at least 1"),
        (args.val_per_pass >= 1, "--val-per-pass must be at least 1 (validations per pass)"),
        (args.jobs >= 1, "--jobs must be at least 1"),
        (
            args.jobs == 1 or not args.smoke,
            "--jobs: --smoke runs the CLI inside this process, one run at a time; drop --jobs",
        ),
        (args.retrofit_fraction > 0, "--retrofit-fraction must be positive, e.g. 0.25 of a pass"),
        (0 < args.retrofit_lr_scale <= 1, "--retrofit-lr-scale must lie in (0, 1], e.g. 0.3"),
        (
            not set(RETROFITS) & set(args.variants) or "dense" in args.variants,
            "--variants: a retrofit converts the dense runs, so list dense too",
        ),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    args.passes = sorted(set(args.passes))
    args.variants = [variant for variant in VARIANTS if variant in args.variants]
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        if args.report_only:
            return rerender(args.out.resolve(), args.docs, args.label)
        return Study(args).execute()
    except StudyError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from error


if __name__ == "__main__":
    main()
