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

This file holds the command line; the study lives in the modules beside it: ``quality_config`` (variants,
shapes, scales, the run record), ``quality_commands`` (the sa_train CLI and the corpus), ``quality_runs``
(planning and running the study), ``quality_metrics`` (reading runs, compute to reach dense's loss),
``quality_report`` (tables, docs, ``--report-only``) and ``quality_plots`` (the PNGs).

    python scripts/quality_study.py                     # CPU scale, ~35 min on one core
    python scripts/quality_study.py --scale cuda        # the tiny shape at batch 16 and a wider model, bf16
    python scripts/quality_study.py --smoke --out /tmp/q  # the whole pipeline in seconds (the test's mode)
    python scripts/quality_study.py --variants dense every4 dense-muon every4-muon switch-early \
        switch-late --passes 1 --val-per-pass 4 --jobs 2       # quality at equal compute, ~35 min
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quality_config import ISSUE12_VARIANTS, RETROFITS, ROOT, SCALES, VARIANTS, StudyError
from quality_report import rerender
from quality_runs import Study


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
