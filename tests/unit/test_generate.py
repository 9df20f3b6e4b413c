"""Generation: greedy decoding against the full forward, sampling filters and their distribution, EOS."""

from __future__ import annotations

import re

import pytest
import torch
from references import greedy_by_full_forward

from sa_train import SAConfig, SAModel
from sa_train.errors import ConfigError
from sa_train.generation import Sampling, filter_logits, next_tokens


@pytest.fixture(scope="module")
def model() -> SAModel:
    torch.manual_seed(0)
    config = SAConfig(
        vocab_size=61,
        d_model=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=24,
        sa_groups=[[0], [1, 2, 3]],
    )
    return SAModel(SAConfig(**{**config.to_dict(), "init_std": 0.3})).eval()


def test_greedy_generation_of_padded_prompts_equals_rerunning_the_full_forward(model):
    prompts = [[5, 9, 2, 7, 1], [3], [8, 8, 4]]
    got = model.generate(prompts, max_new_tokens=10)
    assert got == [greedy_by_full_forward(model, prompt, 10) for prompt in prompts]


def test_generation_fills_the_whole_context(model):
    prompt = [1, 2, 3, 4]
    assert model.generate(prompt, max_new_tokens=21) == [greedy_by_full_forward(model, prompt, 21)]


def test_a_row_stops_at_eos_and_generation_ends_when_all_rows_have(model, monkeypatch):
    prompts = [[5, 9, 2], [3, 4]]
    free = model.generate(prompts, max_new_tokens=8)
    eos = free[0][2]
    stopped = model.generate(prompts, max_new_tokens=8, eos_token_id=eos)
    first_eos = [row.index(eos) if eos in row else len(row) - 1 for row in free]
    assert stopped == [row[: end + 1] for row, end in zip(free, first_eos, strict=True)]
    steps = []
    decode_step = model.decode_step
    monkeypatch.setattr(model, "decode_step", lambda *args: steps.append(1) or decode_step(*args))
    only = model.generate(prompts[:1], max_new_tokens=8, eos_token_id=eos)
    assert only == [free[0][:3]]
    assert len(steps) == 2  # the first token comes from the prefill; no step runs after the EOS


def test_top_k_and_top_p_keep_exactly_the_most_likely_tokens():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]).log()

    def kept(top_k: int | None, top_p: float | None) -> list[list[bool]]:
        return torch.isfinite(filter_logits(logits, top_k, top_p)).tolist()

    assert kept(top_k=2, top_p=None) == [[True, True, False, False], [False, False, True, True]]
    assert kept(top_k=None, top_p=0.5) == [[True, False, False, False], [False, False, False, True]]
    assert kept(top_k=None, top_p=0.7) == [[True, True, False, False], [False, False, True, True]]
    assert kept(top_k=None, top_p=0.81) == [[True, True, True, False], [False, True, True, True]]
    assert kept(top_k=3, top_p=1.0) == [[True, True, True, False], [False, True, True, True]]
    assert kept(top_k=10, top_p=None) == [[True] * 4] * 2


def test_sampling_draws_from_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(20000, 4)
    generator = torch.Generator().manual_seed(0)
    for temperature in (0.5, 1.0, 2.0):
        tokens = next_tokens(logits, Sampling(temperature=temperature), generator)
        frequencies = torch.bincount(tokens, minlength=4) / len(tokens)
        torch.testing.assert_close(frequencies, (logits[0] / temperature).softmax(-1), atol=0.015, rtol=0)
    nucleus = next_tokens(logits, Sampling(temperature=1.0, top_p=0.8), generator)
    assert set(nucleus.tolist()) == {0, 1}


def test_seeded_sampling_repeats_and_top_k_1_is_greedy(model):
    prompts = [[5, 9, 2], [3, 4]]
    sample = dict(max_new_tokens=12, temperature=1.5, seed=11)
    assert model.generate(prompts, **sample) == model.generate(prompts, **sample)
    assert model.generate(prompts, **sample) != model.generate(prompts, **{**sample, "seed": 12})
    assert model.generate(prompts, **sample, top_k=1) == model.generate(prompts, max_new_tokens=12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_p=0.0, temperature=1.0), "top_p=0.0 must lie in (0, 1]"),
        (dict(top_p=1.5, temperature=1.0), "top_p=1.5 must lie in (0, 1]"),
        (dict(top_k=0, temperature=1.0), "top_k=0"),
        (dict(temperature=-1.0), "temperature=-1.0"),
        (dict(prompts=[list(range(25))]), "the prompt is 25 tokens but the model's context"),
        (dict(prompts=[list(range(20))], max_new_tokens=6), "room for 1..5 new tokens"),
        (dict(prompts=[[3, 61]]), "prompt token ids must lie in 0..60"),
        (dict(prompts=[[3], []]), "at least one token"),
    ],
    ids=[
        "top-p-0",
        "top-p-above-1",
        "top-k-0",
        "negative-temperature",
        "long-prompt",
        "no-room",
        "id",
        "empty",
    ],
)
def test_bad_generation_settings_are_clear_errors(model, kwargs, message):
    kwargs = {"prompts": [[1, 2]], "max_new_tokens": 4, **kwargs}
    with pytest.raises(ConfigError, match=re.escape(message)):
        model.generate(**kwargs)
