"""``python -m sa_train plot``: loss curves of one or more runs in one PNG, e.g. an SA model beside its
dense twin."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

from sa_train.checkpoint import RESUMED_FROM
from sa_train.errors import ConfigError, DataError
from sa_train.tools import tool_parser


def read_metrics(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Per metric, the (step, value) pairs a CSVLogger run folder holds."""
    path = run / "metrics.csv" if run.is_dir() else run
    if not path.is_file():
        raise DataError(
            f"plot: no metrics.csv at {path}; pass a run folder written by the CSV logger, "
            "e.g. runs/sa-tiny/version_0."
        )
    series: dict[str, list[tuple[int, float]]] = {}
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        try:
            for row in reader:
                for key, value in row.items():
                    if key not in ("step", "epoch") and value:
                        series.setdefault(key, []).append((int(row["step"]), float(value)))
        except (KeyError, TypeError, ValueError, csv.Error) as error:  # UnicodeDecodeError is a ValueError
            raise DataError(
                f"plot: {path} is not a metrics.csv written by the CSV logger (line {reader.line_num}: "
                f"{error!r}); it needs a 'step' column and a number in every metric cell. Pass the run "
                "folder of a sa_train run, e.g. runs/sa-tiny/version_0."
            ) from error
    return series


def read_history(run: Path, seen: frozenset[Path] = frozenset()) -> dict[str, list[tuple[int, float]]]:
    """:func:`read_metrics` of ``run``, preceded by what the run it resumed from logged before the resume
    (``resumed_from``, the link a resumed fit leaves in its folder), so a resumed run is one curve. Steps
    the earlier part logged after its checkpoint, which the resumed part trained again, are left out."""
    metrics = read_metrics(run)
    previous = run / RESUMED_FROM
    if not (run.is_dir() and previous.is_dir()) or previous.resolve() in seen:
        return metrics
    earlier = read_history(previous.resolve(), seen | {run.resolve()})
    start = min((step for series in metrics.values() for step, _ in series), default=None)
    for name, series in earlier.items():
        first = metrics[name][0][0] if name in metrics else start
        before = [point for point in series if first is None or point[0] < first]
        metrics[name] = before + metrics.get(name, [])
    return metrics


def run_labels(runs: Sequence[Path]) -> list[str]:
    """One legend label per run: its name (``dense-tiny`` for ``runs/dense-tiny/version_0``), or where
    two runs share a name, the shortest path suffix that tells them apart (``dense-tiny/version_1``, as a
    resume writes it beside ``version_0``). Keyed by name alone, the later run replaced the earlier one."""
    folders = [Path(os.path.abspath(run.parent if run.is_file() else run)) for run in runs]
    for i, folder in enumerate(folders):
        if folder in folders[:i]:
            raise ConfigError(
                f"plot: {runs[i]} is given twice (as {runs[folders.index(folder)]} before); name each run "
                "folder once."
            )
    names = [folder.parent.name if folder.name.startswith("version_") else folder.name for folder in folders]
    labels = list(names)
    for name in set(names):
        clash = [i for i, other in enumerate(names) if other == name]
        if len(clash) == 1:
            continue
        depth = 1 + any(folders[i].name.startswith("version_") for i in clash)
        while len({folders[i].parts[-depth:] for i in clash}) < len(clash):
            depth += 1
        for i in clash:
            labels[i] = Path(*folders[i].parts[-depth:]).as_posix()
    return labels


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values: train loss is noisy per step, the trend is what matters."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_loss(runs: list[Path], out: Path = Path("loss.png"), smooth: int = 10) -> Path:
    """Plot the train loss (smoothed) and validation loss of each run against the optimizer step, and
    beside it the validation perplexity when the runs logged it, e.g. runs/sa-tiny/version_0 beside
    runs/dense-tiny/version_0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [Path(run) for run in runs]
    curves = {}
    for run, label in zip(runs, run_labels(runs), strict=True):
        metrics = read_history(run)
        if not metrics.get("train/loss"):
            raise DataError(
                f"plot: {run} holds no train/loss values yet (the run logs every trainer.log_every_n_steps "
                "steps and may have stopped before the first); plot it after it has trained, or leave it out."
            )
        curves[label] = metrics
    with_ppl = any("val/ppl" in metrics for metrics in curves.values())
    fig, axes = plt.subplots(
        1, 2 if with_ppl else 1, figsize=(14 if with_ppl else 8, 5), dpi=120, squeeze=False
    )
    loss_ax = axes[0][0]
    for label, metrics in curves.items():
        steps, values = zip(*metrics["train/loss"], strict=True)
        (line,) = loss_ax.plot(steps, moving_average(list(values), smooth), label=f"{label} train")
        if "val/loss" in metrics:
            val_steps, val_values = zip(*metrics["val/loss"], strict=True)
            loss_ax.plot(val_steps, val_values, "o--", color=line.get_color(), label=f"{label} val")
        if with_ppl and "val/ppl" in metrics:
            ppl_steps, ppl_values = zip(*metrics["val/ppl"], strict=True)
            axes[0][1].plot(ppl_steps, ppl_values, "o-", color=line.get_color(), label=label)
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_ylabel("cross-entropy (nats / token)")
    if with_ppl:
        ppl_ax = axes[0][1]
        ppl_ax.set_xlabel("optimizer step")
        ppl_ax.set_ylabel("validation perplexity")
        ppl_ax.set_yscale("log")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    print(f"wrote {out}")
    return out


def main(argv: Sequence[str]) -> None:
    parser = tool_parser("plot", plot_loss.__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders holding metrics.csv")
    parser.add_argument("--out", type=Path, default=Path("loss.png"), help="the PNG to write (loss.png)")
    parser.add_argument("--smooth", type=int, default=10, help="trailing-mean window of the train loss (10)")
    args = parser.parse_args(argv)
    if args.smooth < 1:
        raise ConfigError(f"--smooth={args.smooth} must be at least 1 (1 = no smoothing).")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    formats = FigureCanvasAgg.get_supported_filetypes()
    if args.out.suffix.lstrip(".").lower() not in formats:
        raise ConfigError(
            f"--out {args.out}: matplotlib writes no {args.out.suffix or 'suffix-less'} files; end the name "
            f"with one of {', '.join('.' + name for name in sorted(formats))} (e.g. loss.png)."
        )
    plot_loss(args.runs, args.out, args.smooth)
