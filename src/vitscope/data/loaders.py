"""Data loaders over deterministic subsets, yielding :class:`~vitscope.data.batches.Batch`."""

from __future__ import annotations

from collections.abc import Callable, Sized
from typing import cast

import torch
from torch.utils.data import DataLoader, Dataset

from vitscope.data.batches import collate_skipping
from vitscope.data.specs import dataset_labels
from vitscope.data.subsets import ReplacingSubset, StratifiedChoice, stratified_choice

__all__ = ["make_loader", "choice_loader"]


def choice_loader(
    dataset: Dataset,
    choice: StratifiedChoice,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    collate: Callable = collate_skipping,
    seed: int = 0,
    shuffle: bool = False,
) -> DataLoader:
    """A loader over the chosen images, unreadable ones replaced by candidates of their class."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        ReplacingSubset(dataset, choice),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate,
        generator=generator,
        persistent_workers=False,
    )


def make_loader(
    dataset: Dataset,
    *,
    num_images: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    num_workers: int = 0,
    shuffle: bool = False,
) -> DataLoader:
    """A loader over a deterministic (stratified) subset of ``num_images`` of ``dataset`` (all when None),
    yielding :class:`~vitscope.data.batches.Batch`; unreadable images are replaced (see
    :class:`~vitscope.data.subsets.ReplacingSubset`) and listed in the batches' ``skipped``."""
    if num_images is not None and num_images < 1:
        raise ValueError(f"num_images must be ≥ 1, got {num_images}")
    total = len(cast(Sized, dataset))  # torch's Dataset type has no __len__; the datasets here all do
    count = total if num_images is None else num_images
    choice = stratified_choice(dataset_labels(dataset), count, seed, total=total)
    return choice_loader(dataset, choice, batch_size=batch_size, num_workers=num_workers, seed=seed, shuffle=shuffle)
