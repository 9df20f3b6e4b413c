"""Launch tiles per kernel: the fastest known that the device's shared memory holds; tiny in the interpreter.

On CUDA each kernel has a list of configurations, fastest known first: the tiles the kernels were run
with in bf16 on an H200 (``scripts/bench_kernels.py``), then ones that trade pipeline depth, then tile
width, for memory (not measured against each other). The first one that launches wins: Triton's
compiler knows what a configuration needs and refuses a launch that needs more shared memory than the
device has (``OutOfResources``, raised before anything runs), so the launch falls through to the next.
The choice is made once per device, dtype, head size and kernel variant, and kept.

Why the compiler decides rather than a formula: the H200's first run failed with fp32 at D = 128,
where the forward's bf16 tiles needed 262144 bytes under Triton 3.6, over the 232448 the hardware
allows; Triton 3.9 compiles the same configuration in 229888. A formula fitted to one version is wrong
for the other. ``scripts/tile_memory.py`` compiles every list for a GPU on any machine (no GPU needed)
and prints what each configuration needs; a test checks with it that the bf16 tiles still fit an H200.

The interpreter runs anywhere (CPU tensors) and each interpreted tl.dot costs real time, so off CUDA
the kernels use 16 x 16 tiles, unless ``gpu_tiles()`` asks for a GPU configuration (tests of the
GPU tile shapes, so every configuration a GPU may fall back to is checked for exactness too).
"""

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from triton.runtime.errors import OutOfResources

log = logging.getLogger(__name__)

INTERPRETER_BLOCK = 16


@dataclass(frozen=True)
class Tiles:
    """Launch parameters; block_m tiles queries (query heads for decode), block_n tiles keys."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def candidates(kernel: str, head_dim: int) -> tuple[Tiles, ...]:
    """Fastest known first.

    forward: block_m query rows stream over block_n-wide key tiles (block_m % block_n == 0). backward:
    block_n rows of keys and of queries per program, streaming block_m-wide tiles of the other side
    (block_n % block_m == 0); the tiles of the per-layer dk/dv and dq kernels it replaced, which were
    timed on an H200 (32 x 128 and 128 x 32 at D = 64). At those tiles the group-fused backward spills
    registers: ptxas for sm_90 reports 4372 bytes of spill stores at D = 64 and 4724 at D = 128, where
    the per-layer kernels spilled 760 and 488; 8 warps at the same tiles (the same warps per SM) spill
    664 and 1428. Not yet timed: ``scripts/bench_kernels.py --tiles backward=32,128,8,3`` times it
    beside the default in one run.

    delta only reads block_m: it holds an O and a dO tile in fp32 registers, 128 x 64 of them without
    a spill (ptxas, sm_90; 128 x 128 spilled 60 bytes), so the tile has 8192 elements."""
    if kernel == "delta":
        return (Tiles(max(16, min(128, 8192 // head_dim)), 1, 4, 1),)
    wide = head_dim > 64
    warps = 8 if wide else 4  # a 128-row forward tile at D = 128 spreads its accumulator over 8 warps
    backward = (
        [(32, 64, 4, 3), (32, 64, 4, 2)] if wide else [(32, 128, 4, 3), (32, 128, 4, 2), (32, 64, 4, 2)]
    )
    table = {
        "forward": [(128, 64, warps, 3), (128, 64, warps, 2), (128, 32, warps, 2), (64, 32, 4, 2)],
        "backward": backward,
        "decode": [(16, 64, 4, 3), (16, 64, 4, 2)],
    }[kernel]
    smallest = [(32, 32, 4, 2), (32, 32, 4, 1), (16, 16, 4, 1)]
    return tuple(Tiles(*t) for t in table + smallest)


_INTERPRETER_TILES = Tiles(INTERPRETER_BLOCK, INTERPRETER_BLOCK, 1, 1)
_GPU_TILES_RANK: ContextVar[int | None] = ContextVar("sa_train_gpu_tiles_rank", default=None)
_FIRST_FIT: dict[tuple[Any, ...], int] = {}
_FORCED: ContextVar[dict[str, Tiles] | None] = ContextVar("sa_train_forced_tiles", default=None)


@contextmanager
def gpu_tiles(rank: int = 0) -> Iterator[None]:
    """Off CUDA (the Triton interpreter), launch each kernel with its ``rank``-th GPU configuration
    (the last one where its list is shorter): 0 is what an H200 runs in bf16, higher ranks are what
    a device with less shared memory, or fp32, falls back to.

    Tests use it to run the exact tile shapes (and so the loop bounds and masks) a GPU runs; each
    interpreted tl.dot then costs real time, so keep the shapes small.
    """
    token = _GPU_TILES_RANK.set(rank)
    try:
        yield
    finally:
        _GPU_TILES_RANK.reset(token)


@contextmanager
def forced_tiles(**tiles: Tiles) -> Iterator[None]:
    """Launch the named kernels (``forward``, ``delta``, ``backward``, ``decode``) with these tiles
    whatever the device, with no fall-back: for timing a configuration against the lists' choice
    (``scripts/bench_kernels.py --tiles``)."""
    token = _FORCED.set({**(_FORCED.get() or {}), **tiles})
    try:
        yield
    finally:
        _FORCED.reset(token)


def launch(
    kernel: str, tensor: torch.Tensor, variant: dict[str, Any], run: Callable[[Tiles], object]
) -> None:
    """Call ``run(tiles)``, which launches ``kernel`` for ``tensor``'s device, dtype and last dimension.

    ``variant`` holds the launch's other compile-time constants (they change what a configuration
    needs, e.g. the backward kernel without dq and dk needs half the memory), so each variant is fitted
    apart.
    """
    forced = (_FORCED.get() or {}).get(kernel)
    if forced is not None:
        run(forced)
        return
    head_dim = tensor.shape[-1]
    if tensor.device.type != "cuda":
        rank = _GPU_TILES_RANK.get()
        if rank is None:
            run(_INTERPRETER_TILES)
        else:
            options = candidates(kernel, head_dim)
            run(options[min(rank, len(options) - 1)])
        return
    key = (kernel, tensor.device.index, tensor.dtype, head_dim, tuple(sorted(variant.items())))
    first_fit(key, candidates(kernel, head_dim), run)


def first_fit(key: tuple[Any, ...], options: tuple[Tiles, ...], run: Callable[[Tiles], object]) -> None:
    """Launch with the first of ``options`` that the device can run, starting from the one found for
    ``key`` before; remember it."""
    for rank in range(_FIRST_FIT.get(key, 0), len(options)):
        try:
            run(options[rank])
        except OutOfResources as err:
            log.info("%s: %s does not fit (%s); trying the next tiles", key[0], options[rank], err)
            continue
        _FIRST_FIT[key] = rank
        return
    kernel, _, dtype, head_dim, _ = key
    raise RuntimeError(
        f"no {kernel} kernel tiles fit this GPU's shared memory for {dtype} at head_dim {head_dim}: even "
        f"{options[-1]} needs more than it has. Set model.config.attention_backend: torch."
    )
