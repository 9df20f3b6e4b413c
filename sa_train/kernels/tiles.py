"""Launch tiles per kernel, chosen to fit the device's shared memory; tiny in the Triton interpreter.

On CUDA each kernel has a list of configurations, fastest known first: the tiles the kernels were run
with in bf16 on an H200 (``scripts/bench_kernels.py``), then ones that trade pipeline depth, then tile
width, for memory (not yet measured against each other). The first whose shared-memory need fits the
device's opt-in budget per block wins; the choice is made once per (device, dtype, head size) and
cached. The H200's first run showed why: fp32 at D = 128 with the bf16 tiles needs 262144 bytes in the
forward kernel, over the 232448 the hardware allows.

The interpreter runs anywhere (CPU tensors) and each interpreted tl.dot costs real time, so off CUDA the
kernels use 16 x 16 tiles, unless ``gpu_tiles()`` asks for the GPU choice (tests of the GPU tile shapes).
"""

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

INTERPRETER_BLOCK = 16
H200_SHARED_MEMORY = 232448  # bytes per block (opt-in) on H100/H200


@dataclass(frozen=True)
class Tiles:
    """Launch parameters; block_m tiles queries (query heads for decode), block_n tiles keys."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class KernelTiles:
    """One choice per kernel. forward also sizes the delta pre-pass of the backward."""

    forward: Tiles
    dq: Tiles
    dkdv: Tiles
    decode: Tiles


def shared_memory_bytes(kernel: str, tiles: Tiles, head_dim: int, element_size: int) -> int:
    """Shared memory a kernel's launch needs: its loop-invariant operand tiles plus one buffer per
    pipeline stage of the tiles its loop streams, plus the fp32 score tile for one layout conversion.

    The stream-and-resident part reproduces what Triton reported on the H200 for fp32, D = 128 with the
    bf16 forward tiles (128 x 64, 3 stages): 128·128·4 + 3·2·64·128·4 = 262144 bytes. The backward
    kernels also read one shared layer's dO_l and V_l tiles per step of their loop over a group's
    shared layers; those are counted as streamed too, an estimate not yet checked against Triton.
    """
    m, n, d, stages = tiles.block_m, tiles.block_n, head_dim, tiles.num_stages
    resident, streamed = {
        "forward": (m * d, 2 * n * d),  # q stays; k, v stream
        "dq": (2 * m * d, 3 * n * d + m * d),  # q, dO stay; k, v and a shared layer's dO_l, V_l stream
        "dkdv": (2 * n * d, 3 * m * d + n * d),  # k, v stay; q, dO and a shared layer's dO_l, V_l stream
        "decode": (m * d, 2 * n * d),  # the group's query heads stay; k, v stream
    }[kernel]
    return element_size * (resident + stages * streamed) + 4 * m * n


def _candidates(kernel: str, head_dim: int) -> list[Tiles]:
    """Fastest known first. forward and dq need block_m % block_n == 0, dkdv block_n % block_m == 0."""
    wide = head_dim > 64
    warps = 8 if wide else 4  # a 128-row forward tile at D = 128 spreads its accumulator over 8 warps
    dq = [(64, 32, 4, 3), (64, 32, 4, 2)] if wide else [(128, 32, 4, 3), (128, 32, 4, 2), (64, 32, 4, 2)]
    dkdv = [(32, 64, 4, 3), (32, 64, 4, 2)] if wide else [(32, 128, 4, 3), (32, 128, 4, 2), (32, 64, 4, 2)]
    table = {
        "forward": [(128, 64, warps, 3), (128, 64, warps, 2), (128, 32, warps, 2), (64, 32, 4, 2)],
        "dq": dq,
        "dkdv": dkdv,
        "decode": [(16, 64, 4, 3), (16, 64, 4, 2)],
    }[kernel]
    smallest = [(32, 32, 4, 2), (32, 32, 4, 1), (16, 16, 4, 1)]
    return [Tiles(*t) for t in table + smallest]


@functools.cache
def select_tiles(dtype: torch.dtype, head_dim: int, shared_memory: int) -> KernelTiles:
    """Per kernel, the first candidate whose shared-memory need fits ``shared_memory`` bytes."""
    element_size = torch.empty((), dtype=dtype).element_size()

    def first_fit(kernel: str) -> Tiles:
        for tiles in _candidates(kernel, head_dim):
            if shared_memory_bytes(kernel, tiles, head_dim, element_size) <= shared_memory:
                return tiles
        raise ValueError(
            f"no {kernel} tiles fit {shared_memory} bytes of shared memory for head_dim {head_dim}, {dtype}"
        )

    return KernelTiles(first_fit("forward"), first_fit("dq"), first_fit("dkdv"), first_fit("decode"))


_INTERPRETER_TILES = KernelTiles(*[Tiles(INTERPRETER_BLOCK, INTERPRETER_BLOCK, 1, 1)] * 4)
_GPU_TILES_BUDGET: ContextVar[int | None] = ContextVar("sa_train_gpu_tiles_budget", default=None)


@contextmanager
def gpu_tiles(shared_memory: int = H200_SHARED_MEMORY) -> Iterator[None]:
    """Launch with the GPU choice for a device with ``shared_memory`` bytes per block, whatever the
    device, e.g. in the Triton interpreter on CPU tensors.

    Tests use it to run the exact tile shapes (and so the loop bounds and masks) a GPU runs; each
    interpreted tl.dot then costs real time, so keep the shapes small.
    """
    token = _GPU_TILES_BUDGET.set(shared_memory)
    try:
        yield
    finally:
        _GPU_TILES_BUDGET.reset(token)


@functools.cache
def device_shared_memory(index: int) -> int:
    """Opt-in shared memory per block of a CUDA device, in bytes."""
    props = torch.cuda.get_device_properties(index)
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin is None:  # torch builds without the field: ask Triton's driver
        import triton

        optin = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return int(optin)


def kernel_tiles(device: torch.device, dtype: torch.dtype, head_dim: int) -> KernelTiles:
    """The tiles for tensors on ``device``: the GPU choice on CUDA or under ``gpu_tiles()``, else tiny."""
    budget = _GPU_TILES_BUDGET.get()
    if budget is None:
        if device.type != "cuda":
            return _INTERPRETER_TILES
        budget = device_shared_memory(
            device.index if device.index is not None else torch.cuda.current_device()
        )
    return select_tiles(dtype, head_dim, budget)
