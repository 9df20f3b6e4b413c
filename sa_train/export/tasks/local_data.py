"""Datasets of the sa_train lm-eval tasks, read from the files beside this module.

lm-eval resolves ``dataset_kwargs.data_files`` against the working directory; these loaders read the
files next to the task YAMLs, so the tasks run from any directory (``--include_path`` is enough).
Built by ``sa_train.export.eval_tasks``.
"""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _read(name):
    with (HERE / name).open(encoding="utf-8") as f:
        return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in f])})


def perplexity_docs(**metadata):
    """Held-out passages for the rolling log-likelihood task (lm-eval passes the task metadata)."""
    return _read("shakespeare_milton_ppl.jsonl")


def cloze_docs(**metadata):
    """Held-out next-line items for the multiple-choice task (lm-eval passes the task metadata)."""
    return _read("shakespeare_milton_cloze.jsonl")
