"""Triton SA kernels vs the materialised-P references, run in the Triton interpreter on CPU.

Triton fixes interpreter-vs-compiler when it is first imported, so ``tests/conftest.py`` sets
TRITON_INTERPRET=1 before anything imports it; without the flag these CPU-tensor tests are skipped.
"""

import collections
import os
import runpy
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

from triton.runtime.errors import OutOfResources

import sa_train.kernels as sk
from sa_train.kernels.tiles import Tiles, candidates, first_fit, forced_tiles, gpu_tiles, launch

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


def _group_gradients_match_reference(
    b: int, h: int, hkv: int, t: int, d: int, layers: int, dtype: torch.dtype, tol: float
) -> tuple[torch.Tensor, ...]:
    """Outputs and every gradient of a group (anchor + shared layers) against the fp32 reference."""
    q, k, v = _qkv(b, h, hkv, t, d, seed=t)
    gen = torch.Generator().manual_seed(d + t)
    vs = [v] + [torch.randn(v.shape, generator=gen) for _ in range(layers - 1)]
    weights: list[torch.Tensor | None] = [torch.randn(b, h, t, d, generator=gen) for _ in range(layers)]
    scale = d**-0.5
    inputs = (q, k, *vs)

    def grads(leaves: list[torch.Tensor], group: Group) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(_group_loss(group, leaves[0], leaves[1], leaves[2:], weights), leaves)

    got = grads([x.detach().to(dtype).requires_grad_() for x in inputs], _kernel_group(scale))
    want = grads([x.detach().to(dtype).float().requires_grad_() for x in inputs], _reference_group(scale))
    names = ["q", "k"] + [f"v{i}" for i in range(layers)]
    for name, g, ref in zip(names, got, want, strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), ref, atol=tol, rtol=tol, msg=lambda m, n=name: f"d{n}: {m}")
    return want


# T = 1 (below), one partial tile, and T = 130: two 128-row query tiles, 64-wide key tiles on and off the
# diagonal, every tile width's masked tail (130 mod 16, 32, 64, 128 = 2) and backward programs past T.
# T = 2, 63 and 65 ran these same loops and masks (within or across one key-tile boundary, which T = 130
# crosses too) and are left out: each interpreted GPU-size tile costs seconds.
GPU_TILE_SEQ_LENS = [1, 17, 130]


@pytest.mark.parametrize("t", GPU_TILE_SEQ_LENS)
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_tiles_in_interpreter(t: int, d: int) -> None:
    """The GPU tile shapes (128-row query tiles, 32-row dk/dv query tiles, ...) run in the interpreter,
    for a group of three (the anchor's backward loops over two shared layers).

    T = 1 is the case that looked broken on the H200: a row that sees one key has P = 1, so
    dS = P∘(dP − rowsum(P∘dP)) = 0 and the exact dq, dk are zero; the kernels return rounding noise
    (~1e-6 here), which a relative error divided by that zero blows up to 1e5-1e9. The fp32 reference
    sums the layers' dP and their rowsums in different orders, so it is zero only to rounding too.
    """
    with gpu_tiles():
        want = _group_gradients_match_reference(1, 2, 1, t, d, 3, torch.float32, ATOL)
    if t == 1:
        assert want[0].abs().max() < 1e-6 and want[1].abs().max() < 1e-6


@pytest.mark.parametrize("t", [1, 65])
def test_gpu_tiles_in_interpreter_fp16(t: int) -> None:
    """Half precision at the GPU tiles. bf16 cannot be checked here: the interpreter keeps bfloat16 as
    uint16 and its tl.dot multiplies the bit patterns (triton-lang/triton#11584, unsupported upstream);
    tests/gpu covers bf16 on CUDA."""
    with gpu_tiles():
        _group_gradients_match_reference(1, 2, 1, t, 64, 3, torch.float16, 1e-2)


def test_every_tile_list_suits_its_kernel() -> None:
    """The loops need whole key tiles per query tile (forward, dq) or the reverse (dk/dv); every list
    ends with a configuration small enough for any CUDA GPU's default 48 KiB."""
    for head_dim in (16, 32, 64, 128, 256):
        for kernel in ("forward", "delta", "backward", "decode"):
            options = candidates(kernel, head_dim)
            assert len(set(options)) == len(options)
            for tiles in options:
                if kernel == "forward":
                    assert tiles.block_m % tiles.block_n == 0, (kernel, tiles)
                if kernel == "backward":
                    assert tiles.block_n % tiles.block_m == 0, (kernel, tiles)
            assert options[-1].block_m * options[-1].block_n <= 32 * 32


def _fake_launches(fits: Callable[[Tiles], bool]) -> tuple[list[Tiles], Callable[[Tiles], None]]:
    """A launch that refuses, as Triton does before running anything, tiles that do not fit."""
    tried: list[Tiles] = []

    def run(tiles: Tiles) -> None:
        tried.append(tiles)
        if not fits(tiles):
            raise OutOfResources(262144, 232448, "shared memory")

    return tried, run


def test_launch_falls_back_to_the_first_tiles_that_fit_and_keeps_them() -> None:
    options = candidates("forward", 128)
    key = ("forward", 0, torch.float32, 128, ("test-fallback",))
    tried, run = _fake_launches(lambda tiles: tiles.num_stages < 3 and tiles.block_n < 64)
    first_fit(key, options, run)
    assert tried == [options[0], options[1], options[2]]  # 128x64x3, 128x64x2 refused; 128x32x2 runs
    tried.clear()
    first_fit(key, options, run)
    assert tried == [options[2]]  # the next launch goes straight to the tiles that fit


