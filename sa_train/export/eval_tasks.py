"""The offline lm-eval tasks of sa_train, made from the works that training holds out.

With the default data settings (``val_fraction`` 0.05, ``seed`` 1234) fit holds two works of the shipped
corpus out of training: the tasks use only those, so a model trained on the corpus is scored on text it
never saw. Two tasks (``sa_train/export/tasks/``):

- ``shakespeare_milton_ppl``: rolling log-likelihood of passages (whole speeches, up to 600 characters
  so a small model's context holds one), reported as word and byte perplexity and bits per byte;
- ``shakespeare_milton_cloze``: the next line of a speech after its speaker and first three lines,
  against three lines of similar length from elsewhere in the held-out works (accuracy; chance 0.25).

The data files are built here, deterministically, from the corpus of a source checkout;
``python -m sa_train.export.eval_tasks`` rewrites them and a test checks that the shipped files equal
what this module builds. Installed packages carry the files, not the corpus.
"""

from __future__ import annotations

import gzip
import inspect
import json
import random
from pathlib import Path
from typing import Any

import datasets

from sa_train.data import TokenDataModule
from sa_train.data.datamodule import SHIPPED_CORPUS
from sa_train.data.sources import split_documents

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

PASSAGE_CHARS, PASSAGES = 600, 100
CLOZE_ITEMS, CONTEXT_LINES, DISTRACTORS = 200, 3, 3


def held_out_works(corpus: Path = SHIPPED_CORPUS) -> list[dict[str, str]]:
    """The works fit puts in the validation split under the data module's defaults: never trained on (the
    test split holds the sonnets and one play, too little dialogue for the cloze task)."""
    defaults = inspect.signature(TokenDataModule).parameters
    with gzip.open(corpus, "rt", encoding="utf-8") as f:
        works = [json.loads(line) for line in f]
    _, held_out, _ = split_documents(
        datasets.Dataset.from_list(works),
        defaults["val_fraction"].default,
        defaults["test_fraction"].default,
        defaults["seed"].default,
    )
    return list(held_out)


def speeches(text: str) -> list[list[str]]:
    """Blocks of a play that are a speaker's line (``NAME.``) followed by the lines spoken."""
    found = []
    for block in text.split("\n\n"):
        lines = [line.strip() for line in block.strip().splitlines()]
        if len(lines) >= 2 and lines[0].isupper() and lines[0].endswith(".") and not lines[1].startswith("["):
            found.append(lines)
    return found


def perplexity_docs(works: list[dict[str, str]]) -> list[dict[str, str]]:
    """Passages of consecutive speeches, each at most PASSAGE_CHARS long, taken evenly across the works."""
    passages = []
    for work in works:
        current: list[str] = []
        for speech in speeches(work["text"]):
            text = "\n".join(speech)
            if len(text) > PASSAGE_CHARS:
                continue
            if current and len("\n\n".join([*current, text])) > PASSAGE_CHARS:
                passages.append({"work": work["id"], "text": "\n\n".join(current)})
                current = []
            current.append(text)
    step = max(1, len(passages) // PASSAGES)
    return passages[::step][:PASSAGES]


def cloze_docs(works: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Multiple-choice items: a speech's opening as context, its next line among lines of similar length."""
    rng = random.Random(inspect.signature(TokenDataModule).parameters["seed"].default)
    candidates = [
        (work["id"], speech)
        for work in works
        for speech in speeches(work["text"])
        if len(speech) > CONTEXT_LINES + 1 and len(speech[CONTEXT_LINES + 1]) >= 20
    ]
    pool = sorted({line for _, speech in candidates for line in speech[1:] if len(line) >= 20})
    items = []
    for work_id, speech in rng.sample(candidates, min(CLOZE_ITEMS, len(candidates))):
        answer = speech[CONTEXT_LINES + 1]
        width = len(answer) // 4
        similar = [line for line in pool if line != answer and abs(len(line) - len(answer)) <= width]
        choices = [*rng.sample(similar, DISTRACTORS), answer]
        rng.shuffle(choices)
        context = "\n".join(speech[: CONTEXT_LINES + 1])
        label = choices.index(answer)
        items.append({"work": work_id, "context": context, "choices": choices, "label": label})
    return items


def build() -> dict[str, list[dict[str, Any]]]:
    """The records of each data file, by file name."""
    works = held_out_works()
    return {
        "shakespeare_milton_ppl.jsonl": perplexity_docs(works),
        "shakespeare_milton_cloze.jsonl": cloze_docs(works),
    }


def main() -> None:
    for name, records in build().items():
        with (TASKS_DIR / name).open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        print(f"{TASKS_DIR / name}: {len(records)} documents")


if __name__ == "__main__":
    main()
