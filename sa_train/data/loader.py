"""Deterministic, rank-sharded, resumable batch order over packed samples.

The order of an epoch is a pure function of ``(seed, epoch)``: a permutation of all sample indices, dealt
round-robin to ranks and cut to the same length on every rank (so DDP ranks never wait on each other).
Resuming therefore needs only ``(epoch, batches consumed)``: the sampler recomputes the permutation and
starts slicing at the offset, without touching the skipped samples.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochBatchSampler(Sampler[list[int]]):
    """Yields this rank's batches of sample indices for the current epoch, from ``start_batch`` on.

    ``set_epoch`` is called by Lightning at the start of every epoch; moving to a new epoch clears the resume
    offset and the consumed count. The last batch of an epoch may be short; every rank has the same number.
    """

    def __init__(
        self, num_samples: int, batch_size: int, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.per_rank = num_samples // world_size
        self.epoch = 0
        self.start_batch = 0
        self.consumed = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start_batch = 0
            self.consumed = 0
        self.epoch = epoch

    def rank_indices(self, epoch: int) -> np.ndarray:
        """All sample indices this rank sees in ``epoch``, in order."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        return order[self.rank :: self.world_size][: self.per_rank]

    def __len__(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        # Read lazily: DataLoader may create and drop sampler iterators before the first batch. The offset
        # holds until one pass completes, so a later pass over the same epoch starts from its beginning.
        order = self.rank_indices(self.epoch)
        size = self.batch_size
        for b in range(self.start_batch, len(self)):
            yield order[b * size : (b + 1) * size].tolist()
        self.start_batch = 0


class ResumableLoader:
    """A DataLoader over whole batches whose position is saved in Lightning checkpoints.

    Lightning's fit loop stores ``state_dict()`` of every training loader that has one under
    ``loops.fit_loop.state_dict.combined_loader`` and calls ``load_state_dict`` before iterating on resume.
    The position must count batches the training step actually received, not batches already drawn from the
    sampler by DataLoader workers (``prefetch_factor`` per worker) or by Lightning's fetcher (which prefetches
    when a loader has no length), so it is advanced by :meth:`mark_consumed`, which
    ``TokenDataModule.on_before_batch_transfer`` calls for each training batch as it enters the step.
    It is not a ``DataLoader`` subclass on purpose: Lightning then leaves it alone instead of re-creating it
    with a ``DistributedSampler`` (the sampler already shards by rank).
    """

    def __init__(self, dataset: Dataset, sampler: EpochBatchSampler, num_workers: int) -> None:
        self.sampler = sampler
        self.loader = DataLoader(
            dataset,
            batch_size=None,
            sampler=sampler,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
        )
        # Lightning inspects these DataLoader attributes (set_epoch, shuffle detection) on any loader.
        self.batch_sampler = self.loader.batch_sampler

    def __iter__(self) -> Iterator[Any]:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.sampler)

    def mark_consumed(self) -> None:
        self.sampler.consumed += 1

    def _layout(self) -> dict[str, Any]:
        s = self.sampler
        return {
            "num_samples": s.num_samples,
            "batch_size": s.batch_size,
            "seed": s.seed,
            "shuffle": s.shuffle,
            "world_size": s.world_size,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.sampler.epoch, "batches_consumed": self.sampler.consumed, **self._layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, consumed = state["epoch"], state["batches_consumed"]
        saved_layout = {k: state.get(k) for k in self._layout()}
        if saved_layout != self._layout():
            warnings.warn(
                f"The checkpoint's data order was made with {saved_layout}, the current one is "
                f"{self._layout()}; the data position cannot be restored exactly, so epoch {epoch} "
                "restarts from its first batch.",
                stacklevel=2,
            )
            consumed = 0
        if consumed >= len(self):
            epoch, consumed = epoch + 1, 0
        self.sampler.epoch = epoch
        self.sampler.start_batch = consumed
        self.sampler.consumed = consumed
