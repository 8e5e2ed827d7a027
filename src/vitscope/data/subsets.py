"""Deterministic, class-stratified subsets of a dataset, with replacements for unreadable images.

:func:`stratified_choice` picks ``num_items`` indices, balanced over classes, and gives every chosen
index its own list of replacement candidates of the same class: the class's members in the same
seeded order, past the chosen ones, dealt out in turn (the r-th chosen image of a class with k chosen
gets candidates r, r + k, r + 2k, ...), so no two chosen images share a candidate and the choice does
not depend on which files turn out unreadable. :class:`ReplacingSubset` serves the chosen images and
swaps an unreadable one for its first readable candidate, so a run analyses as many images as were
asked for and lists the files it skipped.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch.utils.data import Dataset

from vitscope.data.datasets import Replaced, Skipped

__all__ = ["StratifiedChoice", "stratified_choice", "stratified_subset", "split_choices", "ReplacingSubset"]


@dataclass(frozen=True)
class StratifiedChoice:
    """Chosen dataset indices (sorted) and, per chosen index, its replacement candidates in order."""

    indices: np.ndarray
    candidates: dict[int, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, positions: np.ndarray) -> "StratifiedChoice":
        """The chosen indices at ``positions`` with their candidates."""
        chosen = self.indices[positions]
        return StratifiedChoice(chosen, {int(i): self.candidates[int(i)] for i in chosen if int(i) in self.candidates})

    def without(self, excluded: np.ndarray) -> "StratifiedChoice":
        """The same choice with ``excluded`` indices removed from every candidate list."""
        drop = set(int(i) for i in excluded)
        return StratifiedChoice(self.indices, {k: np.array([c for c in v if int(c) not in drop], dtype=np.int64)
                                               for k, v in self.candidates.items()})


def _deal(order: np.ndarray, count: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """The first ``count`` of ``order`` and the rest dealt out to them in turn."""
    chosen, reserve = order[:count], order[count:]
    return chosen, {int(index): reserve[r::count] for r, index in enumerate(chosen)} if count else {}


def stratified_choice(labels: np.ndarray | None, num_items: int, seed: int = 0,
                      total: int | None = None) -> StratifiedChoice:
    """A deterministic subset of ``num_items`` indices, balanced over classes when labels exist.

    Classes are visited round-robin, each in a seeded random order, so every class gets ⌊n/k⌋ or ⌈n/k⌉
    items (fewer only when a class runs out). Without labels: a seeded permutation. Every chosen index
    gets replacement candidates of its own class (see the module docstring); none when all items
    are taken.
    """
    if num_items < 0:
        raise ValueError(f"num_items must be ≥ 0, got {num_items}")
    rng = np.random.default_rng(seed)
    size = len(labels) if labels is not None else int(total or 0)
    if num_items >= size:
        return StratifiedChoice(np.arange(size))
    if labels is None or (labels < 0).all():
        chosen, candidates = _deal(rng.permutation(size), num_items)
        return StratifiedChoice(np.sort(chosen), candidates)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    counts = [0] * len(per_class)
    taken, depth = 0, 0
    while taken < num_items:
        for k, members in enumerate(per_class):
            if depth < len(members) and taken < num_items:
                counts[k] += 1
                taken += 1
        depth += 1
    indices: list[int] = []
    candidates: dict[int, np.ndarray] = {}
    for members, count in zip(per_class, counts):
        chosen, dealt = _deal(members, count)
        indices.extend(int(i) for i in chosen)
        candidates.update(dealt)
    return StratifiedChoice(np.sort(np.array(indices, dtype=np.int64)), candidates)


def stratified_subset(labels: np.ndarray | None, num_items: int, seed: int = 0, total: int | None = None) -> np.ndarray:
    """The chosen indices of :func:`stratified_choice`."""
    return stratified_choice(labels, num_items, seed, total).indices


def split_choices(test_labels: np.ndarray | None, test_size: int, train_labels: np.ndarray | None, train_size: int,
                  same_source: bool, num_test: int, num_train: int,
                  seed: int) -> tuple[StratifiedChoice, StratifiedChoice]:
    """Stratified test and train choices (seeds ``seed`` and ``seed + 1``). When both splits come from one
    source (an image folder), train images and every replacement candidate avoid the test images, and
    test replacements avoid the train images and their candidates."""
    test = stratified_choice(test_labels, num_test, seed, total=test_size)
    if not same_source:
        return test, stratified_choice(train_labels, num_train, seed + 1, total=train_size)
    rest = np.setdiff1d(np.arange(test_size), test.indices)
    rest_labels = None if test_labels is None else test_labels[rest]
    local = stratified_choice(rest_labels, num_train, seed + 1, total=len(rest))
    train = StratifiedChoice(rest[local.indices], {int(rest[k]): rest[v] for k, v in local.candidates.items()})
    train_side = np.concatenate([train.indices, *train.candidates.values()]) if len(train) else train.indices
    return test.without(train_side), train


class ReplacingSubset(Dataset):
    """``dataset`` at the chosen indices; an unreadable image is replaced by its first readable candidate.

    Items are the dataset's own ``(sample, label)``, a :class:`Replaced` (a replacement, with the files
    skipped to reach it) or a :class:`Skipped` when no candidate was readable either.
    """

    def __init__(self, dataset: Dataset, choice: StratifiedChoice) -> None:
        self.dataset = dataset
        self.choice = choice

    def __len__(self) -> int:
        return len(self.choice)

    def __getitem__(self, position: int) -> tuple | Replaced | Skipped:
        index = int(self.choice.indices[position])
        item = self.dataset[index]
        if not isinstance(item, Skipped):
            return item
        skipped = [item]
        for candidate in self.choice.candidates.get(index, ()):
            replacement = self.dataset[int(candidate)]
            if not isinstance(replacement, Skipped):
                return Replaced(replacement, skipped)
            skipped.append(replacement)
        return Skipped(skipped[0].path, skipped[0].reason + (f" (and {len(skipped) - 1} replacement(s) unreadable)"
                                                             if len(skipped) > 1 else " (no replacement left)"))
