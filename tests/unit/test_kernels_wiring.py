"""The Triton kernels wired into torch and sa_train, run in the Triton interpreter on CPU: availability
and the package without Triton, the entry points' shape checks, the operators' registration (opcheck) and
torch.compile of a group, SAModel's triton backend vs the reference, and the GPU benchmark scripts
without CUDA.

Triton fixes interpreter-vs-compiler when it is first imported, so ``tests/conftest.py`` sets
TRITON_INTERPRET=1 before anything imports it; without the flag these CPU-tensor tests are skipped.
"""

import os
import runpy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# First: that module skips itself, and so this one, without TRITON_INTERPRET=1 or Triton.
from test_kernels_autograd import ATOL, RTOL, _qkv

import sa_train.kernels as sk

REPO_ROOT = Path(__file__).resolve().parents[2]


def _subprocess_env(**extra: str) -> dict[str, str]:
    """The child must import sa_train from this checkout whether or not it is installed."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def test_is_available_follows_interpreter_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert sk.is_available()
    monkeypatch.delenv("TRITON_INTERPRET")
    assert sk.is_available() == torch.cuda.is_available()


GroupFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _compile_case(
    compile_op: Callable[[Callable], Callable],
) -> tuple[GroupFn, list[torch.Tensor], torch.Tensor]:
    """A group of three layers between element-wise ops, as a block would surround them, with the lse in
    the loss too; ``compile_op`` wraps each kernel call (the identity, or one graph per call)."""
    anchor = compile_op(lambda q, k, v: sk.anchor_attention(q, k, v, 0.25, followers=2))
    shared = compile_op(lambda q, k, lse, link, v: sk.shared_attention(q, k, lse, link, v, 0.25))

    def group(q, k, v0, v1, v2, w):
        out, lse, links = anchor(q, k, v0)
        o1 = shared(q, k, lse, links[0], v1)
        o2 = shared(q, k, lse, links[1], v2)
        return ((out + 2 * o1 + o2.sin()) * w).sum() + lse.cos().sum(), lse

    # One partial 16-row tile (T = 5): the tile loops are the eager tests' concern, and what is checked
    # here, the graphs, does not depend on T; T differs from the other sizes (and from 0 and 1), so
    # dynamic=True keeps it a symbol of its own.
    q, k, v0 = _qkv(1, 4, 2, 5, 16, seed=5)
    gen = torch.Generator().manual_seed(6)
    v1, v2 = (torch.randn(v0.shape, generator=gen) for _ in range(2))
    leaves = [x.detach().requires_grad_() for x in (q, k, v0, v1, v2)]
    return group, leaves, torch.randn(q.shape, generator=gen)


def _check_compiled_group(backend: str, dynamic: bool, per_op: bool = False) -> None:
    """The whole group as one graph, or (``per_op``) each kernel call as its own graph, so that the
    links cross graph boundaries as they do when a model compiles block by block."""
    group, leaves, w = _compile_case(lambda fn: fn)
    want_loss, want_lse = group(*leaves, w)
    want = torch.autograd.grad(want_loss, leaves)
    torch._dynamo.reset()
    if per_op:
        group, _, _ = _compile_case(
            lambda fn: torch.compile(fn, fullgraph=True, backend=backend, dynamic=dynamic)
        )
    else:
        group = torch.compile(group, fullgraph=True, backend=backend, dynamic=dynamic)
    loss, lse = group(*leaves, w)
    got = torch.autograd.grad(loss, leaves)
    torch.testing.assert_close(loss, want_loss, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse, want_lse, atol=ATOL, rtol=RTOL)
    for name, g, ref in zip(["q", "k", "v0", "v1", "v2"], got, want, strict=True):
        torch.testing.assert_close(g, ref, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compiled_group_has_no_graph_break_and_matches_eager(dynamic: bool) -> None:
    """fullgraph=True fails on any graph break; aot_eager runs Dynamo and AOTAutograd (forward and
    backward graphs through the fake implementations) and then the real operators."""
    _check_compiled_group("aot_eager", dynamic)


def test_compiled_per_op_passes_links_between_graphs() -> None:
    _check_compiled_group("aot_eager", dynamic=False, per_op=True)


@pytest.mark.slow
def test_compiled_group_with_inductor() -> None:
    """Inductor on CPU (needs a C++ compiler, ~20 s) calls the operators as extern kernels."""
    _check_compiled_group("inductor", dynamic=False)


def _opcheck_cases() -> dict[str, tuple[str, tuple]]:
    """Case name: (operator, arguments)."""
    q, k, v = _qkv(1, 2, 1, 5, 16, seed=7)
    out, lse = sk.reference_anchor(q, k, v, 0.25)
    leaf = [x.clone().requires_grad_() for x in (q, k, v, lse)]
    gen = torch.Generator().manual_seed(8)
    dout, dlse = torch.randn(out.shape, generator=gen), torch.randn(lse.shape, generator=gen)
    follower_v = [torch.randn(v.shape, generator=gen) for _ in range(2)]
    follower_dout = [torch.randn(q.shape, generator=gen) for _ in range(2)]
    links = (torch.zeros(q.shape, requires_grad=True), torch.zeros(v.shape, requires_grad=True))
    return {
        "anchor_forward": ("anchor_forward", (*leaf[:3], 0.25, 2)),
        "shared_forward": ("shared_forward", (leaf[0], leaf[1], leaf[3], *links, leaf[2], 0.25)),
        "anchor_backward": (
            "anchor_backward",
            (q, k, v, out, dout, lse, dlse, follower_v, follower_dout, 0.25),
        ),
        "anchor_backward_alone": ("anchor_backward", (q, k, v, out, dout, lse, None, [], [], 0.25)),
        "shared_backward": ("shared_backward", (q, k, v, out, dout, lse, 0.25)),
        "decode_group_partial": (
            "decode_group_partial",
            (
                torch.randn(1, 2, 1, 16, generator=gen),
                torch.randn(1, 1, 5, 16, generator=gen),
                torch.randn(2, 1, 1, 4, 16, generator=gen),
                0.25,
            ),
        ),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_operator_registration_passes_opcheck(case: str) -> None:
    """Schema, fake implementation (shapes, dtypes, strides), autograd registration, AOT dispatch."""
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.sa_train, name), args)


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


@pytest.mark.parametrize(
    ("groups", "kv_heads", "checkpointed"),
    [([[0], [1, 2, 3]], 2, False), ("every:2", 2, False), ("every:4", 1, True)],
    ids=["dense-then-3", "pairs", "four-mqa-checkpointed"],
)
def test_model_with_triton_backend_matches_reference(groups, kv_heads: int, checkpointed: bool) -> None:
    """The kernels wired into SAModel: logits and every parameter gradient equal the materialised path,
    also when each group's activations are recomputed in backward (the links are made anew)."""
    from sa_train import SAConfig, SAModel

    torch.manual_seed(0)
    shape = dict(vocab_size=50, d_model=64, n_layers=4, n_heads=4, max_seq_len=32, init_std=0.1)
    shape["n_kv_heads"] = kv_heads
    triton_model = SAModel(SAConfig(**shape, sa_groups=groups, attention_backend="triton"))
    triton_model.checkpoint_groups = checkpointed
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


def _run_script_without_cuda(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> str:
    """The script run as ``python scripts/NAME`` runs it, in this process: what is checked is what it
    does without CUDA, not the process boundary, and a fresh interpreter costs seconds of imports."""
    script = REPO_ROOT / "scripts" / name
    monkeypatch.setattr(sys, "argv", [str(script)])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(script), run_name="__main__")
    assert exited.value.code == 0
    return capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the benchmark really measures")
@pytest.mark.parametrize(
    ("script", "figure"), [("bench_kernels.py", "TFLOP"), ("bench_gpu_training.py", "tokens/s")]
)
def test_gpu_benchmark_without_cuda_says_so_and_measures_nothing(
    script: str, figure: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _run_script_without_cuda(script, monkeypatch, capsys)
    assert "no CUDA device, nothing measured" in out
    assert figure not in out
