"""Deterministic, class-stratified subsets of a dataset, with replacements for unreadable images.

:func:`stratified_choice` picks ``num_items`` indices, balanced over classes: each class's members in a
seeded order, the first k of them chosen, the rest its reserve. :class:`ReplacingSubset` serves the
chosen images and swaps an unreadable one for the first readable image of the same class's reserve,
so a run analyses as many images as were asked for and lists the files it skipped.

Which reserve image replaces which is fixed in advance, so it does not depend on the order in which
(possibly parallel) loader workers meet the bad files: the r-th chosen image of a class tries reserve
images r, r + k, r + 2k, ... first (no two chosen images share these), then the rest of the reserve
from position r on. A replacement can only repeat an image when a class has more unreadable chosen
images than its reserve has images of their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from torch.utils.data import Dataset

from vitscope.data.datasets import Replaced, Skipped

__all__ = ["StratifiedChoice", "stratified_choice", "stratified_subset", "split_choices", "ReplacingSubset"]


@dataclass(frozen=True)
class StratifiedChoice:
    """Chosen dataset indices (sorted) and what replaces each of them when it is unreadable.

    Attributes:
        indices: the chosen dataset indices, sorted.
        groups: per class, its members in seeded order; the first ``counts[g]`` were chosen.
        counts: per class, how many were chosen.
        slots: chosen index -> (class group, rank among the class's chosen).
        excluded: indices never used as replacements (the other split's images).
    """

    indices: np.ndarray
    groups: tuple[np.ndarray, ...] = ()
    counts: tuple[int, ...] = ()
    slots: dict[int, tuple[int, int]] = field(default_factory=dict)
    excluded: frozenset[int] = frozenset()

    def __len__(self) -> int:
        return len(self.indices)

    def candidates(self, index: int) -> Iterator[int]:
        """Replacement candidates of a chosen ``index``, in the order they are tried."""
        if index not in self.slots:
            return
        group, rank = self.slots[index]
        count = self.counts[group]
        reserve = self.groups[group][count:]
        rolled = np.roll(np.arange(len(reserve)), -rank)  # rank, rank + 1, ..., wrapping around
        own = (rolled >= rank) & ((rolled - rank) % count == 0)  # rank, rank + k, rank + 2k, ...
        order = np.concatenate([rolled[own], rolled[~own]])
        for position in order:
            candidate = int(reserve[position])
            if candidate not in self.excluded:
                yield candidate

    def subset(self, positions: np.ndarray) -> StratifiedChoice:
        """The chosen indices at ``positions`` (kept in that order), with the same replacements."""
        chosen = self.indices[np.asarray(positions, dtype=np.int64)]
        slots = {int(i): self.slots[int(i)] for i in chosen if int(i) in self.slots}
        return StratifiedChoice(chosen, self.groups, self.counts, slots, self.excluded)

    def without(self, excluded: np.ndarray) -> StratifiedChoice:
        """The same choice, never replacing an image by one of ``excluded``."""
        extra = frozenset(int(i) for i in np.asarray(excluded).ravel())
        return StratifiedChoice(self.indices, self.groups, self.counts, self.slots, self.excluded | extra)

    def reserve(self) -> np.ndarray:
        """Every index that may replace a chosen one (the classes' unchosen members, minus exclusions)."""
        parts = [group[count:] for group, count in zip(self.groups, self.counts)]
        pool = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        return np.array([i for i in pool if int(i) not in self.excluded], dtype=np.int64)


def _class_counts(sizes: list[int], num_items: int) -> list[int]:
    """Round-robin over classes: how many of each to take so that ``num_items`` are taken."""
    counts = [0] * len(sizes)
    taken, depth = 0, 0
    while taken < num_items:
        for k, size in enumerate(sizes):
            if depth < size and taken < num_items:
                counts[k] += 1
                taken += 1
        depth += 1
    return counts


def stratified_choice(
    labels: np.ndarray | None, num_items: int, seed: int = 0, total: int | None = None
) -> StratifiedChoice:
    """A deterministic subset of ``num_items`` indices, balanced over classes when labels exist.

    Classes are visited round-robin, each in a seeded random order, so every class gets ⌊n/k⌋ or ⌈n/k⌉
    items (fewer only when a class runs out). Without labels: a seeded permutation, one "class". The
    unchosen members are the replacements (see the module docstring); there are none when every item
    is taken.
    """
    if num_items < 0:
        raise ValueError(f"num_items must be ≥ 0, got {num_items}")
    rng = np.random.default_rng(seed)
    size = len(labels) if labels is not None else int(total or 0)
    if num_items >= size:
        return StratifiedChoice(np.arange(size))
    if labels is None or (labels < 0).all():
        groups: tuple[np.ndarray, ...] = (rng.permutation(size),)
    else:
        groups = tuple(rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels))
    counts = tuple(_class_counts([len(g) for g in groups], num_items))
    slots = {int(index): (g, rank) for g, (group, count) in enumerate(zip(groups, counts))
             for rank, index in enumerate(group[:count])}  # fmt: skip
    indices = np.sort(np.array(list(slots), dtype=np.int64))
    return StratifiedChoice(indices, groups, counts, slots)


def stratified_subset(labels: np.ndarray | None, num_items: int, seed: int = 0, total: int | None = None) -> np.ndarray:
    """The chosen indices of :func:`stratified_choice`."""
    return stratified_choice(labels, num_items, seed, total).indices


def split_choices(
    test_labels: np.ndarray | None,
    test_size: int,
    train_labels: np.ndarray | None,
    train_size: int,
    same_source: bool,
    num_test: int,
    num_train: int,
    seed: int,
) -> tuple[StratifiedChoice, StratifiedChoice]:
    """Stratified test and train choices (seeds ``seed`` and ``seed + 1``).

    When both splits come from one source (an image folder), the train images are drawn from what the
    test choice left, neither split is ever replaced by an image the other one uses, and the test
    split keeps the first claim on the reserve: train replacements avoid the test's reserve. A class
    whose images the test choice would all take keeps one for the train split (a class of one image
    is then in the train split only), so that no class drops out of the probe's training.
    ``num_train=0`` draws no train images: the test may then be replaced by any unchosen image.
    """
    test = stratified_choice(test_labels, num_test, seed, total=test_size)
    if same_source and num_train > 0:
        test = _hold_back_whole_classes(test)
    if not same_source:
        return test, stratified_choice(train_labels, num_train, seed + 1, total=train_size)
    rest = np.setdiff1d(np.arange(test_size), test.indices)
    rest_labels = None if test_labels is None else test_labels[rest]
    local = stratified_choice(rest_labels, num_train, seed + 1, total=len(rest))
    train = StratifiedChoice(
        rest[local.indices],
        tuple(rest[group] for group in local.groups),
        local.counts,
        {int(rest[k]): slot for k, slot in local.slots.items()},
    )
    test = test.without(train.indices)
    return test, train.without(np.concatenate([test.indices, test.reserve()]))


def _hold_back_whole_classes(choice: StratifiedChoice) -> StratifiedChoice:
    """``choice`` without the last chosen member of every class it takes entirely (left for the train split)."""
    counts = list(choice.counts)
    slots = dict(choice.slots)
    for g, (group, count) in enumerate(zip(choice.groups, choice.counts)):
        if count and count == len(group):
            counts[g] = count - 1
            del slots[int(group[count - 1])]
    if counts == list(choice.counts):
        return choice
    indices = np.sort(np.array(list(slots), dtype=np.int64))
    return StratifiedChoice(indices, choice.groups, tuple(counts), slots, choice.excluded)


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
        for candidate in self.choice.candidates(index):
            replacement = self.dataset[candidate]
            if not isinstance(replacement, Skipped):
                return Replaced(replacement, skipped)
            skipped.append(replacement)
        more = f" (and {len(skipped) - 1} replacement(s) unreadable)" if len(skipped) > 1 else " (no replacement left)"
        return Skipped(skipped[0].path, skipped[0].reason + more)
