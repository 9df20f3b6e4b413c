"""The model against independent references: HF Llama (dense) and hand-written materialised-P math (SA)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from sa_train import SAConfig, SAModel
from sa_train.errors import ConfigError
from sa_train.export.hf_names import hf_config_fields, to_hf_state_dict

TINY = dict(vocab_size=101, d_model=64, n_layers=4, max_seq_len=32)


def hf_llama_from(model: SAModel):
    """A transformers LlamaForCausalLM holding ``model``'s weights (dense models only)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**hf_config_fields(model.config), attn_implementation="eager")
    )
    hf.load_state_dict(to_hf_state_dict(model.state_dict()), strict=True)
    return hf.eval()


@pytest.mark.parametrize(
    "extra",
    [dict(n_heads=4), dict(n_heads=4, n_kv_heads=2), dict(n_heads=8, n_kv_heads=1, tie_embeddings=True)],
    ids=["mha", "gqa", "mqa-tied"],
)
def test_dense_model_is_hf_llama(extra):
    torch.manual_seed(0)
    model = SAModel(SAConfig(**TINY, **extra, init_std=0.1)).eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 32))
    with torch.no_grad():
        delta = (model(ids) - hf_llama_from(model)(ids).logits).abs().max().item()
    assert delta <= 1e-4


