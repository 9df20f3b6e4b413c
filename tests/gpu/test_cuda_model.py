"""SAModel with the Triton backend on CUDA: against the reference backend, and compiled."""

import pytest
import torch

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")

from sa_train import SAConfig, SAModel  # noqa: E402

GROUPS = ["every:4", "dense:2,every:3", [[0], [1, 2], [3, 4, 5, 6, 7]]]
SHAPE = dict(
    vocab_size=512, d_model=256, n_layers=8, n_heads=4, n_kv_heads=2, max_seq_len=1024, init_std=0.05
)


def _models(groups: object, backends: list[str]) -> list[SAModel]:
    models = [SAModel(SAConfig(**SHAPE, sa_groups=groups, attention_backend=b)).cuda() for b in backends]
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict())
    return models


def _logits_and_grads(model: SAModel, ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, list]:
    with torch.autocast("cuda", dtype, enabled=dtype != torch.float32):
        logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1)[:-1], ids.flatten()[1:])
    return logits.float(), torch.autograd.grad(loss, list(model.parameters()))


def _ids(batch: int = 2, seq: int = 1000) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(1)
    return torch.randint(0, SHAPE["vocab_size"], (batch, seq), device="cuda", generator=gen)


@pytest.mark.parametrize("groups", GROUPS, ids=str)
def test_triton_backend_matches_reference_in_fp32(groups: object) -> None:
    torch.manual_seed(0)
    ids = _ids()
    (got, got_grads), (want, want_grads) = (
        _logits_and_grads(m, ids, torch.float32) for m in _models(groups, ["triton", "reference"])
    )
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("groups", GROUPS, ids=str)
def test_triton_backend_in_bf16_is_as_close_as_the_torch_backend(groups: object) -> None:
    """bf16 autocast: errors against the fp32 reference at most twice those of the torch backend."""
    torch.manual_seed(0)
    ids = _ids()
    triton, torch_path, reference = _models(groups, ["triton", "torch", "reference"])
    got, got_grads = _logits_and_grads(triton, ids, torch.bfloat16)
    yard, yard_grads = _logits_and_grads(torch_path, ids, torch.bfloat16)
    want, want_grads = _logits_and_grads(reference, ids, torch.float32)

    def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
        return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()

    assert rel(got, want) <= 2 * rel(yard, want) + 1e-3
    worst_ours = max(rel(g, w) for g, w in zip(got_grads, want_grads, strict=True))
    worst_torch = max(rel(y, w) for y, w in zip(yard_grads, want_grads, strict=True))
    assert worst_ours <= 2 * worst_torch + 1e-3, (worst_ours, worst_torch)


def test_compiled_model_has_no_graph_break() -> None:
    """The whole model compiled with fullgraph=True (Inductor, the Triton kernels as custom operators):
    a graph break anywhere raises; logits and gradients match the eager model."""
    torch.manual_seed(0)
    (model,) = _models("dense:2,every:3", ["triton"])
    ids = _ids(seq=512)
    compiled = torch.compile(model, fullgraph=True)
    want = model(ids)
    want_grads = torch.autograd.grad(want.sum(), list(model.parameters()))
    got = compiled(ids)
    got_grads = torch.autograd.grad(got.sum(), list(model.parameters()))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("groups", GROUPS[:2], ids=str)
def test_compiled_generation_equals_eager(groups: object) -> None:
    """The compiled step on CUDA (a CUDA graph replayed per token) gives the eager step's tokens."""
    torch._dynamo.reset()
    (model,) = _models(groups, ["triton"])
    prompts = _ids(batch=4, seq=100)
    want = model.eval().generate(prompts, max_new_tokens=32)
    assert model.generate(prompts, max_new_tokens=32, compile=True) == want
    assert model.generate(prompts, max_new_tokens=32, compile=True) == want  # the replayed graph
