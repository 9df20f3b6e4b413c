"""The training kernels' forward and backward (anchor and shared attention, alone and in groups) vs
the materialised-P references, run in the Triton interpreter on CPU. Also the helpers the other kernel
test modules (test_kernels_tiles, test_kernels_wiring) import: _qkv, the group runners, ATOL and RTOL.

Triton fixes interpreter-vs-compiler when it is first imported, so ``tests/conftest.py`` sets
TRITON_INTERPRET=1 before anything imports it; without the flag these CPU-tensor tests are skipped.
"""

import collections
import os
from collections.abc import Callable

import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "").strip().lower() not in {"1", "true", "on", "yes"}:
    pytest.skip(
        "the kernel tests need TRITON_INTERPRET=1 (tests/conftest.py sets it)", allow_module_level=True
    )
pytest.importorskip("triton")

import sa_train.kernels as sk

ATOL = 1e-4
RTOL = 1e-4


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


@pytest.mark.parametrize(("b", "h", "hkv", "t", "d"), SHAPES)
def test_anchor_and_shared_forward(b: int, h: int, hkv: int, t: int, d: int) -> None:
    q, k, v = _qkv(b, h, hkv, t, d)
    v2 = torch.randn_like(v)
    scale = d**-0.5
    out, lse, (link,) = sk.anchor_attention(q, k, v, scale, followers=1)
    ref_out, ref_lse = sk.reference_anchor(q, k, v, scale)
    assert out.shape == (b, h, t, d) and out.dtype == q.dtype
    assert lse.shape == (b, h, t) and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse, ref_lse, atol=ATOL, rtol=RTOL)
    shared = sk.shared_attention(q, k, lse, link, v2, scale)
    torch.testing.assert_close(shared, sk.reference_shared(q, k, ref_lse, v2, scale), atol=ATOL, rtol=RTOL)


def test_fp16_forward() -> None:
    q, k, v = (x.half() for x in _qkv(1, 2, 1, 17, 16))
    out, lse, _ = sk.anchor_attention(q, k, v, 0.25)
    ref_out, ref_lse = sk.reference_anchor(q, k, v, 0.25)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, ref_out, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-3)


Group = Callable[[torch.Tensor, torch.Tensor, list[torch.Tensor]], list[torch.Tensor]]


