"""Tile sizes per kernel: tiny for the Triton interpreter (every tl.dot costs real seconds), large on GPU."""

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

INTERPRETER_BLOCK = 16


@dataclass(frozen=True)
class Tiles:
    """Launch parameters; block_m tiles queries, block_n tiles keys."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


_GPU_TILES_ANYWHERE: ContextVar[bool] = ContextVar("sa_train_gpu_tiles_anywhere", default=False)


@contextmanager
def gpu_tiles() -> Iterator[None]:
    """Launch with the GPU tiles whatever the device, e.g. in the Triton interpreter on CPU tensors.

    Tests use it to run the exact tile shapes (and so the loop bounds and masks) a GPU runs; each
    interpreted tl.dot then costs real time, so keep the shapes small.
    """
    token = _GPU_TILES_ANYWHERE.set(True)
    try:
        yield
    finally:
        _GPU_TILES_ANYWHERE.reset(token)


def _interpreted(device: torch.device) -> bool:
    return device.type != "cuda" and not _GPU_TILES_ANYWHERE.get()


# GPU tiles keep the fp32 accumulators of one program within about 128 registers per thread; the forward
# and dq kernels need block_m % block_n == 0 and dk/dv needs block_n % block_m == 0 (diagonal tiles).


def forward_tiles(device: torch.device, head_dim: int) -> Tiles:
    """Anchor/shared forward and the delta pre-pass: a tall query tile streams over key tiles."""
    if _interpreted(device):
        return Tiles(INTERPRETER_BLOCK, INTERPRETER_BLOCK, 1, 1)
    return Tiles(128, 64, 4 if head_dim <= 64 else 8, 3)


def dq_tiles(device: torch.device, head_dim: int) -> Tiles:
    """dq backward: a query tile with its dq accumulator streams over narrow key tiles."""
    if _interpreted(device):
        return Tiles(INTERPRETER_BLOCK, INTERPRETER_BLOCK, 1, 1)
    return Tiles(128, 32, 4, 3) if head_dim <= 64 else Tiles(64, 32, 4, 3)


def dkdv_tiles(device: torch.device, head_dim: int) -> Tiles:
    """dk/dv backward: a key tile with its dk, dv accumulators streams over narrow query tiles."""
    if _interpreted(device):
        return Tiles(INTERPRETER_BLOCK, INTERPRETER_BLOCK, 1, 1)
    return Tiles(32, 128, 4, 3) if head_dim <= 64 else Tiles(32, 64, 4, 3)


def decode_tiles(device: torch.device) -> Tiles:
    """Decode: block_m holds the query heads of one kv head (padded to tl.dot's minimum of 16)."""
    if _interpreted(device):
        return Tiles(INTERPRETER_BLOCK, INTERPRETER_BLOCK, 1, 1)
    return Tiles(16, 64, 4, 3)
