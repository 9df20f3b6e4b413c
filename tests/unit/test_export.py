"""Export to Hugging Face folders: logits and greedy text equal SAModel's, the SA cache, bad input."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer, models

from sa_train import SAConfig, SAModel, TextModel
from sa_train.checkpoint import model_checkpoint
from sa_train.cli import main
from sa_train.cost import kv_cache_vectors_per_token
from sa_train.data.tokenizer import EOS_TOKEN
from sa_train.errors import CheckpointError
from sa_train.export import writer
from sa_train.export.hf_names import hf_weight_name, to_hf_state_dict
from sa_train.export.writer import export_checkpoint
from sa_train.model import next_token_loss

ROOT = Path(__file__).resolve().parents[2]
REMOTE = ROOT / "sa_train" / "export" / "remote"
TINY = dict(vocab_size=320, d_model=64, n_layers=4, max_seq_len=48, init_std=0.1)
CONFIGS = {
    "dense-gqa": dict(n_heads=4, n_kv_heads=2),
    "dense-mqa-tied": dict(n_heads=4, n_kv_heads=1, tie_embeddings=True),
    "sa-groups-of-2-gqa": dict(n_heads=4, n_kv_heads=2, sa_groups="every:2"),
    "sa-dense-then-3-mqa-tied": dict(
        n_heads=8, n_kv_heads=1, sa_groups="dense:1,every:3", tie_embeddings=True
    ),
}


def write_checkpoint(path: Path, model: SAModel, tokenizer_json: str | None, step: int = 30) -> Path:
    """A checkpoint in the layout fit writes (sa_train.checkpoint), without the optimizer state."""
    torch.save(model_checkpoint(model, tokenizer_json, step), path)
    return path


def tiny_model(name: str) -> SAModel:
    torch.manual_seed(0)
    return SAModel(SAConfig(**TINY, **CONFIGS[name])).eval()


def greedy(model: SAModel, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy continuation by full recomputation with SAModel, the reference for generate()."""
    for _ in range(steps):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("name", CONFIGS)
def test_export_loads_in_transformers_with_samodel_logits_and_greedy_text(name, tmp_path, tokenizer_json):
    model = tiny_model(name)
    out = export_checkpoint(write_checkpoint(tmp_path / "m.ckpt", model, tokenizer_json), tmp_path / "hf")

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    config = json.loads((out / "config.json").read_text())
    if model.config.is_dense:
        assert type(hf) is transformers.LlamaForCausalLM
        assert config["model_type"] == "llama" and "auto_map" not in config
        assert not list(out.glob("*.py"))
    else:
        assert type(hf).__name__ == "SALlamaForCausalLM" and config["sa_groups"] == model.config.groups
        assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}

    ids = torch.randint(0, TINY["vocab_size"], (2, TINY["max_seq_len"]))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-4
        own_loss = next_token_loss(model(ids)[:, :-1], ids[:, 1:])  # training's loss, against HF's
        assert hf(ids, labels=ids).loss.item() == pytest.approx(own_loss.item(), rel=1e-5)

        prompt = hf_tokenizer("To be, or not to be, that is", return_tensors="pt")
        text_model = TextModel(model, Tokenizer.from_str(tokenizer_json), hf_tokenizer.bos_token_id)
        assert prompt.input_ids.tolist()[0] == text_model.encode("To be, or not to be, that is")
        assert prompt.input_ids[0, 0] == hf_tokenizer.convert_tokens_to_ids(EOS_TOKEN)  # the convention
        generated = hf.generate(**prompt, max_new_tokens=16, do_sample=False, eos_token_id=None)
        assert torch.equal(generated, greedy(model, prompt.input_ids, 16))
    assert hf_tokenizer.eos_token == hf_tokenizer.bos_token == hf_tokenizer.pad_token == EOS_TOKEN
    assert hf.generation_config.eos_token_id == hf_tokenizer.eos_token_id == config["eos_token_id"]


def test_sa_cache_holds_keys_for_anchors_only(tmp_path, tokenizer_json):
    model = tiny_model("sa-dense-then-3-mqa-tied")
    out = export_checkpoint(write_checkpoint(tmp_path / "m.ckpt", model, tokenizer_json), tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    prompt = torch.randint(1, TINY["vocab_size"], (1, 5))
    with torch.no_grad():
        result = hf.generate(
            prompt, max_new_tokens=7, do_sample=False, eos_token_id=None, return_dict_in_generate=True
        )
    length = result.sequences.shape[1] - 1  # the last token is sampled, never fed back
    cached = 0
    for index, layer in enumerate(result.cache.layers):
        assert layer.values.shape[-2] == length
        assert layer.keys.shape[-2] == length
        assert (layer.keys.numel() > 0) == (index in model.config.anchors), index
        cached += layer.keys.numel() + layer.values.numel()
    vector = model.config.n_kv_heads * model.config.head_dim
    assert cached == length * vector * kv_cache_vectors_per_token(model.config)  # L + #anchors, not 2L

    beams = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False, eos_token_id=None)
    with torch.no_grad():  # beam search reorders and repeats the values-only cache layers
        assert torch.equal(hf.generate(prompt, **beams), hf.generate(prompt, **beams, use_cache=False))


