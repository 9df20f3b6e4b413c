"""What a finished run of the quality study measured, read from its metrics.csv: its final figures, its
validation curve against training FLOPs and training time, and per shape and budget the compute each
variant spends to reach the dense/AdamW runs' final validation loss."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from quality_config import SWITCH_GROUPS, DataStats, Shape, StudyError


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
