"""`python -m sa_train`: end-to-end training, every shipped config, and bad input as clear errors."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import IO

import pytest
import torch
import yaml
from tokenizers import Tokenizer

from sa_train import SAConfig, SAModel
from sa_train.checkpoint import read_checkpoint
from sa_train.cli import main

ROOT = Path(__file__).resolve().parents[2]


def tiny_run_config(tmp_path: Path, corpus: Path, **model_config) -> Path:
    """A config in the shape of configs/sa-tiny.yaml, scaled down to train in seconds."""
    config = {
        "seed_everything": 7,
        "model": {
            "config": {
                "vocab_size": 512,
                "d_model": 64,
                "n_layers": 4,
                "n_heads": 4,
                "n_kv_heads": 2,
                "max_seq_len": 64,
                "sa_groups": "every:2",
                **model_config,
            },
            "lr": 3e-3,
            "warmup_steps": 5,
        },
        "data": {
            "source": str(corpus),
            "text_field": "body",
            "vocab_size": 512,
            "seq_len": 64,
            "batch_size": 8,
            "val_fraction": 0.1,
            "cache_dir": str(tmp_path / "cache"),
        },
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 30,
            "log_every_n_steps": 1,
            "limit_val_batches": 2,
            "val_check_interval": 15,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path / "runs"),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path / "runs"), "name": "tiny"},
            },
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def module_env(**env: str) -> dict[str, str]:
    """This environment with this checkout's sa_train (and the test helpers) importable from anywhere, and
    ``env`` added."""
    path = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **env}


def run_module(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Run ``python -m sa_train ARGS`` in a fresh process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "sa_train", *args],
        cwd=cwd,
        env=module_env(**env),
        capture_output=True,
        text=True,
        timeout=600,
    )


def run_modules_together(argvs: list[list[str]], cwd: Path, timeout: float = 600) -> None:
    """Start ``python -m sa_train ARGS`` for every ARGS at once (as a sweep starts runs) and require each to
    exit with status 0; a failure shows that process's output."""
    with ExitStack() as files:
        logs = [files.enter_context(tempfile.TemporaryFile()) for _ in argvs]
        processes = [
            subprocess.Popen(
                [sys.executable, "-m", "sa_train", *args], cwd=cwd, env=module_env(), stdout=log, stderr=log
            )
            for args, log in zip(argvs, logs, strict=True)
        ]
        for process, log in zip(processes, logs, strict=True):
            assert process.wait(timeout=timeout) == 0, read_log(log)


def kill_when(
    command: list[str], cwd: Path, stop: Callable[[], bool], timeout: float, poll: float = 0.05, **env: str
) -> None:
    """Start ``command`` (with :func:`module_env`) and SIGKILL its whole process group (every rank and
    loader worker, as a scheduler kills a job) as soon as ``stop()`` is true, checked every ``poll``
    seconds. Fails if the process ends first or ``stop()`` is still false after ``timeout`` seconds."""
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            command, cwd=cwd, env=module_env(**env), stdout=log, stderr=log, start_new_session=True
        )
        deadline, stopped = time.monotonic() + timeout, False
        try:
            while not stopped and process.poll() is None and time.monotonic() < deadline:
                time.sleep(poll)
                stopped = stop()
            assert process.poll() is None, read_log(log)
            assert stopped, f"{command} not at its kill point after {timeout} s:\n{read_log(log)}"
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def read_log(log: IO[bytes]) -> str:
    """The end of a process's output that went to the file ``log``. Tests send a child's output to a file,
    never to a pipe they read only at the end: a pipe holds 64 KiB, and a 2-rank run that wrote more (its
    warnings, its progress bar) blocked in write(), so it never reached the step a test waited for."""
    log.seek(0)
    return log.read().decode(errors="replace")[-5000:]


