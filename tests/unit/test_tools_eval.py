"""`python -m sa_train eval` with tasks whose data is on the Hugging Face Hub, without a network, and with
tasks no one knows."""

from __future__ import annotations

import logging

import datasets.config
import huggingface_hub
import lm_eval
import lm_eval.tasks
import pytest

from sa_train.cli import main
from sa_train.tools.eval import evaluate

SHIPPED = "shakespeare_milton_cloze, shakespeare_milton_ppl"


@pytest.fixture
def model_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # the folder checks, which run first, pass
    (tmp_path / "tokenizer.json").write_text("{}")
    return tmp_path


@pytest.fixture(scope="module")
def built_task_managers():
    """The TaskManagers built in this module, by their arguments."""
    return {}


@pytest.fixture
def task_index_built_once(built_task_managers, monkeypatch):
    """lm-eval's TaskManager as ``evaluate`` builds it, but each distinct one built once in this module:
    indexing lm-eval's own ~15k task files takes ~10 s, and the tests using this differ only in what
    happens after the index. The first of them builds it for real, inside ``evaluate``; the others get
    that same object (none of them runs a task, so none changes it)."""
    real = lm_eval.tasks.TaskManager

    def shared(*args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key not in built_task_managers:
            built_task_managers[key] = real(*args, **kwargs)
        return built_task_managers[key]

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", shared)


class NoNetwork:
    def head(self, url, timeout):
        raise OSError("[Errno -2] Name or service not known")


@pytest.mark.slow
def test_a_hub_task_without_a_network_is_named_before_lm_eval_runs(
    model_folder, task_index_built_once, monkeypatch, capsys
):
    """Before: 25 s of retries, then an error that blamed the output folders."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_session", NoNetwork)
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kwargs: pytest.fail("ran lm-eval: retries"))
    code = main(["eval", "--model", str(model_folder), "--tasks", "lambada_openai,shakespeare_milton_ppl"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "lambada_openai (lm-eval's) read their data from the Hugging Face Hub" in err
    assert "this machine cannot reach https://" in err
    assert f"need no network: {SHIPPED}" in err and "output folders" not in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_hub_task_missing_from_the_cache_in_offline_mode_is_named(
    model_folder, task_index_built_once, monkeypatch, capsys
):
    def offline(**kwargs):
        raise ConnectionError("Couldn't reach 'EleutherAI/lambada_openai' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    assert main(["eval", "--model", str(model_folder), "--tasks", "lambada_openai"]) == 2
    err = capsys.readouterr().err
    assert "lambada_openai (lm-eval's) read their data from the Hugging Face Hub" in err
    assert "neither downloadable nor in the local cache" in err
    assert f"need no network: {SHIPPED}" in err and "output folders" not in err


@pytest.mark.slow
def test_eval_names_an_unknown_task(model_folder, task_index_built_once, monkeypatch, capsys):
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kwargs: pytest.fail("ran lm-eval"))
    tasks = "shakespeare_milton_ppl,lambada_openai,no_such_task"  # sa_train's, lm-eval's, no one's
    code = main(["eval", "--model", str(model_folder), "--tasks", tasks])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "lm-eval knows no task no_such_task. sa_train ships" in err and "shakespeare_milton_cloze" in err
    assert "Traceback" not in err


def test_the_shipped_tasks_load_without_lm_eval_warnings(model_folder, monkeypatch, caplog):
    """Before: six warnings of metrics without aggregation or higher_is_better, and one --metadata hint
    per task, on every eval."""

    def load_only(task_manager, tasks, **kwargs):
        task_manager.load(tasks)
        return {}

    monkeypatch.setattr(lm_eval, "simple_evaluate", load_only)
    with caplog.at_level(logging.WARNING):
        assert evaluate(model_folder, SHIPPED.split(", "), limit=None, batch_size=1, device="cpu") == {}
    assert [record.getMessage() for record in caplog.records if record.name.startswith("lm_eval")] == []
