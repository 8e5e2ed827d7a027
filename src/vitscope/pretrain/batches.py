"""Training images and which of them each step takes: a function of (seed, step, rank) alone.

Epoch e's order is a permutation seeded by (seed, e); step s takes the s-th global batch of it and
rank r the r-th slice; augmentation draws from a generator seeded by :func:`step_seed` (seed, s, r).
A run resumed at any step therefore sees exactly the images and augmentations it would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = ["load_images", "step_seed", "BatchPlan"]


def load_images(spec: str, split: str, num_images: int | None, seed: int, image_size: int) -> tuple[Tensor, Tensor]:
    """A split of the images a data spec names: (uint8 [N, H, W] or [N, H, W, 3], int64 labels [N]).

    Array datasets (Fashion-MNIST) are used as they are; image folders are read once, resized to the
    model's input size (unreadable files skipped). ``num_images`` takes a stratified subset.
    """
    from torchvision.transforms import functional as TF

    from vitscope.data import dataset_labels, open_dataset, stratified_subset

    dataset = open_dataset(spec, split)
    indices = np.arange(len(dataset))
    if num_images is not None:
        if num_images < 1:
            raise ValueError(f"num_images must be positive, got {num_images}")
        indices = stratified_subset(dataset_labels(dataset), num_images, seed, total=len(dataset))
    array = getattr(dataset, "images", None)
    if isinstance(array, np.ndarray) and array.dtype == np.uint8:
        chosen = np.asarray(dataset.labels)[indices]
        return torch.from_numpy(np.ascontiguousarray(array[indices])), torch.from_numpy(chosen.astype(np.int64))
    images: list[Tensor] = []
    labels: list[int] = []
    for i in indices.tolist():
        item = dataset[i]
        if not isinstance(item, tuple):  # an unreadable file, skipped
            continue
        tensor = TF.resize(item[0], [image_size, image_size], antialias=True)
        images.append((tensor.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0))
        labels.append(int(item[1]))
    if not images:
        raise ValueError(f"data {spec!r}: no readable images")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def step_seed(seed: int, step: int, rank: int = 0, stream: int = 0) -> int:
    """A 63-bit seed that is a function of (seed, step, rank, stream) only."""
    return int(
        np.random.SeedSequence([seed, step, rank, stream, 0x5EED])
        .generate_state(2, dtype=np.uint32)
        .astype(np.uint64)
        .dot([1 << 31, 1])
    )


@dataclass
class BatchPlan:
    """Which images step s gives each rank: epoch order seeded by (seed, epoch), disjoint rank slices."""

    num_images: int
    batch_size: int
    world: int
    seed: int
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    @property
    def steps_per_epoch(self) -> int:
        return self.num_images // self.global_batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            self._cache.clear()
            self._cache[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_images)
        return self._cache[epoch]

    def position(self, step: int) -> tuple[int, int]:
        return divmod(step, self.steps_per_epoch)

    def indices(self, step: int, rank: int) -> np.ndarray:
        epoch, within = self.position(step)
        start = within * self.global_batch + rank * self.batch_size
        return self.epoch_order(epoch)[start : start + self.batch_size]
