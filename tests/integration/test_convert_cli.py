"""convert on a trained dense checkpoint or a Hugging Face Llama folder: the result validates and
fine-tunes through the CLI."""

from __future__ import annotations

import logging
import shlex

import pytest
import torch
from hf_llama import write_llama_folder
from test_cli import run_cli, tiny_run_config

from sa_train import SAModel
from sa_train.checkpoint import read_checkpoint


@pytest.mark.slow
def test_convert_then_validate_and_fine_tune(tmp_path, small_corpus, capsys, caplog, monkeypatch):
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
    # Lightning stops its log records at its own logger when it was imported before pytest's log handler
    # existed (as a conftest that imports sa_train.data does): let them reach caplog's handler.
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)
    with caplog.at_level(logging.INFO):
        code, _, err = run_cli(["fit", "--config", str(config), *fine_tune], capsys)
    assert code == 0, err
    assert f"model initialised from {converted} (trained 6 steps); this run starts at step 0" in caplog.text
    wrong = ["--model.config.sa_groups=dense", f"--model.init_from={converted}", "--trainer.max_steps=1"]
    code, _, err = run_cli(["fit", "--config", str(config), *wrong], capsys)
    assert code == 2 and "model.init_from" in err

    code, _, err = run_cli(args, capsys)  # the output exists now
    assert code == 2 and "--out" in err

    short = tmp_path / "short.txt"
    short.write_text("Too short to match heads on one part and score another. " * 3)
    args = ["convert", "--checkpoint", str(dense), "--groups", "every:2", "--out", str(tmp_path / "x.ckpt")]
    code, _, err = run_cli([*args, "--data", str(short)], capsys)
    assert code == 2 and "one to match heads on, one to score" in err


def convert_llama_folder(tmp_path, small_corpus, capsys) -> tuple[str, object]:
    """convert --hf on a small random Llama folder; returns convert's output and the Llama model."""
    llama = write_llama_folder(tmp_path / "llama")
    held_out = ["--data", str(small_corpus), "--text-field", "body", "--tokens", "512"]
    args = [
        "convert",
        "--hf",
        str(tmp_path / "llama"),
        "--groups",
        "every:2",
        "--out",
        str(tmp_path / "sa.ckpt"),
    ]
    code, out, err = run_cli([*args, *held_out], capsys)
    assert code == 0, err
    return out, llama


def test_convert_a_hugging_face_llama_folder(tmp_path, small_corpus, capsys):
    out, llama = convert_llama_folder(tmp_path, small_corpus, capsys)
    assert "held-out perplexity (512 tokens)" in out and "heads matched" in out
    saved = read_checkpoint(tmp_path / "sa.ckpt")
    assert saved.config.groups == [[0, 1], [2, 3]] and saved.config.n_kv_heads == 2
    assert saved.tokenizer_json == (tmp_path / "llama" / "tokenizer.json").read_text()
    # Anchors keep the Llama's Q/K untouched (only shared layers' heads are permuted).
    model = SAModel.from_checkpoint(tmp_path / "sa.ckpt")
    q = llama.model.layers[2].self_attn.q_proj.weight
    assert torch.equal(model.layers[2].attn.q_proj.weight, q) and not hasattr(model.layers[3].attn, "q_proj")


@pytest.mark.slow
def test_the_printed_command_fine_tunes_a_converted_llama(tmp_path, small_corpus, capsys):
    out, _ = convert_llama_folder(tmp_path, small_corpus, capsys)
    hint = next(line for line in out.splitlines() if line.startswith("fine-tune:"))
    overrides = shlex.split(hint.split("--config ...", 1)[1])
    config = str(tiny_run_config(tmp_path, small_corpus))
    architecture = overrides[: overrides.index("--model.init_from")]
    validate = ["validate", "--config", config, *architecture, f"--ckpt_path={tmp_path / 'sa.ckpt'}"]
    code, _, err = run_cli(validate, capsys)
    assert code == 0, err
    code, _, err = run_cli(["fit", "--config", config, *overrides, "--trainer.max_steps=2"], capsys)
    assert code == 0, err
