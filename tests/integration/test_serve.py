"""An SA export served by the real ``transformers serve`` (OpenAI API), plain and with continuous batching.

Both servers run for the whole module, started together by :func:`sa_train.export.serving.served`. Their
answers to concurrent requests are compared with ``SAModel.generate`` (what ``sa_train generate`` runs) on
the token ids of the export's own tokenizer, which is what the server tokenizes with.
"""

from __future__ import annotations

import gzip
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets
import pytest
import torch
import transformers

from sa_train import SAConfig, SAModel
from sa_train.checkpoint import model_checkpoint
from sa_train.data.datamodule import SHIPPED_CORPUS
from sa_train.data.tokenizer import train_bpe
from sa_train.export.serving import CONTINUOUS_BATCHING, post, served
from sa_train.export.writer import export_checkpoint

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [
    "To be, or not to be",
    "Now is the winter of our discontent",
    "Friends",
    "Once more unto the breach",
]
# The untrained model's answers hold byte tokens that are not whole UTF-8 characters, shown as U+FFFD. A
# stream leaves out those at its very end, so the streamed prompt is the first whose answer does not end so.
STREAMED = [*PROMPTS, "The king", "All the world's a stage", "O, for a Muse of fire", "Good night"]
NEW_TOKENS = 8
VOCAB = 1024
MODES = {"plain": (), "continuous-batching": CONTINUOUS_BATCHING}

pytestmark = pytest.mark.slow  # two servers in subprocesses: ~30 s before the first test


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> tuple[Path, SAModel]:
    """A tiny SA model (groups of 2, GQA) exported, and the model itself."""
    folder = tmp_path_factory.mktemp("serve")
    with gzip.open(SHIPPED_CORPUS, "rt", encoding="utf-8") as f:
        text = json.loads(f.readline())["text"][:40_000]
    tokenizer = train_bpe(datasets.Dataset.from_dict({"text": text.split("\n\n")}), VOCAB)
    torch.manual_seed(0)
    config = SAConfig(
        vocab_size=VOCAB,
        d_model=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=128,
        sa_groups="every:2",
    )
    model = SAModel(config).eval()
    torch.save(model_checkpoint(model, tokenizer.to_str(), global_step=1), folder / "m.ckpt")
    return export_checkpoint(folder / "m.ckpt", folder / "sa-tiny"), model


@pytest.fixture(scope="module")
def servers(export, tmp_path_factory):
    """Base URL of each mode's server."""
    out, _ = export
    with served(
        {mode: (out, flags) for mode, flags in MODES.items()}, tmp_path_factory.mktemp("logs")
    ) as urls:
        yield urls


@pytest.fixture(scope="module")
def expected(export) -> dict[str, tuple[str, int]]:
    """SAModel's greedy text of each prompt (up to the end-of-text token) and its number of tokens."""
    out, model = export
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    answers = {}
    for prompt in STREAMED:
        new = model.generate([tokenizer(prompt).input_ids], NEW_TOKENS, eos_token_id=tokenizer.eos_token_id)[
            0
        ]
        answers[prompt] = (tokenizer.decode(new, skip_special_tokens=True), len(new))
    return answers


def completion(url: str, model: Path, prompt: str) -> dict:
    body = {"model": str(model), "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0}
    return json.loads(post(f"{url}/v1/completions", body))


@pytest.mark.parametrize("mode", MODES)
def test_concurrent_completions_are_samodel_greedy_text(mode, servers, export, expected):
    out, _ = export
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(lambda prompt: completion(servers[mode], out, prompt), PROMPTS))
    for prompt, answer in zip(PROMPTS, answers, strict=True):
        text, tokens = expected[prompt]
        assert answer["choices"][0]["text"] == text, prompt
        assert answer["usage"]["completion_tokens"] == tokens, prompt


@pytest.mark.parametrize("mode", MODES)
def test_streamed_completion_is_samodel_greedy_text(mode, servers, export, expected):
    out, _ = export
    prompt = next(prompt for prompt in STREAMED if not expected[prompt][0].endswith("\ufffd"))
    body = {"model": str(out), "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    events = post(f"{servers[mode]}/v1/completions", body).decode().split("\n\n")
    chunks = [json.loads(event.removeprefix("data: ")) for event in events if event.startswith("data: {")]
    texts = [chunk["choices"][0]["text"] for chunk in chunks if chunk["choices"]]
    assert len(texts) > 2  # token by token, then the finish reason
    assert "".join(texts) == expected[prompt][0]
    assert chunks[-1]["usage"]["completion_tokens"] == expected[prompt][1]
