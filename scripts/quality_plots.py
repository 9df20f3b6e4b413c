"""The quality study's PNGs: loss.png (training and validation loss against training tokens) and
compute.png (validation loss against training FLOPs and training time)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from quality_config import VARIANTS
from quality_metrics import read_metrics_file

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
    return save(fig, out)


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
    return save(fig, out)


def save(fig: Any, out: Path) -> Path:
    """Write ``fig`` to ``out`` (its folder made) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
