"""Reading a Hugging Face Llama folder (convert --hf): SAModel computes HF's logits; whatever SAModel
cannot represent exactly, and any missing or foreign file, is one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_llama import LLAMA, write_llama_folder
from safetensors.torch import load_file

from sa_train import SAConfig, SAModel
from sa_train.errors import CheckpointError, ConfigError
from sa_train.export.hf_names import hf_config_fields, hf_weight_name, sa_config_from_hf, sa_weight_name
from sa_train.export.reader import read_hf_folder

IDS = torch.randint(0, LLAMA["vocab_size"], (2, LLAMA["max_position_embeddings"]))


def edit_config(folder: Path, **fields) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def refusal(folder: Path) -> str:
    """The message of the CheckpointError that reading ``folder`` raises."""
    with pytest.raises(CheckpointError) as error:
        read_hf_folder(folder)
    return str(error.value)


# Folder layouts and architectures (arguments of write_llama_folder).
LAYOUTS = {
    "safetensors": {},
    "sharded": {"shard_size": "100KB"},
    "tied-mqa": {"tie_word_embeddings": True, "num_key_value_heads": 1},
    "pytorch_model.bin": {},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_imported_model_computes_the_llama_logits(tmp_path, layout):
    extra = LAYOUTS[layout]
    hf = write_llama_folder(tmp_path, **extra)
    if layout == "sharded":
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    if layout == "pytorch_model.bin":
        (tmp_path / "model.safetensors").unlink()
        # With the RoPE table transformers before 4.31 saved beside the weights (derived, so skipped).
        inv_freq = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
        torch.save({**hf.state_dict(), **inv_freq}, tmp_path / "pytorch_model.bin")
    saved = read_hf_folder(tmp_path)
    assert saved.config.is_dense and saved.config.rope_theta == 5000.0
    assert saved.config.tie_embeddings == bool(extra.get("tie_word_embeddings"))
    model = SAModel.from_saved(saved)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), hf(IDS).logits, atol=1e-5, rtol=0)


def test_names_and_config_fields_round_trip_through_the_one_table():
    config = SAConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, tie_embeddings=True)
    for name in SAModel(config).state_dict():
        assert sa_weight_name(hf_weight_name(name)) == name
    assert sa_weight_name("model.layers.0.self_attn.q_proj.bias") is None
    assert sa_config_from_hf({**hf_config_fields(config), "model_type": "llama"}, "config.json") == config


def test_legacy_rope_fields_and_left_out_defaults_read_as_transformers_reads_them():
    fields = {key: LLAMA[key] for key in ("vocab_size", "hidden_size", "intermediate_size")}
    fields |= {"num_hidden_layers": 2, "num_attention_heads": 4, "model_type": "llama"}
    config = sa_config_from_hf({**fields, "rope_theta": 500000.0, "rope_scaling": None}, "config.json")
    assert (config.rope_theta, config.n_kv_heads, config.norm_eps, config.max_seq_len) == (5e5, 4, 1e-6, 2048)
    assert not config.tie_embeddings
    assert sa_config_from_hf(fields, "config.json").rope_theta == 10000.0


# (config.json fields changed, what the refusal says)
REFUSED = [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, 'rope_scaling asks for RoPE of type "linear"'),
    (
        {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}},
        'rope_parameters asks for RoPE of type "llama3"',
    ),
    ({"attention_bias": True}, "attention_bias is true"),
    ({"mlp_bias": True}, "mlp_bias is true"),
    ({"hidden_act": "gelu"}, 'hidden_act is "gelu"'),
    ({"head_dim": 32}, "head_dim is 32, but SAModel's heads are hidden_size / num_attention_heads"),
    ({"model_type": "mistral"}, 'model_type is "mistral"'),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config is set"),
    ({"hidden_size": None}, "does not state hidden_size"),
    (
        {"num_key_value_heads": 3},
        "(model.config.n_heads is num_attention_heads there; model.config.n_kv_heads is num_key_value_heads "
        "there): model.config.n_kv_heads=3 does not divide",
    ),
]


@pytest.mark.parametrize("fields, expected", REFUSED, ids=[next(iter(fields)) for fields, _ in REFUSED])
def test_what_samodel_cannot_compute_exactly_is_refused(fields, expected):
    base = {**LLAMA, "model_type": "llama", "head_dim": 16}
    config = {key: value for key, value in {**base, **fields}.items() if value is not None}
    with pytest.raises(ConfigError) as error:
        sa_config_from_hf(config, "config.json")
    assert str(error.value).startswith("config.json") and expected in str(error.value)


def test_missing_and_foreign_files_are_one_clear_error(tmp_path):
    assert "no folder at" in refusal(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert "no config.json in" in refusal(tmp_path / "empty")

    write_llama_folder(tmp_path, tokenizer=False)
    assert "no tokenizer.json in" in refusal(tmp_path)

    write_llama_folder(tmp_path, shard_size="100KB")
    (tmp_path / "model.safetensors").unlink(missing_ok=True)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.rename(tmp_path / "elsewhere.bin")
    assert f"names the shard {shard.name}, which is not in the folder" in refusal(tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()
    assert "holds no weights" in refusal(tmp_path)

    write_llama_folder(tmp_path)
    edit_config(tmp_path, num_hidden_layers=5)
    assert "missing model.layers.4.input_layernorm.weight" in refusal(tmp_path)
    edit_config(tmp_path, num_hidden_layers=4, intermediate_size=128)
    assert "model.layers.0.mlp.gate_proj.weight is (160, 64), not (128, 64)" in refusal(tmp_path)
    edit_config(tmp_path, intermediate_size=160)
    weights = {
        **load_file(tmp_path / "model.safetensors"),
        "model.layers.0.self_attn.q_proj.bias": torch.zeros(64),
    }
    (tmp_path / "model.safetensors").unlink()
    torch.save(weights, tmp_path / "pytorch_model.bin")
    assert "unexpected model.layers.0.self_attn.q_proj.bias" in refusal(tmp_path)
    edit_config(tmp_path, vocab_size=100)
    assert "but config.json's vocab_size is 100" in refusal(tmp_path)
