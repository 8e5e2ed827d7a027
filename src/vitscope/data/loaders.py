"""Data loaders over deterministic subsets, yielding :class:`~vitscope.data.batches.Batch`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vitscope.data.batches import collate_skipping
from vitscope.data.specs import dataset_labels
from vitscope.data.subsets import ReplacingSubset, StratifiedChoice, stratified_choice

__all__ = ["make_loader", "choice_loader", "ChoiceLoader", "ShardBatches"]


class ShardBatches(Sampler[list[int]]):
    """Run-wide batch k (positions k·b .. k·b + b − 1) goes to rank k mod world: no image twice, none
    lost when the count does not divide, and every batch the same as in a single process."""

    def __init__(self, size: int, batch_size: int, rank: int = 0, world: int = 1, start: int = 0) -> None:
        self.size, self.batch_size, self.rank, self.world = size, batch_size, rank, world
        self.start = start  # run-wide batches before this one are not served (a resumed pass)

    @property
    def num_batches(self) -> int:
        return -(-self.size // self.batch_size)

    @property
    def numbers(self) -> range:
        """The run-wide numbers of this rank's batches, in the order it reads them."""
        first = self.rank + max(0, -(-(self.start - self.rank) // self.world)) * self.world
        return range(first, self.num_batches, self.world)

    def __iter__(self) -> Iterator[list[int]]:
        for k in self.numbers:
            yield list(range(k * self.batch_size, min((k + 1) * self.batch_size, self.size)))

    def __len__(self) -> int:
        return len(self.numbers)


class ChoiceLoader:
    """Batches of the chosen images for this rank, each marked with its run-wide number and first
    image's position (see :class:`~vitscope.data.batches.Batch`). ``total_images``: the whole run's."""

    def __init__(self, loader: DataLoader, sampler: ShardBatches) -> None:
        self.loader, self.sampler = loader, sampler
        self.total_images = sampler.size

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Any]:
        for number, item in zip(self.sampler.numbers, self.loader):
            for batch in item if isinstance(item, list) else [item]:
                batch.index, batch.offset = number, number * self.sampler.batch_size
            yield item


def choice_loader(
    dataset: Dataset,
    choice: StratifiedChoice,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    collate: Callable = collate_skipping,
    rank: int = 0,
    world: int = 1,
    pin_memory: bool = False,
    start: int = 0,
) -> ChoiceLoader:
    """A loader over the chosen images (unreadable ones replaced by candidates of their class), in data
    order, sharded batch by batch over ``world`` processes (this one is ``rank``), from run-wide batch
    ``start`` on (the batches before it were already seen)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    sampler = ShardBatches(len(choice), batch_size, rank, world, start)
    loader = DataLoader(
        ReplacingSubset(dataset, choice),
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
    return ChoiceLoader(loader, sampler)


def make_loader(
    dataset: Dataset,
    *,
    num_images: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    num_workers: int = 0,
    shuffle: bool = False,
) -> DataLoader | ChoiceLoader:
    """A loader over a deterministic (stratified) subset of ``num_images`` of ``dataset`` (all when None),
    yielding :class:`~vitscope.data.batches.Batch`; unreadable images are replaced (see
    :class:`~vitscope.data.subsets.ReplacingSubset`) and listed in the batches' ``skipped``.
    ``shuffle`` draws the batches in a seeded random order instead of data order."""
    if num_images is not None and num_images < 1:
        raise ValueError(f"num_images must be ≥ 1, got {num_images}")
    size = len(cast(Sized, dataset))
    choice = stratified_choice(dataset_labels(dataset), size if num_images is None else num_images, seed, total=size)
    if shuffle:
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(ReplacingSubset(dataset, choice), batch_size=batch_size, shuffle=True,
                          num_workers=num_workers, collate_fn=collate_skipping, generator=generator)  # fmt: skip
    return choice_loader(dataset, choice, batch_size=batch_size, num_workers=num_workers)