def test_launch_that_fits_nothing_says_what_to_do() -> None:
    key = ("backward", 0, torch.float32, 256, ("test-nothing-fits",))
    _, run = _fake_launches(lambda tiles: False)
    with pytest.raises(RuntimeError, match="attention_backend: torch"):
        first_fit(key, candidates("backward", 256), run)


def test_other_launch_errors_are_not_taken_for_a_full_device() -> None:
    def run(tiles: Tiles) -> None:
        raise ValueError("a bug in the launch")

    with pytest.raises(ValueError, match="a bug"):
        first_fit(("backward", 0, torch.float32, 64, ("test-bug",)), candidates("backward", 64), run)


def test_tiles_off_cuda_are_tiny_unless_gpu_tiles_asks() -> None:
    seen: list[Tiles] = []
    q = torch.zeros(1, 1, 4, 128)
    launch("forward", q, {}, seen.append)
    with gpu_tiles():
        launch("forward", q, {}, seen.append)
    with gpu_tiles(rank=99):
        launch("forward", q, {}, seen.append)
    assert seen == [Tiles(16, 16, 1, 1), candidates("forward", 128)[0], candidates("forward", 128)[-1]]


def test_forced_tiles_win_over_the_lists_and_stay_exact() -> None:
    seen: list[Tiles] = []
    forced = Tiles(16, 32, 8, 2)
    with gpu_tiles(), forced_tiles(backward=forced):
        launch("backward", torch.zeros(1, 1, 4, 64), {}, seen.append)
        launch("forward", torch.zeros(1, 1, 4, 64), {}, seen.append)
        # T = 33: two 32-key programs, the second all masked tail but one row (a 16-row query tile of
        # them past T): the forced tiles' every loop and mask at half the interpreted work of T = 65.
        _group_gradients_match_reference(1, 2, 1, 33, 64, 3, torch.float32, ATOL)
    assert seen == [forced, candidates("forward", 64)[0]]


def _distinct_shapes(kernel: str, head_dim: int) -> list[Tiles]:
    """The first configuration of each (block_m, block_n) in a kernel's list, in list order.

    The interpreter ignores num_warps and num_stages (launch options only a compiled kernel reads), so
    configurations that differ in those alone run the same code here."""
    shapes: dict[tuple[int, int], Tiles] = {}
    for tiles in candidates(kernel, head_dim):
        shapes.setdefault((tiles.block_m, tiles.block_n), tiles)
    return list(shapes.values())


@pytest.mark.parametrize("d", [64, 128])
def test_every_fallback_tile_shape_is_exact(d: int) -> None:
    """Each tile shape a GPU may fall back to (fp32, less shared memory) computes the same group forward
    and backward: its loop bounds and masks run in the interpreter at T = 130 (past one 128-row tile,
    not a multiple of any tile).

    Each kernel falls back on its own (``first_fit`` keys by kernel), so the forward's and the
    backward's shapes need not come in the list's rank order: they are paired, the shorter list filled
    out with its rank-0 tiles, to run each shape once. Left out as checked elsewhere: rank 0's shapes
    (test_gpu_tiles_in_interpreter, at T = 130 too) and the 16 x 16 every list ends with (the
    interpreter's own tiles, so every other test here; D = 64 and 128 over two tiles in
    test_group_gradients). The delta kernel has one configuration, run under gpu_tiles()."""
    rank0 = {kernel: candidates(kernel, d)[0] for kernel in ("forward", "backward")}
    new = {
        kernel: [
            tiles
            for tiles in _distinct_shapes(kernel, d)
            if (tiles.block_m, tiles.block_n) not in {(first.block_m, first.block_n), (16, 16)}
        ]
        for kernel, first in rank0.items()
    }
    assert new["forward"] and new["backward"]
    forward = new["forward"] + [rank0["forward"]] * (len(new["backward"]) - len(new["forward"]))
    backward = new["backward"] + [rank0["backward"]] * (len(new["forward"]) - len(new["backward"]))
    for pair in zip(forward, backward, strict=True):
        with gpu_tiles(), forced_tiles(forward=pair[0], backward=pair[1]):
            _group_gradients_match_reference(1, 2, 1, 130, d, 3, torch.float32, ATOL)


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


@pytest.mark.parametrize(
    ("b", "h", "hkv", "t", "d", "layers"),
    [(2, 4, 2, 17, 16, 3), (1, 2, 1, 1, 16, 2), (1, 4, 4, 33, 32, 1)],
)
def test_decode_group_partial(b: int, h: int, hkv: int, t: int, d: int, layers: int) -> None:
    _decode_matches_reference(b, h, hkv, t, d, layers)


@pytest.mark.parametrize("d", [64, 128])
def test_decode_at_every_gpu_tile_shape(d: int) -> None:
    """Each distinct (block_m, block_n) of the decode list once (see _distinct_shapes)."""
    for tiles in _distinct_shapes("decode", d):
        with gpu_tiles(), forced_tiles(decode=tiles):
            _decode_matches_reference(1, 8, 2, 130, d, 2)


def _decode_matches_reference(b: int, h: int, hkv: int, t: int, d: int, layers: int) -> None:
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
