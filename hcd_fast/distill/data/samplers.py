"""Samplers of hcd-distill: the training order is a function of (seed, epoch), split over ranks, and can start
mid-epoch, so a resumed run sees exactly the samples the killed one had not yet seen; validation is split
without padding, so metrics summed over ranks are exact."""
from __future__ import annotations

from typing import Iterator

from torch.utils.data import DistributedSampler, Sampler


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler (permutation from seed + epoch, rank r takes every world-th index) that skips
    the first ``start`` of this rank's indices; ``set_start`` is reset by ``set_epoch``."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, drop_last: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler):
    """Indices rank, rank + world, ... in order: every sample exactly once over all ranks, no padding."""

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0):
        self.n, self.world, self.rank = len(dataset), num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))