def reference_logits(model: SAModel, ids: torch.Tensor) -> torch.Tensor:
    """The SA definition written out by hand: P materialised per group, rotary via complex numbers."""
    cfg = model.config
    seq_len, hd = ids.shape[1], cfg.head_dim
    freqs = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2).double() / hd)
    rotation = torch.polar(
        torch.ones(seq_len, hd // 2).double(), torch.outer(torch.arange(seq_len).double(), freqs)
    )

    def rope(x):  # rotate-half layout: pairs are (i, i + hd/2)
        pairs = torch.complex(x[..., : hd // 2].double(), x[..., hd // 2 :].double()) * rotation
        return torch.cat([pairs.real, pairs.imag], dim=-1).to(x.dtype)

    def rms(x, w):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    def heads(x, n):
        return x.view(x.shape[0], seq_len, n, hd).transpose(1, 2)

    x = model.embed.weight[ids]
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    for group in cfg.groups:
        for layer in group:
            block = model.layers[layer]
            h = rms(x, block.attn_norm.weight)
            v = heads(h @ block.attn.v_proj.weight.T, cfg.n_kv_heads).repeat_interleave(
                cfg.n_heads // cfg.n_kv_heads, dim=1
            )
            if layer == group[0]:
                q = rope(heads(h @ block.attn.q_proj.weight.T, cfg.n_heads))
                k = rope(heads(h @ block.attn.k_proj.weight.T, cfg.n_kv_heads))
                k = k.repeat_interleave(cfg.n_heads // cfg.n_kv_heads, dim=1)
                scores = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~mask, float("-inf"))
                probs = scores.softmax(-1)
            out = (probs @ v).transpose(1, 2).reshape(x.shape)
            x = x + out @ block.attn.o_proj.weight.T
            h = rms(x, block.mlp_norm.weight)
            mlp = block.mlp
            x = x + (F.silu(h @ mlp.gate_proj.weight.T) * (h @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    return rms(x, model.norm.weight) @ model.lm_head.weight.T


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize(
    "groups, heads",
    [
        ("dense", (4, 4)),
        ("every:2", (4, 4)),
        ("every:4", (4, 2)),
        ([[0], [1, 2, 3, 4], [5, 6]], (4, 1)),
        ("dense:1,every:3", (8, 2)),
    ],
    ids=["groups-of-1", "groups-of-2", "groups-of-4-gqa", "mixed-spans-mqa", "dense-then-3-gqa"],
)
def test_sa_model_matches_materialised_reference(groups, heads, backend):
    torch.manual_seed(0)
    n_layers = max(layer for group in SAConfig(n_layers=7, sa_groups=groups).groups for layer in group) + 1
    cfg = SAConfig(
        **{**TINY, "n_layers": n_layers},
        n_heads=heads[0],
        n_kv_heads=heads[1],
        sa_groups=groups,
        init_std=0.1,
        attention_backend=backend,
    )
    # In float64, so that the bound is set by the model's rotary tables, computed in fp32 as HF Llama's are
    # (1e-6 in the logits, 3e-5 in the gradients here), not by fp32 summation order, which moved one of
    # 12k gradient entries by 1.2e-4 on a CI machine.
    model = SAModel(cfg).double()
    ids = torch.randint(0, cfg.vocab_size, (2, 19))
    probe = torch.randn(2, 19, cfg.vocab_size, dtype=torch.float64)

    got = model(ids)
    grads = torch.autograd.grad((got * probe).sum(), list(model.parameters()))
    want = reference_logits(model, ids)
    want_grads = torch.autograd.grad((want * probe).sum(), list(model.parameters()))

    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for (name, _), grad, want_grad in zip(model.named_parameters(), grads, want_grads, strict=True):
        torch.testing.assert_close(grad, want_grad, atol=1e-4, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "left-padded"])
@pytest.mark.parametrize("groups", ["every:4", [[0], [1, 2, 3, 4], [5, 6]]], ids=str)
def test_inference_path_without_gradients_equals_the_training_path(groups, padded):
    """Without gradients the torch backend reruns SDPA in every layer of a group instead of materialising
    P once: the same function, also under a padding mask (a prefill of left-padded prompts)."""
    torch.manual_seed(0)
    model = SAModel(SAConfig(**{**TINY, "n_layers": 7}, n_heads=4, n_kv_heads=2, sa_groups=groups))
    ids = torch.randint(0, TINY["vocab_size"], (2, 11))
    backend = model.backend
    q, k, v = torch.randn(2, 4, 11, 16), torch.randn(2, 2, 11, 16), torch.randn(2, 2, 11, 16)
    bias = None
    if padded:
        positions = torch.arange(11)
        allowed = (positions[None, :] <= positions[:, None]) & (
            positions[None, :] >= torch.tensor([[0], [4]])[:, :, None]
        )
        allowed |= torch.eye(11, dtype=torch.bool)
        bias = torch.zeros(2, 1, 11, 11).masked_fill(~allowed[:, None], float("-inf"))
    with torch.enable_grad():
        want_out, want_weights = backend.anchor(q, k, v, 2, bias)
        want_shared = backend.shared(want_weights, 1, v.flip(-1))
    with torch.no_grad():
        got_out, got_weights = backend.anchor(q, k, v, 2, bias)
        got_shared = backend.shared(got_weights, 1, v.flip(-1))
        logits = model(ids)
    assert want_weights.probs is not None and got_weights.probs is None
    torch.testing.assert_close(got_out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_shared, want_shared, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, model(ids).detach(), atol=1e-5, rtol=1e-5)


def test_shared_layers_have_no_query_key_parameters_and_feed_the_anchor():
    model = SAModel(SAConfig(**TINY, n_heads=4, sa_groups="every:4"))
    names = {name for name, _ in model.named_parameters()}
    assert "layers.0.attn.q_proj.weight" in names and "layers.0.attn.k_proj.weight" in names
    for layer in (1, 2, 3):
        assert not any(
            n.startswith(f"layers.{layer}.attn.") and ("q_proj" in n or "k_proj" in n) for n in names
        )
    dense = SAModel(SAConfig(**TINY, n_heads=4))
    assert dense.num_parameters() - model.num_parameters() == 3 * 2 * 64 * 64

    # A loss on the last shared layer's attention output alone must move the anchor's Q/K.
    ids = torch.randint(0, TINY["vocab_size"], (1, 16))
    captured = {}
    model.layers[3].attn.o_proj.register_forward_hook(lambda mod, inp, out: captured.update(out=out))
    model(ids)
    captured["out"].pow(2).sum().backward()
    assert model.layers[0].attn.q_proj.weight.grad.abs().sum() > 0
    assert model.layers[0].attn.k_proj.weight.grad.abs().sum() > 0


def test_residual_projections_use_scaled_init():
    torch.manual_seed(0)
    cfg = SAConfig(vocab_size=64, d_model=256, n_layers=8, n_heads=4, init_std=0.02)
    model = SAModel(cfg)
    scaled = 0.02 / math.sqrt(2 * cfg.n_layers)
    assert model.layers[0].attn.o_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert model.layers[5].mlp.down_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert model.layers[0].attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(model.norm.weight, torch.ones(256))


def test_sequence_longer_than_max_seq_len_is_a_clear_error():
    model = SAModel(SAConfig(**TINY, n_heads=4))
    with pytest.raises(ConfigError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_every_backend_a_config_may_name_is_implemented_or_resolved():
    from sa_train.attention import BACKENDS
    from sa_train.config import ATTENTION_BACKENDS

    assert {"auto", *BACKENDS} == set(ATTENTION_BACKENDS)
    with pytest.raises(ConfigError, match="use one of auto, torch, triton, reference"):
        SAConfig(attention_backend="cuda-magic")


def test_backend_is_resolved_once_at_build_and_on_moves_not_per_forward(caplog, monkeypatch):
    from sa_train import attention
    from sa_train import model as model_module

    attention.get_backend.cache_clear()
    with caplog.at_level(logging.DEBUG, logger="sa_train"):
        model = SAModel(SAConfig(**TINY, n_heads=4, sa_groups="every:2"))
        assert isinstance(model.backend, attention.TorchBackend)

        def no_lookup(*_args):
            raise AssertionError("forward resolved the backend")

        monkeypatch.setattr(model_module, "get_backend", no_lookup)
        model(torch.zeros(1, 8, dtype=torch.long))
        model(torch.zeros(1, 8, dtype=torch.long))
        monkeypatch.undo()
        model.to(torch.float64)
        assert isinstance(model.backend, attention.TorchBackend)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("DEBUG", "shared attention on cpu uses the torch backend")  # CUDA's choice is logged at INFO
    ]


def test_moving_the_model_re_resolves_its_backend(monkeypatch):
    from sa_train import model as model_module

    model = SAModel(SAConfig(**TINY, n_heads=4))
    seen = []
    monkeypatch.setattr(
        model_module, "get_backend", lambda name, device_type, head_dim: seen.append(device_type)
    )
    model.to("meta")
    assert seen == ["meta"]


def test_model_core_imports_torch_alone():
    """Export and evaluation code load SAModel without the training stack."""
    import subprocess
    import sys

    code = (
        "import sys, torch, sa_train\n"
        "sa_train.SAModel(sa_train.SAConfig())(torch.zeros(1, 4, dtype=torch.long))\n"
        "print(sorted(sys.modules))"
    )
    modules = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for heavy in ("lightning", "datasets", "tokenizers", "triton", "transformers"):
        assert f"'{heavy}'" not in modules, heavy


def test_greedy_generation_matches_hf_llama_generate():
    """A dense model decodes through the static cache token for token like HF's own generate."""
    torch.manual_seed(0)
    model = SAModel(SAConfig(**TINY, n_heads=4, n_kv_heads=2, init_std=0.3)).eval()
    hf = hf_llama_from(model)
    prompt = torch.randint(0, TINY["vocab_size"], (2, 7))
    want = hf.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0)
    assert model.generate(prompt, max_new_tokens=12) == want[:, 7:].tolist()
