"""Export and lm-eval end to end: fit -> export -> load without sa_train -> eval, all offline.

(Not test_export.py: pytest cannot collect two test modules of one name from folders without __init__.py.)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import datasets
import datasets.config
import huggingface_hub.constants
import pytest
import torch
from test_cli import ROOT, run_cli, tiny_run_config
from tokenizers import Tokenizer

from sa_train import SAConfig, SAModel
from sa_train.checkpoint import model_checkpoint, read_checkpoint
from sa_train.data.tokenizer import train_bpe
from sa_train.export.eval_tasks import TASKS_DIR
from sa_train.export.writer import export_checkpoint

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TASKS = "shakespeare_milton_ppl,shakespeare_milton_cloze"

# Loads the export with every import of sa_train failing, and prints logits and a greedy continuation.
LOAD_WITHOUT_SA_TRAIN = """
import json, sys
sys.modules["sa_train"] = None
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
prompt = tokenizer("Once more unto the breach, dear friends,", return_tensors="pt")
with torch.no_grad():
    logits = model(prompt.input_ids).logits[0].tolist()
    text = model.generate(**prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)[0].tolist()
print(json.dumps({"ids": prompt.input_ids[0].tolist(), "logits": logits, "greedy": text}))
"""


@contextlib.contextmanager
def offline_and_unplugged() -> Iterator[list[tuple]]:
    """This process as the OFFLINE variables set it up at import (huggingface_hub's and datasets' flags,
    which transformers and lm-eval read), with every network connection refused; yields the attempts."""
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("the network is unplugged in this test")

    with pytest.MonkeyPatch.context() as patch:
        for name, value in OFFLINE.items():
            patch.setenv(name, value)
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        patch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        patch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        patch.setattr(socket, "getaddrinfo", refuse)
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket.socket, "connect_ex", refuse)
        yield attempts


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT)}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def own_byte_perplexity(model: SAModel, tokenizer: Tokenizer, texts: list[str]) -> float:
    """exp(-sum log p(text) / bytes), each text scored after the end-of-text token, as lm-eval does."""
    eos = tokenizer.token_to_id("<|endoftext|>")
    total, size = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([[eos, *tokenizer.encode(text).ids]])
            assert ids.shape[1] <= model.config.max_seq_len  # one window: no rolling context to replicate
            logprobs = model(ids[:, :-1]).log_softmax(-1)
            total += logprobs.gather(-1, ids[:, 1:, None]).sum().item()
            size += len(text.encode("utf-8"))
    return math.exp(-total / size)


def shipped_passages(count: int) -> list[str]:
    lines = (TASKS_DIR / "shakespeare_milton_ppl.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines[:count]]


@pytest.mark.slow
def test_fit_export_load_without_sa_train_and_eval_offline(tmp_path, small_corpus, capsys):
    config = tiny_run_config(tmp_path, small_corpus, max_seq_len=512)
    code, _, err = run_cli(["fit", "--config", str(config), "--trainer.max_steps=10"], capsys)
    assert code == 0, err
    checkpoint = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"

    code, _, err = run_cli(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf")], capsys)
    assert code == 0, err
    loaded = run([sys.executable, "-c", LOAD_WITHOUT_SA_TRAIN, str(tmp_path / "hf")], tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    remote = json.loads(loaded.stdout.strip().splitlines()[-1])

    model = SAModel.from_checkpoint(checkpoint)
    assert not model.config.is_dense
    ids = torch.tensor([remote["ids"]])
    with torch.no_grad():
        assert (torch.tensor(remote["logits"]) - model(ids)[0]).abs().max().item() <= 1e-4
        for _ in range(12):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert remote["greedy"] == ids[0].tolist()

    with offline_and_unplugged() as connections:
        code, _, err = run_cli(
            [
                "eval",
                "--model",
                str(tmp_path / "hf"),
                "--tasks",
                TASKS,
                "--limit",
                "3",
                "--out",
                str(tmp_path / "r.json"),
            ],
            capsys,
        )
    assert code == 0, err
    assert connections == []
    # one bar for the cloze task's requests, none per perplexity window, no "too long for the model"
    assert err.count("Running loglikelihood requests:   0%") <= 1, err[-3000:]
    assert "longer than the specified maximum sequence length" not in err
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["n-samples"]["shakespeare_milton_cloze"]["effective"] == 3
    assert 0.0 <= results["results"]["shakespeare_milton_cloze"]["acc,none"] <= 1.0
    tokenizer = Tokenizer.from_str(read_checkpoint(checkpoint).tokenizer_json)
    assert results["results"]["shakespeare_milton_ppl"]["byte_perplexity,none"] == pytest.approx(
        own_byte_perplexity(model, tokenizer, shipped_passages(3)), rel=1e-4
    )


@pytest.mark.slow
@pytest.mark.parametrize("sa_groups", ["dense", "every:2"])
def test_lm_eval_scores_an_export_as_samodel_does(sa_groups, tmp_path, small_corpus):
    """In-process lm-eval on a dense (LlamaForCausalLM) and an SA (remote code) export."""
    from sa_train.tools.eval import evaluate

    with small_corpus.open(encoding="utf-8") as f:
        documents = datasets.Dataset.from_dict({"text": [json.loads(line)["body"] for line in f]})
    tokenizer = train_bpe(documents, 512)
    torch.manual_seed(0)
    config = SAConfig(
        vocab_size=512, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=512, sa_groups=sa_groups
    )
    model = SAModel(config).eval()
    torch.save(model_checkpoint(model, tokenizer.to_str(), global_step=1), tmp_path / "m.ckpt")
    out = export_checkpoint(tmp_path / "m.ckpt", tmp_path / "hf")

    results = evaluate(out, TASKS.split(","), limit=2, batch_size=2, device="cpu")
    assert results["results"]["shakespeare_milton_ppl"]["byte_perplexity,none"] == pytest.approx(
        own_byte_perplexity(model, tokenizer, shipped_passages(2)), rel=1e-4
    )
    assert results["n-samples"]["shakespeare_milton_cloze"]["effective"] == 2
