"""The sa_train commands the quality study runs: ``SATrainCLI`` runs ``python -m sa_train`` (fit, validate,
convert, analyze) in a subprocess or in this process, and ``prepare`` tokenises the corpus that
``write_corpus`` cut from the shipped one, as ``python -m sa_train prepare`` would."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quality_config import ROOT, DataStats, StudyError


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
