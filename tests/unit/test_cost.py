"""Analytic costs against what the model really does (FLOPs counted by torch, cache by structure)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from sa_train import SAConfig, SAModel
from sa_train.cli import main
from sa_train.cost import (
    cost_report,
    dense_twin,
    forward_flops_per_token,
    kv_cache_vectors_per_token,
    training_flops_per_token,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("groups", ["dense", "every:4", "dense:2,every:3"])
def test_forward_flops_match_torch_count(groups):
    # The reference backend multiplies full T x T matrices, as the cost convention counts them.
    cfg = SAConfig(
        vocab_size=96,
        d_model=64,
        n_layers=8,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=16,
        sa_groups=groups,
        attention_backend="reference",
    )
    ids = torch.zeros(3, 16, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        SAModel(cfg)(ids)
    assert counter.get_total_flops() == ids.numel() * forward_flops_per_token(cfg, 16)


def test_sa_saves_query_key_work_and_cache():
    dense = SAConfig(n_layers=8, sa_groups="dense")
    sa = SAConfig(n_layers=8, sa_groups="every:4")
    assert kv_cache_vectors_per_token(dense) == 16
    assert kv_cache_vectors_per_token(sa) == 8 + 2
    assert training_flops_per_token(sa, 256) < training_flops_per_token(dense, 256)
    assert training_flops_per_token(dense, 256) == 3 * forward_flops_per_token(dense, 256)


def test_causal_count_keeps_the_mean_visible_context():
    cfg = SAConfig(d_model=64, n_layers=4, n_heads=4, sa_groups="every:2")
    full, causal = forward_flops_per_token(cfg, 16), forward_flops_per_token(cfg, 16, causal=True)
    assert full - causal == (2 + 4) * 2 * (16 - 8.5) * 64


# Worked by hand: d 32, 4 layers, 4 heads of 8, 2 kv heads (kv width 16), ffn 64, vocab 100, every:2.
#   per layer V 32·16 + O 32·32 + MLP 3·32·64 = 7680; Q/K per anchor 32·32 + 32·16 = 1536; head 3200
#   matmul weights 4·7680 + 2·1536 + 3200 = 36992; + embedding 3200 + 9 norms of 32 = 40480 parameters
#   decode at context 10: 2·36992 + (2 anchors + 4 layers)·2·10·32 = 77824
#   training at seq 8 (causal, mean context 4.5): 3·(73984 + 6·2·4.5·32) = 227136
#   KV cache: (4 + 2) vectors of 16 bf16 values = 192 bytes/token; dense twin 8 vectors = 256
SMALL = SAConfig(
    vocab_size=100, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=64, sa_groups="every:2"
)


def test_cost_report_matches_the_hand_worked_small_config():
    report = cost_report(SMALL, seq_len=8, context=10, dtype="bf16")
    sa, dense = report["sa"], report["dense_twin"]
    assert (sa["n_layers"], sa["n_anchors"], dense["n_anchors"]) == (4, 2, 4)
    assert sa["params"] == 40480 == SAModel(SMALL).num_parameters()
    assert dense["params"] == 40480 + 2 * 1536 == SAModel(dense_twin(SMALL)).num_parameters()
    assert sa["non_embedding_params"] == 40480 - 2 * 3200
    assert sa["decode_flops_per_token"] == 77824
    assert sa["train_flops_per_token"] == 227136
    assert sa["prefill_flops"] == 8 * 227136 / 3
    assert (sa["kv_cache_bytes_per_token"], dense["kv_cache_bytes_per_token"]) == (192, 256)
    assert report["savings"]["kv_cache_sa_over_dense"] == (4 + 2) / (2 * 4)


def test_cost_report_of_the_shipped_350m_config():
    """24 layers, d 1024, 16 heads (no GQA), ffn 2816, vocab 32768, dense:4,every:4 -> 9 anchors."""
    config = SAConfig(**yaml.safe_load((ROOT / "configs" / "sa-350m.yaml").read_text())["model"]["config"])
    report = cost_report(config, seq_len=2048, dtype="bf16")
    sa, dense = report["sa"], report["dense_twin"]
    per_layer = 2 * 1024 * 1024 + 3 * 1024 * 2816
    head_and_embedding = 2 * 32768 * 1024
    assert (
        sa["params"] == 24 * per_layer + 9 * 2 * 1024 * 1024 + head_and_embedding + 49 * 1024 == 343_983_104
    )
    assert dense["params"] == sa["params"] + 15 * 2 * 1024 * 1024
    assert (sa["kv_cache_vectors_per_token"], dense["kv_cache_vectors_per_token"]) == (33, 48)
    assert sa["kv_cache_bytes_per_token"] == 33 * 1024 * 2
    assert sa["kv_cache_bytes_full_context"] == 33 * 1024 * 2 * 2048
    assert report["savings"]["kv_cache_sa_over_dense"] == 33 / 48


def test_cost_command_prints_json_and_a_table(capsys):
    assert (
        main(["cost", "--config", str(ROOT / "configs" / "sa-tiny.yaml"), "--json", "--dtype", "bf16"]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["sa"]["n_anchors"] == 2 and report["dense_twin"]["n_anchors"] == 8
    assert report["savings"]["kv_cache_sa_over_dense"] == (8 + 2) / 16
    assert report["sa"]["kv_cache_bytes_per_token"] == (8 + 2) * 4 * 32 * 2  # 4 kv heads of 32, bf16
    assert main(["cost", "--config", str(ROOT / "configs" / "sa-350m.yaml")]) == 0
    table = capsys.readouterr().out
    assert "KV vectors / token" in table and "1.455x" in table


def test_cost_command_bad_input(tmp_path, capsys):
    assert main(["cost", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "--config: no file" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("model:\n  config:\n    n_layers: 4\n    sa_groups: every:0\n")
    assert main(["cost", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "model.config.sa_groups" in capsys.readouterr().err


def test_cost_takes_fit_overrides_and_the_data_modules_defaults(tmp_path, capsys):
    """Before: an override was refused (each variant needed a YAML file), and a config without a data section
    was costed at model.config.max_seq_len instead of the data module's seq_len."""
    from sa_train.data import TokenDataModule

    tiny = str(ROOT / "configs" / "sa-tiny.yaml")
    args = ["cost", "--config", tiny, "--json", "--model.config.sa_groups", "every:4", "--trainer.precision"]
    assert main([*args, "bf16-mixed"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sa"]["n_anchors"] == 2 and report["settings"]["dtype"] == "bf16"
    assert main(["cost", "--config", tiny, "--json", "--model.config.sa_groups=every:3"]) == 0
    assert json.loads(capsys.readouterr().out)["sa"]["n_anchors"] == 3

    (tmp_path / "model.yaml").write_text("model:\n  config:\n    n_layers: 4\n    max_seq_len: 1024\n")
    assert main(["cost", "--config", str(tmp_path / "model.yaml"), "--json"]) == 0
    seq_len = json.loads(capsys.readouterr().out)["settings"]["seq_len"]
    assert seq_len == inspect.signature(TokenDataModule).parameters["seq_len"].default == 256

    with pytest.raises(SystemExit) as parse_error:  # parse errors exit as fit's do
        main(["cost", "--config", tiny, "--model.config.sa_group", "every:3"])
    assert parse_error.value.code == 2
    err = capsys.readouterr().err
    assert "Did you mean --model.config.sa_groups" in err and "python -m sa_train cost --help" in err
    assert main(["cost", "--config", tiny, "--data.seq_len", "512"]) == 2
    assert "data.seq_len=512 must be" in capsys.readouterr().err
