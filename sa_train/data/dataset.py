"""Fixed-length training samples cut from a flat memory-mapped token shard."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


class PackedTokenDataset(Dataset):
    """Sample ``i`` is the ``seq_len + 1`` tokens starting at ``i * seq_len``; documents run across samples.

    Consecutive samples overlap by one token, so every token after the first is a target exactly once. The
    ragged tail shorter than a full sample is dropped. Indexing with a sequence of indices returns a whole
    batch ``(inputs, targets)`` of shape ``(len(indices), seq_len)`` from one vectorised read, which is how
    the loaders use it (``DataLoader(batch_size=None)`` with a sampler that yields index lists).
    The memmap is opened lazily, so pickling the dataset into DataLoader workers copies only the path.
    """

    def __init__(self, path: str, dtype: str, num_tokens: int, seq_len: int) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self.num_tokens = num_tokens
        self.seq_len = seq_len
        self._tokens: np.ndarray | None = None
        self._window = np.arange(seq_len + 1)

    def __len__(self) -> int:
        return max(0, (self.num_tokens - 1) // self.seq_len)

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        return self._tokens

    def __getitem__(self, index: int | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        starts = np.asarray(index, dtype=np.int64) * self.seq_len
        if np.any(starts < 0) or np.any(starts >= len(self) * self.seq_len):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples")
        chunk = torch.from_numpy(self.tokens[starts[..., None] + self._window].astype(np.int64))
        return chunk[..., :-1], chunk[..., 1:]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokens": None}