def _kernel_group(scale: float) -> Group:
    """Every layer's output: the anchor on vs[0], a shared layer on each of vs[1:], as in a model."""

    def run(q: torch.Tensor, k: torch.Tensor, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        out, lse, links = sk.anchor_attention(q, k, vs[0], scale, followers=len(vs) - 1)
        shared = [
            sk.shared_attention(q, k, lse, link, v, scale) for link, v in zip(links, vs[1:], strict=True)
        ]
        return [out, *shared]

    return run


def _reference_group(scale: float) -> Group:
    def run(q: torch.Tensor, k: torch.Tensor, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        out, lse = sk.reference_anchor(q, k, vs[0], scale)
        return [out, *(sk.reference_shared(q, k, lse, v, scale) for v in vs[1:])]

    return run


def _independent_group(scale: float) -> Group:
    """The definition: every layer recomputes softmax(qk^T·scale) itself."""

    def run(q: torch.Tensor, k: torch.Tensor, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [sk.reference_anchor(q, k, v, scale)[0] for v in vs]

    return run


def _group_loss(
    group: Group, q: torch.Tensor, k: torch.Tensor, vs: list[torch.Tensor], weights: list[torch.Tensor | None]
) -> torch.Tensor:
    """Each layer's output weighted into the loss; a layer whose weight is None is left out of it."""
    outs = group(q, k, vs)
    return sum((out.float() * w).sum() for out, w in zip(outs, weights, strict=True) if w is not None)


# Sizes: each interpreted program instance and tile costs real time, so every case has the fewest rows
# that still run its loops more than once. T = 130 at these 16-row tiles repeated the multi-tile case
# (T past 128 matters for the 128-row GPU tiles, run at T = 130 by test_gpu_tiles_in_interpreter and
# test_every_fallback_tile_shape_is_exact), so it is left out.
@pytest.mark.parametrize(
    ("b", "h", "hkv", "t", "d", "layers"),
    [
        (2, 4, 2, 17, 16, 3),  # two batches, GQA
        (1, 2, 1, 33, 32, 4),  # three 16-row tiles, the last one masked
        (1, 4, 1, 17, 16, 4),  # four query heads per kv head, three shared layers, two tiles
        (1, 2, 2, 32, 16, 3),  # T a multiple of the tile: nothing masked, off-diagonal tiles run
        (1, 2, 2, 17, 16, 1),  # an anchor alone
        (1, 2, 1, 1, 16, 3),  # a single key
        # The head sizes the GPU tiles are built for, over two tiles of the interpreter's 16 x 16 (the
        # tile the GPU lists end with, so test_every_fallback_tile_shape_is_exact leaves it to these).
        (1, 2, 1, 20, 64, 2),
        (1, 2, 2, 20, 128, 2),
    ],
)
def test_group_gradients(b: int, h: int, hkv: int, t: int, d: int, layers: int) -> None:
    q, k, v = _qkv(b, h, hkv, t, d, seed=1)
    gen = torch.Generator().manual_seed(2)
    vs = [v] + [torch.randn(v.shape, generator=gen) for _ in range(layers - 1)]
    weights: list[torch.Tensor | None] = [torch.randn(b, h, t, d, generator=gen) for _ in range(layers)]
    scale = d**-0.5
    leaves = [x.detach().requires_grad_() for x in (q, k, *vs)]

    def grads(group: Group) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(_group_loss(group, leaves[0], leaves[1], leaves[2:], weights), leaves)

    got = grads(_kernel_group(scale))
    via_reference = grads(_reference_group(scale))
    independent = grads(_independent_group(scale))
    names = ["q", "k"] + [f"v{i}" for i in range(layers)]
    for name, g, ref, ind in zip(names, got, via_reference, independent, strict=True):
        torch.testing.assert_close(g, ref, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"d{n}: {m}")
        torch.testing.assert_close(ref, ind, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"ref d{n}: {m}")


def test_group_gradients_with_layers_left_out_of_the_loss() -> None:
    """A shared layer outside the loss sends its anchor no link gradient; one in it still counts."""
    q, k, v = _qkv(1, 4, 2, 17, 16, seed=3)
    gen = torch.Generator().manual_seed(4)
    vs = [v] + [torch.randn(v.shape, generator=gen) for _ in range(3)]
    weights = [None, torch.randn(1, 4, 17, 16, generator=gen), None, torch.randn(1, 4, 17, 16, generator=gen)]
    leaves = [x.detach().requires_grad_() for x in (q, k, *vs)]
    got, want = (
        torch.autograd.grad(
            _group_loss(group(0.25), leaves[0], leaves[1], leaves[2:], weights), leaves, allow_unused=True
        )
        for group in (_kernel_group, _independent_group)
    )
    for name, g, ref in zip(["q", "k", "v0", "v1", "v2", "v3"], got, want, strict=True):
        if ref is None:
            assert g is None or g.abs().max() == 0, name
        else:
            torch.testing.assert_close(g, ref, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"d{n}: {m}")


def test_lse_gradient_is_exact() -> None:
    """lse is an ordinary output: a loss that reads it, beside the shared layer that does, gets its
    gradient."""
    q, k, v = _qkv(1, 2, 1, 17, 16, seed=9)
    v1 = torch.randn(v.shape, generator=torch.Generator().manual_seed(10))

    def kernels(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor, v1_: torch.Tensor) -> torch.Tensor:
        out, lse, (link,) = sk.anchor_attention(q_, k_, v_, 0.25, followers=1)
        return out.sum() + sk.shared_attention(q_, k_, lse, link, v1_, 0.25).sin().sum() + lse.cos().sum()

    def reference(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor, v1_: torch.Tensor) -> torch.Tensor:
        out, lse = sk.reference_anchor(q_, k_, v_, 0.25)
        return out.sum() + sk.reference_shared(q_, k_, lse, v1_, 0.25).sin().sum() + lse.cos().sum()

    got, want = (
        torch.autograd.grad(loss(*leaves), leaves)
        for loss in (kernels, reference)
        for leaves in [[x.detach().requires_grad_() for x in (q, k, v, v1)]]
    )
    for name, g, ref in zip(["q", "k", "v0", "v1"], got, want, strict=True):
        torch.testing.assert_close(g, ref, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"d{n}: {m}")


def test_shared_backward_leaves_q_and_k_to_the_anchor() -> None:
    """A shared layer's backward returns no dq, dk: its link's gradient is (dO, V), lse's −rowsum(dO∘O)."""
    q, k, v = _qkv(1, 4, 2, 17, 16, seed=11)
    _, lse, (link,) = sk.anchor_attention(q, k, v, 0.25, followers=1)
    v1 = torch.randn(v.shape, generator=torch.Generator().manual_seed(12))
    leaves = [x.detach().requires_grad_() for x in (q, k, lse, link.dout, link.value, v1)]
    out = sk.shared_attention(leaves[0], leaves[1], leaves[2], sk.Link(leaves[3], leaves[4]), leaves[5], 0.25)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(13))
    dq, dk, dlse, link_dout, link_value, dv = torch.autograd.grad(out, leaves, dout, allow_unused=True)
    assert dq is None and dk is None
    torch.testing.assert_close(dlse, -(dout * out).sum(-1), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(link_dout, dout)
    torch.testing.assert_close(link_value, v1)
    (want_dv,) = torch.autograd.grad(sk.reference_shared(q, k, lse, leaves[5], 0.25), leaves[5], dout)
    torch.testing.assert_close(dv, want_dv, atol=ATOL, rtol=RTOL)


class _LaunchCounter:
    """Stands in for a Triton kernel and counts its launches by the value of one constexpr argument."""

    def __init__(self, kernel: object, key: str) -> None:
        self.kernel, self.key, self.launches = kernel, key, collections.Counter()

    def __getitem__(self, grid: tuple) -> Callable:
        def launch(*args: object, **kwargs: object) -> object:
            self.launches[kwargs[self.key]] += 1
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_group_backward_computes_dq_and_dk_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A group of four: one dq and dk pass (the anchor's), a dv-only pass per shared layer."""
    from sa_train.kernels import backward

    kernel = _LaunchCounter(backward._backward_kernel, "WITH_DK")
    monkeypatch.setattr(backward, "_backward_kernel", kernel)
    q, k, v = (x.detach().requires_grad_() for x in _qkv(1, 2, 1, 17, 16, seed=14))
    vs = [v] + [torch.randn(v.shape).requires_grad_() for _ in range(3)]
    sum(out.sum() for out in _kernel_group(0.25)(q, k, vs)).backward()
    assert kernel.launches == {True: 1, False: 3}
