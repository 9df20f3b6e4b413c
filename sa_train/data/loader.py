"""Deterministic, rank-sharded, resumable batch order over packed samples.

The order of an epoch is a pure function of ``(seed, epoch)``: a permutation of all sample indices, dealt
round-robin to ranks and cut to the same length on every rank (so DDP ranks never wait on each other).
Round-robin dealing means that after k steps the ranks together have trained on exactly the first
k · batch · world samples of the permutation, whatever the batch size and world size. Resuming therefore
needs only ``(epoch, samples consumed)``: the sampler recomputes the permutation and deals the rest of it,
so a run resumed with another ``data.batch_size`` or number of devices continues at the same point of the
token stream and sees each sample of the epoch once.
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
    """Yields this rank's batches of sample indices for the current epoch, from sample ``start`` on.

    ``start`` counts the samples of the epoch's permutation that all ranks together already trained on
    (set by a resume), ``before`` the batches they took (Lightning's batch count of the epoch, which a
    resumed epoch continues). ``set_epoch`` is called by Lightning at the start of every epoch; moving to
    a new epoch clears both and the consumed count. The last batch of an epoch may be short; every rank
    has the same number.
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
        self.usable = num_samples // world_size * world_size  # dealt equally; the rest waits an epoch
        self.epoch = 0
        self.start = 0
        self.before = 0
        self.consumed = 0  # batches trained on since ``start``
        self.passed = False  # a whole pass over the epoch was drawn: a later one starts at its beginning

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = self.before = self.consumed = 0
            self.passed = False
        self.epoch = epoch

    def rank_indices(self, epoch: int, start: int = 0) -> np.ndarray:
        """The sample indices this rank sees in ``epoch`` after the first ``start`` samples, in order."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        rest = order[start : self.usable]
        return rest[self.rank :: self.world_size][: len(rest) // self.world_size]

    def samples_consumed(self) -> int:
        """Samples of the epoch's permutation all ranks together have trained on."""
        return min(self.usable, self.start + self.consumed * self.batch_size * self.world_size)

    def __len__(self) -> int:
        remaining = (self.usable - self.start) // self.world_size
        return self.before + math.ceil(remaining / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        # Read lazily: DataLoader may create and drop sampler iterators before the first batch. The offset
        # holds until one pass completes, so a later pass over the same epoch starts from its beginning.
        order = self.rank_indices(self.epoch, 0 if self.passed else self.start)
        size = self.batch_size
        for b in range(math.ceil(len(order) / size)):
            yield order[b * size : (b + 1) * size].tolist()
        self.passed = True


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
        """What the epoch's permutation depends on: a resume continues it only if these are unchanged."""
        s = self.sampler
        return {"num_samples": s.num_samples, "seed": s.seed, "shuffle": s.shuffle}

    def state_dict(self) -> dict[str, Any]:
        s = self.sampler
        return {
            "epoch": s.epoch,
            "batches_consumed": s.before + s.consumed,
            "samples_consumed": s.samples_consumed(),
            "batch_size": s.batch_size,
            "world_size": s.world_size,
            **self._layout(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, batches = state["epoch"], state["batches_consumed"]
        # Checkpoints written before samples_consumed existed kept their batch size and world size.
        samples = state.get("samples_consumed", batches * state["batch_size"] * state["world_size"])
        saved_layout = {k: state.get(k) for k in self._layout()}
        if saved_layout != self._layout():
            warnings.warn(
                f"The checkpoint's data order was made with {saved_layout}, the current one is "
                f"{self._layout()} (another corpus, data.seq_len or data.seed); the data position cannot be "
                f"restored exactly, so epoch {epoch} restarts from its first batch.",
                stacklevel=2,
            )
            samples = batches = 0
        sampler = self.sampler
        sampler.epoch, sampler.start, sampler.before, sampler.consumed = epoch, samples, batches, 0
        sampler.passed = False
        if (sampler.usable - samples) // sampler.world_size < 1:
            sampler.set_epoch(epoch + 1)
