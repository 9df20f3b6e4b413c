"""Triton SA kernels vs the materialised-P references, run in the Triton interpreter on CPU.

Triton fixes interpreter-vs-compiler when it is first imported, so ``tests/conftest.py`` sets
TRITON_INTERPRET=1 before anything imports it; without the flag these CPU-tensor tests are skipped.
"""

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "").strip().lower() not in {"1", "true", "on", "yes"}:
    pytest.skip(
        "the kernel tests need TRITON_INTERPRET=1 (tests/conftest.py sets it)", allow_module_level=True
    )
pytest.importorskip("triton")

import sa_train.kernels as sk

REPO_ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-4
RTOL = 1e-4


def _subprocess_env(**extra: str) -> dict[str, str]:
    """The child must import sa_train from this checkout whether or not it is installed."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def _qkv(b: int, h: int, hkv: int, t: int, d: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, k, v as a model makes them: (B, T, heads, D) projections viewed as (B, heads, T, D)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, d, generator=gen).transpose(1, 2)
    k = torch.randn(b, t, hkv, d, generator=gen).transpose(1, 2)
    v = torch.randn(b, t, hkv, d, generator=gen).transpose(1, 2)
    return q, k, v


SHAPES = [  # (B, H, Hkv, T, D)
    (1, 2, 2, 1, 16),
    (2, 4, 2, 17, 16),
    (1, 4, 1, 33, 32),
    (1, 2, 2, 64, 16),
    (1, 2, 1, 20, 64),  # the head sizes the GPU tiles are built for
    (1, 2, 2, 9, 128),
]


def test_is_available_follows_interpreter_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert sk.is_available()
    monkeypatch.delenv("TRITON_INTERPRET")
    assert sk.is_available() == torch.cuda.is_available()


@pytest.mark.parametrize(("b", "h", "hkv", "t", "d"), SHAPES)
def test_anchor_and_shared_forward(b: int, h: int, hkv: int, t: int, d: int) -> None:
    q, k, v = _qkv(b, h, hkv, t, d)
    v2 = torch.randn_like(v)
    scale = d**-0.5
    out, lse = sk.anchor_attention(q, k, v, scale)
    ref_out, ref_lse = sk.reference_anchor(q, k, v, scale)
    assert out.shape == (b, h, t, d) and out.dtype == q.dtype
    assert lse.shape == (b, h, t) and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse, ref_lse, atol=ATOL, rtol=RTOL)
    shared = sk.shared_attention(q, k, lse, v2, scale)
    torch.testing.assert_close(shared, sk.reference_shared(q, k, ref_lse, v2, scale), atol=ATOL, rtol=RTOL)


def test_fp16_forward() -> None:
    q, k, v = (x.half() for x in _qkv(1, 2, 1, 17, 16))
    out, lse = sk.anchor_attention(q, k, v, 0.25)
    ref_out, ref_lse = sk.reference_anchor(q, k, v, 0.25)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, ref_out, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-3)


Anchor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Shared = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _group_loss(
    attend_anchor: Anchor,
    attend_shared: Shared,
    q: torch.Tensor,
    k: torch.Tensor,
    vs: list[torch.Tensor],
    weights: list[torch.Tensor],
) -> torch.Tensor:
    """Anchor on vs[0], shared layers on vs[1:], every output in the loss, as in a real group."""
    out, lse = attend_anchor(q, k, vs[0])
    loss = (out.float() * weights[0]).sum()
    for v, w in zip(vs[1:], weights[1:], strict=True):
        loss = loss + (attend_shared(q, k, lse, v).float() * w).sum()
    return loss


@pytest.mark.parametrize(
    ("b", "h", "hkv", "t", "d", "layers"),
    [
        (2, 4, 2, 17, 16, 3),
        (1, 2, 1, 33, 32, 4),
        (1, 2, 2, 64, 16, 3),
        (1, 2, 1, 20, 64, 2),
        (1, 2, 2, 9, 128, 2),
    ],
)
def test_group_gradients(b: int, h: int, hkv: int, t: int, d: int, layers: int) -> None:
    q, k, v = _qkv(b, h, hkv, t, d, seed=1)
    gen = torch.Generator().manual_seed(2)
    vs = [v] + [torch.randn(v.shape, generator=gen) for _ in range(layers - 1)]
    weights = [torch.randn(b, h, t, d, generator=gen) for _ in range(layers)]
    scale = d**-0.5
    leaves = [x.detach().requires_grad_() for x in (q, k, *vs)]

    def grads(attend_anchor: Anchor, attend_shared: Shared) -> tuple[torch.Tensor, ...]:
        loss = _group_loss(attend_anchor, attend_shared, leaves[0], leaves[1], leaves[2:], weights)
        return torch.autograd.grad(loss, leaves)

    got = grads(
        lambda q_, k_, v_: sk.anchor_attention(q_, k_, v_, scale),
        lambda q_, k_, lse, v_: sk.shared_attention(q_, k_, lse, v_, scale),
    )
    via_reference = grads(
        lambda q_, k_, v_: sk.reference_anchor(q_, k_, v_, scale),
        lambda q_, k_, lse, v_: sk.reference_shared(q_, k_, lse, v_, scale),
    )
    independent = grads(
        lambda q_, k_, v_: sk.reference_anchor(q_, k_, v_, scale),
        lambda q_, k_, _lse, v_: sk.reference_anchor(q_, k_, v_, scale)[0],
    )
    names = ["q", "k"] + [f"v{i}" for i in range(layers)]
    for name, g, ref, ind in zip(names, got, via_reference, independent, strict=True):
        torch.testing.assert_close(g, ref, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"d{n}: {m}")
        torch.testing.assert_close(ref, ind, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"ref d{n}: {m}")


def test_lse_carries_no_gradient() -> None:
    q, k, v = (x.detach().requires_grad_() for x in _qkv(1, 2, 1, 17, 16))
    _, lse = sk.anchor_attention(q, k, v, 0.25)
    assert not lse.requires_grad
    lse_leaf = lse.detach().requires_grad_()
    shared = sk.shared_attention(q, k, lse_leaf, v, 0.25)
    gq, glse = torch.autograd.grad(shared.sum(), (q, lse_leaf), allow_unused=True)
    assert gq is not None and glse is None


@pytest.mark.parametrize(
    ("b", "h", "hkv", "t", "d", "layers"),
    [(2, 4, 2, 17, 16, 3), (1, 2, 1, 1, 16, 2), (1, 4, 4, 33, 32, 1)],
)
def test_decode_group_partial(b: int, h: int, hkv: int, t: int, d: int, layers: int) -> None:
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(b, h, 1, d, generator=gen)
    k_cache = torch.randn(b, hkv, t, d, generator=gen)
    v_full = torch.randn(layers, b, hkv, t, d, generator=gen)
    scale = d**-0.5
    partials, p_last = sk.decode_group_partial(q, k_cache, v_full[:, :, :, :-1], scale)
    ref_partials, ref_p_last = sk.reference_decode_group_partial(q, k_cache, v_full[:, :, :, :-1], scale)
    assert partials.shape == (layers, b, h, d) and p_last.shape == (b, h)
    torch.testing.assert_close(partials, ref_partials, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(p_last, ref_p_last, atol=ATOL, rtol=RTOL)
    for layer in range(layers):
        out = sk.decode_finish(partials[layer], p_last, v_full[layer, :, :, -1:])
        k_rep = k_cache.repeat_interleave(h // hkv, dim=1)
        v_rep = v_full[layer].repeat_interleave(h // hkv, dim=1)
        expected = torch.softmax(q @ k_rep.transpose(-1, -2) * scale, dim=-1) @ v_rep
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)


def test_rejects_bad_shapes() -> None:
    q, k, v = _qkv(1, 3, 2, 8, 16)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        sk.anchor_attention(q, k, v, 0.25)
    q, k, v = _qkv(1, 2, 2, 8, 24)
    with pytest.raises(ValueError, match="power of two"):
        sk.anchor_attention(q, k, v, 0.25)


def test_import_without_triton() -> None:
    """Blocking the triton import must leave the package importable and the entry points explicit."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import sa_train.kernels as sk\n"
        "assert not sk.is_available()\n"
        "try:\n"
        "    sk.anchor_attention(None, None, None, 1.0)\n"
        "except RuntimeError as err:\n"
        "    assert 'triton' in str(err)\n"
        "else:\n"
        "    raise AssertionError('no RuntimeError')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_subprocess_env(), check=False
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("groups", [[[0], [1, 2, 3]], "every:2"], ids=["dense-then-3", "pairs"])
def test_model_with_triton_backend_matches_reference(groups) -> None:
    """The kernels wired into SAModel: logits and every parameter gradient equal the materialised path."""
    from sa_train import SAConfig, SAModel

    torch.manual_seed(0)
    shape = dict(vocab_size=50, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=32, init_std=0.1)
    triton_model = SAModel(SAConfig(**shape, sa_groups=groups, attention_backend="triton"))
    reference = SAModel(SAConfig(**shape, sa_groups=groups, attention_backend="reference"))
    reference.load_state_dict(triton_model.state_dict())
    ids = torch.randint(0, 50, (2, 17))
    probe = torch.randn(2, 17, 50)

    results = []
    for model in (triton_model, reference):
        logits = model(ids)
        results.append((logits, torch.autograd.grad((logits * probe).sum(), list(model.parameters()))))
    (got, got_grads), (want, want_grads) = results
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got_grad, want_grad, atol=ATOL, rtol=1e-3)


def test_triton_backend_refuses_a_head_size_the_kernels_cannot_tile() -> None:
    from sa_train import SAConfig, SAModel
    from sa_train.errors import ConfigError

    with pytest.raises(ConfigError, match=r"power of two >= 16 \(here 24\)"):
        SAModel(SAConfig(vocab_size=50, d_model=48, n_layers=2, n_heads=2, attention_backend="triton"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the benchmark really measures")
def test_kernel_benchmark_without_cuda_says_so_and_measures_nothing() -> None:
    script = REPO_ROOT / "scripts" / "bench_kernels.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "no CUDA device, nothing measured" in result.stdout
    assert "TFLOP" not in result.stdout
