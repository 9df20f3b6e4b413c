"""The quality study's report: table.md and the block of ``--docs`` (markdown tables of perplexity and of
compute to reach dense's loss), the PNGs copied beside the docs, and ``rerender`` for ``--report-only``,
which rewrites them from a finished study's results.json."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path
from typing import Any

from quality_config import RETROFITS, SCALES, SWITCH_GROUPS, DataStats, Shape, StudyError
from quality_metrics import compute_summary, from_scratch_figures, read_fit
from quality_plots import plot_compute, plot_curves


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


def environment_words(environment: dict[str, str] | None) -> str:
    """`` On <cpu>, torch <version>, ...`` (studies before 2026-12-06 recorded none)."""
    if not environment:
        return ""
    versions = ", ".join(f"{name} {value}" for name, value in environment.items() if name != "cpu")
    return f" On {environment['cpu']}: {versions}."


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
        f"{settings['jobs']} run(s) at a time; wall time {report['wall_s'] / 60:.1f} min."
        + environment_words(settings.get("environment")),
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
