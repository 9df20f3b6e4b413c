"""The quality study's runs: ``Study`` plans every variant, seed and budget, writes each run's config,
drives the fits, retrofits and ``analyze`` through the CLI and saves ``results.json`` after each run;
``Progress`` prints a line with an ETA per finished run."""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml
from quality_commands import SATrainCLI, prepare, write_corpus
from quality_config import (
    BASE_CONFIG,
    MUON,
    RETROFITS,
    SCALES,
    SHAPES,
    SWITCH_GROUPS,
    SWITCHES,
    DataStats,
    Run,
    Shape,
    StudyError,
)
from quality_metrics import compute_summary, from_scratch_figures, read_fit, read_metrics_file
from quality_report import write_outputs


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
        config["model"]["config"].update(shape.model_fields(run.groups))
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
                "environment": environment(),
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


def environment() -> dict[str, str]:
    """Where the study ran: the CPU and the versions that decide the rounding. The same code and seed gave
    a dense run's perplexity 349 (seed mean) on 2026-11-26 and 329 ten days later on reinstalled packages,
    so results from two environments are not compared as if one."""
    from importlib.metadata import version

    from sa_train.measure import cpu_name

    packages = ("torch", "lightning", "tokenizers", "datasets", "numpy")
    return {"cpu": cpu_name(), "python": platform.python_version(), **{p: version(p) for p in packages}}


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


def run_name(shape: str, passes: int, variant: str, seed: int) -> str:
    return f"{shape}-{passes}pass-{variant}-seed{seed}"
