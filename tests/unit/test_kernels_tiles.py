"""Tile sizes of the Triton kernels, run in the Triton interpreter on CPU: every tile list suits its
kernel, launches fall back to the first tiles that fit, the GPU tile shapes (and each one a GPU may fall
back to, or that is forced) compute the group forward and backward exactly; and the decode kernel, at
the interpreter's tiles and at each GPU tile shape.

Triton fixes interpreter-vs-compiler when it is first imported, so ``tests/conftest.py`` sets
TRITON_INTERPRET=1 before anything imports it; without the flag these CPU-tensor tests are skipped.
"""

from collections.abc import Callable

import pytest
import torch

# First: that module skips itself, and so this one, without TRITON_INTERPRET=1 or Triton.
from test_kernels_autograd import ATOL, RTOL, Group, _group_loss, _kernel_group, _qkv, _reference_group
from triton.runtime.errors import OutOfResources

import sa_train.kernels as sk
from sa_train.kernels.tiles import Tiles, candidates, first_fit, forced_tiles, gpu_tiles, launch


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