def test_static_cache_holds_values_only_for_shared_layers_and_compiles_whole(tmp_path, tokenizer_json):
    """generate with cache_implementation="static" and the forward compiled in one graph (generate compiles
    it itself on a GPU; aot_eager here, Inductor takes 30 s on this CPU) writes SAModel's greedy text, and the
    preallocated cache holds L + #anchors vectors per slot, not 2L."""
    model = tiny_model("sa-dense-then-3-mqa-tied")
    out = export_checkpoint(write_checkpoint(tmp_path / "m.ckpt", model, tokenizer_json), tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    hf.forward = torch.compile(hf.forward, fullgraph=True, backend="aot_eager")
    prompt = torch.randint(1, TINY["vocab_size"], (1, 5))
    with torch.no_grad():
        result = hf.generate(
            prompt,
            max_new_tokens=7,
            do_sample=False,
            eos_token_id=None,
            cache_implementation="static",
            return_dict_in_generate=True,
        )
    assert torch.equal(result.sequences, greedy(model, prompt, 7))
    assert type(result.cache).__name__ == "StaticCache"
    slots = result.cache.layers[0].max_cache_len
    assert slots >= prompt.shape[1] + 6  # the last token is never fed back
    cached = sum(layer.keys.nbytes + layer.values.nbytes for layer in result.cache.layers)
    vector_bytes = model.config.n_kv_heads * model.config.head_dim * 4
    assert cached == slots * vector_bytes * kv_cache_vectors_per_token(model.config)  # 6, not 8


def test_left_padded_batch_generates_what_each_prompt_generates_alone(tmp_path, tokenizer_json):
    model = tiny_model("sa-groups-of-2-gqa")
    out = export_checkpoint(write_checkpoint(tmp_path / "m.ckpt", model, tokenizer_json), tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, padding_side="left", trust_remote_code=True)
    prompts = ["Now is the winter of our discontent", "Friends"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert batch.attention_mask[1, 0] == 0  # the short prompt is padded
    with torch.no_grad():
        together = hf.generate(**batch, max_new_tokens=8, do_sample=False, eos_token_id=None)
        for row, text in enumerate(prompts):
            alone = greedy(model, tokenizer(text, return_tensors="pt").input_ids, 8)
            assert together[row, -8:].tolist() == alone[0, -8:].tolist()


def test_remote_code_imports_only_torch_transformers_and_itself():
    files = sorted(REMOTE.glob("*_sa_llama.py"))
    assert [f.name for f in files] == ["configuration_sa_llama.py", "modeling_sa_llama.py"]
    for file in files:
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {"<relative>"} if node.level else {node.module.split(".")[0]}
            else:
                continue
            assert roots <= {"torch", "transformers", "math", "typing", "<relative>"}, (file.name, roots)


def test_every_weight_has_its_transformers_name():
    for name in ("dense-gqa", "sa-dense-then-3-mqa-tied"):
        model = tiny_model(name)
        hf = writer.hf_model(model.config, model.state_dict(), 0, Path("m.ckpt"))
        assert set(to_hf_state_dict(model.state_dict())) == set(hf.state_dict())
    with pytest.raises(CheckpointError, match=r"layers\.0\.attn\.rotary"):
        hf_weight_name("layers.0.attn.rotary.weight")


def test_large_models_are_sharded_safetensors_and_nothing_is_pickled(tmp_path, tokenizer_json):
    model = tiny_model("sa-groups-of-2-gqa")
    checkpoint = write_checkpoint(tmp_path / "m.ckpt", model, tokenizer_json, step=1234)
    out = export_checkpoint(checkpoint, tmp_path / "hf", max_shard_size="200KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    names = {p.name for p in out.iterdir()}
    assert names - {s.name for s in shards} == {
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        "configuration_sa_llama.py",
        "modeling_sa_llama.py",
    }
    stored = {}
    for shard in shards:
        stored.update(load_file(shard))
    expected = to_hf_state_dict(model.state_dict())
    assert stored.keys() == expected.keys()
    assert all(torch.equal(stored[k], expected[k]) for k in expected)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left

    card = (out / "README.md").read_text()
    assert f"| parameters | {model.num_parameters():,} |" in card
    assert "`[[0, 1], [2, 3]]`" in card and "optimizer steps: 1,234" in card
    assert "| KV-cache vectors / token | 6 | 8 | 1.333x |" in card
    assert "trust_remote_code=True" in card


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_exports(dtype, torch_dtype, tmp_path, tokenizer_json):
    model = tiny_model("sa-groups-of-2-gqa")
    checkpoint = write_checkpoint(tmp_path / "m.ckpt", model, tokenizer_json)
    out = export_checkpoint(checkpoint, tmp_path / "hf", dtype=dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert hf.dtype == torch_dtype
    assert hf.model.layers[1].self_attn.v_proj.weight.dtype == torch_dtype
    ids = torch.randint(0, TINY["vocab_size"], (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits.float(), model(ids), atol=0.1, rtol=0.05)


def run_export(args: list[str], capsys) -> tuple[int, str]:
    code = main(["export", *args])
    return code, capsys.readouterr().err


def test_bad_checkpoints_are_one_clear_error(tmp_path, tokenizer_json, capsys):
    model = tiny_model("dense-gqa")
    good = write_checkpoint(tmp_path / "good.ckpt", model, tokenizer_json)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:5000])
    foreign = tmp_path / "foreign.ckpt"
    torch.save(model.state_dict(), foreign)
    no_tokenizer = write_checkpoint(tmp_path / "no_tokenizer.ckpt", model, None)
    no_eos = write_checkpoint(tmp_path / "no_eos.ckpt", model, Tokenizer(models.BPE()).to_str())
    edited = tmp_path / "edited.ckpt"
    checkpoint = torch.load(good, weights_only=True)
    checkpoint["state_dict"]["model.layers.0.attn.q_proj.weight"] = torch.zeros(3, 3)
    torch.save(checkpoint, edited)
    cases = {
        tmp_path / "missing.ckpt": "no checkpoint at",
        truncated: "cannot be read as a checkpoint",
        foreign: "is not a sa_train checkpoint",
        no_tokenizer: "holds no tokenizer",
        no_eos: "has no end-of-text token",
        edited: "q_proj",
    }
    for path, expected in cases.items():
        out = tmp_path / f"out-{path.stem}"
        code, err = run_export(["--checkpoint", str(path), "--out", str(out)], capsys)
        assert code == 2 and expected in err and "Traceback" not in err, (path, err)
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_an_existing_folder_is_replaced_only_with_overwrite(tmp_path, tokenizer_json, capsys):
    checkpoint = write_checkpoint(tmp_path / "m.ckpt", tiny_model("sa-groups-of-2-gqa"), tokenizer_json)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = run_export(["--checkpoint", str(checkpoint), "--out", str(out)], capsys)
    assert code == 2 and "--overwrite" in err and "is not empty" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    code, err = run_export(["--checkpoint", str(checkpoint), "--out", str(out), "--overwrite"], capsys)
    assert code == 0, err
    assert not (out / "notes.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.ckpt"]

    (tmp_path / "file").write_text("x")
    code, err = run_export(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "file")], capsys)
    assert code == 2 and "is a file" in err
    code, err = run_export(["--checkpoint", str(checkpoint), "--out", str(tmp_path), "--overwrite"], capsys)
    assert code == 2 and "holds the checkpoint" in err


def test_a_failure_while_writing_leaves_nothing(tmp_path, tokenizer_json, monkeypatch):
    checkpoint = write_checkpoint(tmp_path / "m.ckpt", tiny_model("dense-gqa"), tokenizer_json)

    def broken_card(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(writer, "model_card", broken_card)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(checkpoint, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ckpt"]


def test_shipped_eval_tasks_are_built_from_the_held_out_works_only():
    from sa_train.export import eval_tasks

    held_out = eval_tasks.held_out_works()
    texts = {work["id"]: "\n".join(line.strip() for line in work["text"].splitlines()) for work in held_out}
    assert sorted(texts) == ["henry_v", "tragedy_of_titus_andronicus"]

    for name, records in eval_tasks.build().items():
        shipped = (eval_tasks.TASKS_DIR / name).read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in shipped] == records, (
            f"{name} is stale: python -m {eval_tasks.__name__}"
        )
    ppl = eval_tasks.perplexity_docs(held_out)
    assert len(ppl) == eval_tasks.PASSAGES and all(
        len(doc["text"]) <= eval_tasks.PASSAGE_CHARS for doc in ppl
    )
    assert all(speech in texts[doc["work"]] for doc in ppl for speech in doc["text"].split("\n\n"))
    cloze = eval_tasks.cloze_docs(held_out)
    assert len(cloze) == eval_tasks.CLOZE_ITEMS
    for item in cloze:
        assert len(set(item["choices"])) == 4
        assert f"{item['context']}\n{item['choices'][item['label']]}\n" in texts[item["work"]]


def test_eval_rejects_bad_input_in_one_paragraph(tmp_path, capsys):
    for args, expected in (
        (["--model", str(tmp_path), "--tasks", "shakespeare_milton_ppl"], "has no config.json"),
        (["--model", str(tmp_path), "--tasks", " , "], "--tasks is empty"),
        (["--model", str(tmp_path), "--tasks", "shakespeare_milton_ppl", "--limit", "0"], "--limit=0"),
    ):
        assert main(["eval", *args]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, err
