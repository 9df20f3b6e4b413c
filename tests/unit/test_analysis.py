"""Cross-layer attention similarity, head matching, suggested groups, and the analyze command."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from sa_train import SAConfig, SAModel
from sa_train.analysis import (
    anchors_for_kv_budget,
    attention_maps,
    groups_for_budget,
    neighbour_similarity,
    similarity,
    suggest_groups,
)
from sa_train.atomic_files import atomic_torch_save
from sa_train.checkpoint import add_model_entries
from sa_train.cli import main


def causal_rows(batch: int, heads: int, t: int, seed: int) -> torch.Tensor:
    scores = torch.randn(batch, heads, t, t, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


def test_head_matching_sees_through_a_permutation_of_heads():
    a = causal_rows(2, 4, 12, seed=0)
    permuted = a[:, [2, 0, 3, 1]]
    other = causal_rows(2, 4, 12, seed=1)
    result = similarity({0: a, 1: permuted, 2: other})
    js, cos = result.js, result.cosine
    assert js["matched"][0][1] == pytest.approx(1.0, abs=1e-6) and cos["matched"][0][1] == pytest.approx(1.0)
    assert js["mean"][0][1] == pytest.approx(1.0, abs=1e-6)  # the head average ignores order
    assert js["index"][0][1] < 0.95
    assert js["matched"][0][2] < js["matched"][0][1] and js["index"][1][0] == js["index"][0][1]
    assert len(result.head_pairs["0-1"]) == 4


def test_disjoint_attention_has_zero_similarity():
    t = 4
    first = torch.zeros(1, 1, t, t)
    first[..., 0] = 1.0  # every query attends to the first token
    last = torch.eye(t).view(1, 1, t, t)  # every query attends to itself
    js = similarity({0: first, 1: last}).js["index"][0][1]
    # rows 1..3 are disjoint (1 bit apart), row 0 is the same in both
    assert js == pytest.approx(1 / 4, abs=1e-6)


def test_neighbour_similarity_is_the_matched_matrix_next_to_its_diagonal():
    maps = {layer: causal_rows(2, 4, 12, seed=layer) for layer in (0, 3, 5)}
    maps[5] = maps[3][:, [2, 0, 3, 1]]  # layer 5 attends as layer 3 with its heads reordered
    matched = similarity(maps).js["matched"]
    assert neighbour_similarity(maps) == [matched[0][1], matched[1][2]]
    assert neighbour_similarity(maps)[1] == pytest.approx(1.0) and neighbour_similarity(maps)[0] < 0.99


def test_suggested_groups_follow_the_threshold_and_the_kv_budget():
    matrix = [
        [1.0, 0.5, 0.4, 0.3],
        [0.5, 1.0, 0.9, 0.85],
        [0.4, 0.9, 1.0, 0.95],
        [0.3, 0.85, 0.95, 1.0],
    ]
    assert suggest_groups(matrix, 0.8) == [[0], [1, 2, 3]]
    assert suggest_groups(matrix, 0.88) == [[0], [1, 2], [3]]
    assert anchors_for_kv_budget(4, 0.75) == 2  # (4 + 2) / 8
    groups, threshold = groups_for_budget(matrix, 2)
    assert groups == [[0], [1, 2, 3]] and threshold == 0.85
    assert SAConfig(n_layers=4, d_model=32, n_heads=2, sa_groups=groups).groups == groups


def test_attention_maps_are_causal_distributions_of_the_anchors():
    model = SAModel(
        SAConfig(vocab_size=50, d_model=32, n_layers=4, n_heads=2, sa_groups="every:2", max_seq_len=8)
    )
    maps = attention_maps(model.eval(), torch.randint(0, 50, (2, 8)))
    assert sorted(maps) == [0, 2]
    for probs in maps.values():
        assert probs.shape == (2, 2, 8, 8)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 8))
        assert torch.all(probs.triu(1) == 0)


def test_analyze_writes_the_heatmap_json_and_groups(tmp_path, capsys):
    import datasets

    from sa_train.data.tokenizer import train_bpe

    texts = [f"line {i} of the held out text, with words and more words {i * 7}" for i in range(200)]
    tokenizer = train_bpe(datasets.Dataset.from_dict({"text": texts}), 300)
    config = SAConfig(vocab_size=300, d_model=32, n_layers=4, n_heads=2, max_seq_len=32)
    model = SAModel(config)
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "global_step": 1}
    add_model_entries(checkpoint, config, tokenizer.to_str())
    atomic_torch_save(checkpoint, tmp_path / "dense.ckpt")
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))

    args = ["--checkpoint", str(tmp_path / "dense.ckpt"), "--data", str(data), "--out", str(tmp_path / "out")]
    assert main(["analyze", *args, "--seq-len", "16", "--kv-budget", "0.75"]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "similarity.json").read_text())
    assert report["layers"] == [0, 1, 2, 3] and len(report["js"]["matched"]) == 4
    assert (tmp_path / "out" / "similarity.png").stat().st_size > 10_000
    budget = report["suggested_for_budget"]["sa_groups"]
    assert len(budget) <= 2
    printed = [line for line in out.splitlines() if line.startswith("sa_groups:")]
    assert yaml.safe_load(printed[-1].split("#")[0])["sa_groups"] == budget

    assert main(["analyze", *args, "--kv-budget", "0.4"]) == 2
    assert "--kv-budget" in capsys.readouterr().err
