"""Batches: collated images and labels plus the files skipped on the way, and a counter of those."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from vitscope.data.datasets import Replaced, Skipped

__all__ = ["Batch", "SkipCounter", "collate_skipping", "collate_views"]


@dataclass
class Batch:
    """A collated batch: images [B, 3, H, W], labels [B] (-1 when unknown), skipped (path, reason) pairs, and
    where the batch stands in the whole run when the run is shared between processes (``index``: its
    number, ``offset``: the run-wide index of its first image; −1 when the batches come in order)."""

    images: Tensor
    labels: Tensor
    skipped: list[tuple[str, str]] = field(default_factory=list)
    index: int = -1
    offset: int = -1


def _split(items: list) -> tuple[list[tuple], list[tuple[str, str]]]:
    """The readable ``(sample, label)`` items and the (path, reason) of every file skipped."""
    good: list[tuple] = []
    skipped: list[tuple[str, str]] = []
    for item in items:
        if isinstance(item, Skipped):
            skipped.append((item.path, item.reason))
        elif isinstance(item, Replaced):
            skipped.extend((s.path, f"{s.reason} (replaced by another image of its class)") for s in item.skipped)
            good.append(item.item)
        else:
            good.append(item)
    return good, skipped


def collate_skipping(items: list) -> Batch:
    """Stack the readable samples; carry the skipped files' paths and reasons along."""
    good, skipped = _split(items)
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    images = torch.stack([image for image, _ in good])
    labels = torch.tensor([label for _, label in good], dtype=torch.long)
    return Batch(images, labels, skipped)


def collate_views(items: list) -> list[Batch]:
    """Collate samples whose image is a tuple of views (one per model pipeline) into a Batch per view.

    Skipped files are carried on the first view's batch.
    """
    good, skipped = _split(items)
    if not good:
        return [Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)]
    labels = torch.tensor([label for _, label in good], dtype=torch.long)
    num_views = len(good[0][0])
    return [
        Batch(torch.stack([views[v] for views, _ in good]), labels, skipped if v == 0 else []) for v in range(num_views)
    ]


class SkipCounter:
    """Sums the skipped files over a run's batches."""

    def __init__(self) -> None:
        self.skipped: list[tuple[str, str]] = []

    def update(self, batch: Batch) -> None:
        self.skipped.extend(batch.skipped)

    @property
    def count(self) -> int:
        return len(self.skipped)

    def report(self) -> str:
        if not self.skipped:
            return "skipped 0 unreadable files"
        lines = [f"skipped {self.count} unreadable file(s):"] + [f"  {p}: {r}" for p, r in self.skipped]
        return "\n".join(lines)
