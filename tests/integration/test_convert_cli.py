"""convert on a trained dense checkpoint: the result validates and fine-tunes through the CLI."""

from __future__ import annotations

import pytest
from test_cli import run_cli, tiny_run_config

from sa_train.checkpoint import read_checkpoint


@pytest.mark.slow
def test_convert_then_validate_and_fine_tune(tmp_path, small_corpus, capsys):
    config = tiny_run_config(tmp_path, small_corpus, sa_groups="dense")
    code, _, err = run_cli(["fit", "--config", str(config), "--trainer.max_steps=6"], capsys)
    assert code == 0, err
    dense = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    converted = tmp_path / "sa.ckpt"
    held_out = ["--data", str(small_corpus), "--text-field", "body", "--tokens", "512"]
    args = ["convert", "--checkpoint", str(dense), "--groups", "every:2", "--out", str(converted), *held_out]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert "held-out perplexity" in out and "heads matched" in out
    assert read_checkpoint(converted).config.groups == [[0, 1], [2, 3]]

    sa = ["--model.config.sa_groups=every:2"]
    code, _, err = run_cli(["validate", "--config", str(config), *sa, f"--ckpt_path={converted}"], capsys)
    assert code == 0, err
    fine_tune = [*sa, f"--model.init_from={converted}", "--trainer.max_steps=2"]
    code, _, err = run_cli(["fit", "--config", str(config), *fine_tune], capsys)
    assert code == 0, err
    wrong = ["--model.config.sa_groups=dense", f"--model.init_from={converted}", "--trainer.max_steps=1"]
    code, _, err = run_cli(["fit", "--config", str(config), *wrong], capsys)
    assert code == 2 and "model.init_from" in err

    code, _, err = run_cli(args, capsys)  # the output exists now
    assert code == 2 and "--out" in err
