"""``python -m sa_train eval --model DIR --tasks T1,T2``: lm-evaluation-harness on an exported model.

Runs lm-eval's ``hf`` model, as :mod:`sa_train.export.harness` adapts it to the prompt convention, on a
folder written by ``export`` (remote code trusted only when the folder ships it, i.e. for SA models), with
sa_train's offline tasks (``sa_train/export/tasks/``) available beside lm-eval's own, and writes lm-eval's
results as JSON.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sa_train.errors import ConfigError, DataError
from sa_train.tools import tool_parser
from sa_train.tools.generate import check_device

TASKS_DIR = Path(__file__).resolve().parents[1] / "export" / "tasks"


def _model_args(model: Path) -> dict[str, Any]:
    config_file = model / "config.json"
    if not config_file.is_file():
        raise ConfigError(
            f"--model: {model} is not a Hugging Face model folder (it has no config.json). Export a "
            "checkpoint first: python -m sa_train export --checkpoint CKPT --out DIR, then pass --model DIR."
        )
    if not (model / "tokenizer.json").is_file():
        raise ConfigError(
            f"--model: {model} has a config.json but no tokenizer.json, and lm-eval needs the tokenizer. "
            "Export the checkpoint again (export writes both), or copy the run's tokenizer.json into it."
        )
    try:
        remote_code = "auto_map" in json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as error:
        raise ConfigError(f"--model: {config_file} is not a JSON object ({error}); export again.") from error
    return {"pretrained": str(model), "trust_remote_code": remote_code}


def _drop_metadata_hint(record: logging.LogRecord) -> bool:
    """lm-eval's hint that a task's ``custom_dataset`` function takes ``--metadata`` kwargs, logged as a
    warning for each shipped task on every run: their loaders (``tasks/local_data.py``) take none."""
    return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


def hub_message(tasks: list[str], shipped: list[str], reason: str) -> str:
    """The one paragraph for lm-eval tasks whose data cannot be had from the Hugging Face Hub."""
    return (
        f"--tasks: {', '.join(tasks)} (lm-eval's) read their data from the Hugging Face Hub, and {reason}. "
        f"The tasks that ship with sa_train need no network: "
        f"{', '.join(shipped)}. To run a Hub task without a network, load it once where the Hub is reachable "
        "(into the same HF_HOME cache), then set HF_HUB_OFFLINE=1."
    )


def check_hub_reachable(tasks: list[str], shipped: list[str]) -> None:
    """Fails at once when ``tasks`` need the Hub and it does not answer. Unreachable, ``datasets`` retried
    for 25 s (measured: 5 retries, 1 + 2 + 4 + 8 + 8 s) and failed with an error the command took for an
    unwritable output folder; this probe is one request of at most 3 s. In offline mode ``datasets`` reads
    its cache and fails at once, and :func:`evaluate` says which tasks were not there."""
    hub_tasks = [task for task in tasks if task not in shipped]
    from datasets.config import HF_HUB_OFFLINE

    if not hub_tasks or HF_HUB_OFFLINE:
        return
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=3)
    except Exception as error:  # no answer at all, whatever the cause (DNS, refused, timeout, TLS, proxy)
        reason = f"this machine cannot reach {constants.ENDPOINT} ({error or type(error).__name__})"
        raise DataError(hub_message(hub_tasks, shipped, reason)) from error


def evaluate(
    model: Path, tasks: list[str], limit: int | None, batch_size: int, device: str
) -> dict[str, Any]:
    """lm-eval's results dict (without per-sample logs) for ``tasks`` on the exported ``model``."""
    model_args = _model_args(model)
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager

        from sa_train.export.harness import EXPORT_MODEL
    except ModuleNotFoundError as error:
        raise ConfigError(
            f"eval needs lm-evaluation-harness ({error}); install it with `pip install -e '.[eval]'`."
        ) from error
    logging.getLogger("lm_eval.api.task").addFilter(_drop_metadata_hint)  # once: filters are a set
    task_manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    shipped = task_manager.all_subtasks
    if not set(tasks) <= set(task_manager.all_tasks):
        # Indexing lm-eval's own ~15k task files takes ~10 s here: only when a task is not sa_train's.
        task_manager = TaskManager(include_path=str(TASKS_DIR))
    unknown = [task for task in tasks if task not in task_manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"--tasks: lm-eval knows no task {', '.join(unknown)}. sa_train ships {', '.join(shipped)} "
            "(offline); `lm_eval ls tasks` lists lm-eval's own."
        )
    check_hub_reachable(tasks, shipped)
    try:
        return simple_evaluate(
            model=EXPORT_MODEL,
            model_args=model_args,
            tasks=tasks,
            limit=limit,
            batch_size=batch_size,
            device=device,
            task_manager=task_manager,
            log_samples=False,
        )
    except ConnectionError as error:  # datasets' answer to data neither downloadable nor in the cache
        hub_tasks = [task for task in tasks if task not in shipped]
        raise DataError(
            hub_message(
                hub_tasks, shipped, f"their data is neither downloadable nor in the local cache ({error})"
            )
        ) from error


def main(argv: Sequence[str]) -> None:
    parser = tool_parser(
        "eval", "Run lm-evaluation-harness on an exported model folder and write its results as JSON."
    )
    parser.add_argument("--model", type=Path, required=True, help="a folder written by `export`")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--limit", type=int, help="evaluate only the first N documents of each task")
    parser.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size (1)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu)")
    parser.add_argument("--out", type=Path, help="results JSON (default: <model folder>.eval.json beside it)")
    args = parser.parse_args(argv)
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    if not tasks:
        raise ConfigError("--tasks is empty; name lm-eval tasks, e.g. shakespeare_milton_ppl.")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit={args.limit} must be a positive number of documents per task.")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size={args.batch_size} must be a positive integer.")
    check_device(args.device)
    results = evaluate(args.model, tasks, args.limit, args.batch_size, args.device)

    from lm_eval.utils import handle_non_serializable, make_table

    out = args.out or args.model.with_name(f"{args.model.name}.eval.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=handle_non_serializable), encoding="utf-8")
    print(make_table(results))
    print(f"results written to {out}")
