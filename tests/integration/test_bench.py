"""The bench command on a small shape: every suite runs and the JSON holds the documented keys."""

from __future__ import annotations

import gzip
import json

import pytest
import yaml

from sa_train.cli import main
from sa_train.tools import bench


@pytest.fixture
def corpus_slice(tmp_path, monkeypatch):
    """The data suite on the shipped corpus's first 40 documents of 4000 characters (the slice
    scripts/gpu_run.py's dry run fits on): training a 4096-token BPE on all 2.6 MB and tokenising it
    four times took most of the test, and the suite's figures and keys do not depend on the size."""
    with gzip.open(bench.SHIPPED_CORPUS, "rt", encoding="utf-8") as f:
        text = "".join(json.loads(line)["text"] for line in f)[:160_000]
    corpus = tmp_path / "corpus.jsonl.gz"
    with gzip.open(corpus, "wt", encoding="utf-8") as f:
        for i in range(40):
            f.write(json.dumps({"text": text[i * 4000 : (i + 1) * 4000]}) + "\n")
    monkeypatch.setattr(bench, "SHIPPED_CORPUS", corpus)


@pytest.mark.slow
def test_bench_reports_every_suite_as_json(tmp_path, capsys, corpus_slice):
    pytest.importorskip("transformers")
    config = tmp_path / "small.yaml"
    model = {
        "vocab_size": 256,
        "d_model": 64,
        "n_layers": 4,
        "n_heads": 4,
        "max_seq_len": 64,
        "sa_groups": "every:2",
    }
    config.write_text(yaml.safe_dump({"model": {"config": model}, "data": {"seq_len": 32, "batch_size": 2}}))
    out = tmp_path / "bench.json"
    profiles = tmp_path / "profiles"
    args = [
        "--config",
        str(config),
        "--no-compile",
        "--rounds",
        "2",
        "--json",
        str(out),
        "--profile",
        str(profiles),
    ]
    decode = ["--batches", "1,2", "--prompts", "8,16", "--new", "4"]
    assert main(["bench", *args, *decode]) == 0
    report = json.loads(out.read_text())
    train, dec, data = report["train"], report["decode"], report["data"]
    for key in ("sa_vs_hf", "sa_vs_dense", "mfu_dense", "flop_ratio"):
        assert train[key] > 0, key
    assert train["flop_ratio"] > 1  # 2 of 4 layers skip Q/K
    assert {train[v]["mode"] for v in ("sa", "dense", "hf")} == {"eager"}
    for key in ("sa_vs_hf", "sa_vs_dense", "decode_sa_vs_hf", "decode_sa_vs_dense"):
        assert dec[key] > 0, key
    assert set(dec["settings"]) == {"b1_p8", "b1_p16", "b2_p8", "b2_p16"}
    row = dec["settings"]["b2_p16"]
    assert row["mode"] == {"sa": "eager", "dense": "eager", "hf": "eager"}
    for variant in ("sa", "dense", "hf"):
        # Decode only leaves out the prefill, so it is faster than end to end.
        assert row["decode_tokens_per_sec"][variant] > row["tokens_per_sec"][variant] * (4 - 1) / 4
        assert row["peak_memory_bytes"][variant] is None  # measured on CUDA only
    held = row["kv_cache_bytes"]
    assert held["sa"] / held["dense"] == (4 + 2) / 8
    assert data["tokenise_mb_per_sec"] > 0 and data["loader_share_of_step"] > 0
    assert "SA / dense" in capsys.readouterr().out
    for suite in ("train", "decode"):
        for variant in ("sa", "dense", "hf"):
            table = (profiles / f"{suite}-{variant}-eager.txt").read_text()
            assert "aten::mm" in table and (profiles / f"{suite}-{variant}-eager.json").stat().st_size > 0