def kill_module_when(
    args: list[str], cwd: Path, stop: Callable[[], bool], timeout: float, poll: float = 0.05, **env: str
) -> None:
    """:func:`kill_when` for ``python -m sa_train ARGS``."""
    kill_when([sys.executable, "-m", "sa_train", *args], cwd, stop, timeout, poll, **env)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the CLI in this process; returns (exit status, stdout, stderr)."""
    try:
        code = main(args)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_fit_through_the_cli_trains_and_writes_loadable_checkpoints(tmp_path, small_corpus):
    config = tiny_run_config(tmp_path, small_corpus)
    result = run_module(["fit", "--config", str(config)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    run = tmp_path / "runs" / "tiny" / "version_0"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.6, losses  # from ln(512) = 6.2 to ~5.2
    assert (run / "config.yaml").is_file()

    model = SAModel.from_checkpoint(run / "checkpoints" / "epoch=0-step=30.ckpt")
    assert not model.training
    assert model.config.groups == [[0, 1], [2, 3]]
    stored = torch.load(run / "checkpoints" / "epoch=0-step=30.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(model.layers[0].attn.q_proj.weight, stored["model.layers.0.attn.q_proj.weight"])
    logits = model(torch.randint(0, 512, (2, 16)))
    assert logits.shape == (2, 16, 512) and torch.isfinite(logits).all()
    tokenizer = Tokenizer.from_str(read_checkpoint(run / "checkpoints" / "last.ckpt").tokenizer_json)
    assert tokenizer.decode(tokenizer.encode("To be, or not").ids) == "To be, or not"


def test_bad_input_fails_in_a_subprocess_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"config": {"n_layers": 4, "sa_groups": [[0], [2, 3]]}}}))
    result = run_module(["fit", "--config", str(bad)], ROOT)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "model.config.sa_groups" in result.stderr and "skips layer 1" in result.stderr


@pytest.mark.parametrize(
    "override, expected",
    [
        (["--model.config.typo_heads=4"], "model.config.typo_heads"),
        (["--model.config.sa_groups=[[0,1],[1,2,3]]"], "model.config.sa_groups"),
        (["--model.config.sa_groups=[[0,1]]"], "add groups for layers 2..3"),
        (["--model.config.n_heads=5"], "model.config.n_heads=5 does not divide model.config.d_model=64"),
        (["--model.config.n_kv_heads=3"], "model.config.n_kv_heads=3 does not divide model.config.n_heads=4"),
        (["--data.seq_len=128"], "data.seq_len=128 exceeds model.config.max_seq_len=64"),
        (["--model.config.vocab_size=300"], "set model.config.vocab_size to at least 512"),
        (["--data.source=/no/such/corpus.jsonl"], "data.source"),
        (["--data.text_field=text"], "data.text_field"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, small_corpus, capsys, override, expected):
    code, _, err = run_cli(
        ["fit", "--config", str(tiny_run_config(tmp_path, small_corpus)), *override], capsys
    )
    assert code == 2
    message = err[err.index("error:") :]
    assert expected in message, err
    assert "Traceback" not in err


def test_empty_corpus_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"body": ""}) + "\n" + json.dumps({"body": "  "}) + "\n")
    code, _, err = run_cli(["fit", "--config", str(tiny_run_config(tmp_path, empty))], capsys)
    assert code == 2 and "data.source" in err and "empty" in err.lower()


def test_prepare_builds_the_cache_fit_then_reuses(tmp_path, small_corpus, capsys):
    config = tiny_run_config(tmp_path, small_corpus)
    code, out, err = run_cli(["prepare", "--config", str(config)], capsys)
    assert code == 0, err
    assert "%|" not in err and not out.startswith("\n")  # no progress bars in a log, only the summary line
    assert re.match(r"Token cache written to .*: train [\d,]+ tokens", out)
    manifests = list((tmp_path / "cache").rglob("manifest.json"))
    assert len(manifests) == 1


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "prepare"):
        assert f"\n  {command} " in out
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


@pytest.mark.parametrize("config_file", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse_and_build(config_file, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, err = run_cli(["fit", "--config", str(config_file), "--print_config"], capsys)
    assert code == 0, err
    printed = yaml.safe_load(out)
    config = SAConfig(**printed["model"]["config"])
    with torch.device("meta"):
        model = SAModel(config)
    expected_size = 345e6 if "350m" in config_file.name else 7e6
    assert model.num_parameters() == pytest.approx(expected_size, rel=0.15)
    if config_file.name.startswith("sa-"):
        assert not config.is_dense and len(config.anchors) < config.n_layers
    else:
        assert config.is_dense


@pytest.mark.slow
def test_resume_from_a_mid_epoch_checkpoint_matches_the_uninterrupted_run(tmp_path, small_corpus, capsys):
    config = tiny_run_config(tmp_path, small_corpus)
    ckpts = tmp_path / "ckpts"
    every_4_steps = [
        "--trainer.max_steps=8",
        "--trainer.callbacks+=sa_train.callbacks.LastStepCheckpoint",
        f"--trainer.callbacks.dirpath={ckpts}",
        "--trainer.callbacks.every_n_train_steps=4",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.filename={step}",
    ]
    code, _, err = run_cli(["fit", "--config", str(config), *every_4_steps], capsys)
    assert code == 0, err
    uninterrupted = torch.load(ckpts / "step=8.ckpt", weights_only=True)
    (ckpts / "step=8.ckpt").rename(tmp_path / "uninterrupted.ckpt")

    code, _, err = run_cli(
        ["fit", "--config", str(config), *every_4_steps, f"--ckpt_path={ckpts / 'step=4.ckpt'}"], capsys
    )
    assert code == 0, err
    resumed = torch.load(ckpts / "step=8.ckpt", weights_only=True)
    assert resumed["state_dict"].keys() == uninterrupted["state_dict"].keys()
    for name, tensor in uninterrupted["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], tensor), name


def test_validate_and_test_a_checkpoint(tmp_path, small_corpus, capsys):
    config = tiny_run_config(tmp_path, small_corpus)
    code, _, err = run_cli(["fit", "--config", str(config), "--trainer.max_steps=2"], capsys)
    assert code == 0, err
    ckpt = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    for command, metric in (("validate", "val/loss"), ("test", "test/loss")):
        code, out, err = run_cli([command, "--config", str(config), f"--ckpt_path={ckpt}"], capsys)
        assert code == 0, err
        assert metric in out


def test_last_checkpoint_holds_the_final_step_between_save_intervals(tmp_path, small_corpus, capsys):
    config = tiny_run_config(tmp_path, small_corpus)
    every_4_steps = [
        "--trainer.max_steps=6",
        "--trainer.callbacks+=sa_train.callbacks.LastStepCheckpoint",
        "--trainer.callbacks.every_n_train_steps=4",
        "--trainer.callbacks.save_last=true",
    ]
    code, _, err = run_cli(["fit", "--config", str(config), *every_4_steps], capsys)
    assert code == 0, err
    checkpoints = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 6
    assert torch.load(checkpoints / "epoch=0-step=4.ckpt", weights_only=True)["global_step"] == 4
