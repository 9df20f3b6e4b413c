"""A trained run generates from its checkpoint alone: fit, move the checkpoint away, generate."""

from __future__ import annotations

import shutil

import pytest
from test_cli import run_cli, run_module, tiny_run_config
from tokenizers import Tokenizer

from sa_train import SAModel
from sa_train.checkpoint import read_checkpoint


@pytest.mark.slow
def test_generate_from_a_fitted_checkpoint_in_a_fresh_process(tmp_path, small_corpus, capsys):
    config = tiny_run_config(tmp_path, small_corpus)
    code, _, err = run_cli(["fit", "--config", str(config), "--trainer.max_steps=20"], capsys)
    assert code == 0, err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    checkpoint = elsewhere / "model.ckpt"
    shutil.copy(tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt", checkpoint)
    shutil.rmtree(tmp_path / "runs")
    shutil.rmtree(tmp_path / "cache")  # the tokenizer must come from the checkpoint

    prompt = "To be, or not to be"
    args = ["generate", "--checkpoint", "model.ckpt", "--prompt", prompt, "--max-new-tokens", "16"]
    result = run_module(args, elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr

    tokenizer = Tokenizer.from_str(read_checkpoint(checkpoint).tokenizer_json)
    eos = tokenizer.token_to_id("<|endoftext|>")
    model = SAModel.from_checkpoint(checkpoint)
    new = model.generate([eos, *tokenizer.encode(prompt).ids], 16, eos_token_id=eos)[0]
    assert result.stdout == prompt + tokenizer.decode(new) + "\n"
    assert len(result.stdout) > len(prompt) + 5
