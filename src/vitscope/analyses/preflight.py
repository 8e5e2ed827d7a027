"""Checks made before the long pass: what the data and the models allow, decided in seconds.

:func:`plan_run` turns an :class:`~vitscope.analyses.suite.AnalysisConfig` and the data's labels into a
:class:`RunPlan`: the analyses that will run and the image counts the data can give them, with a note
for everything that differs from what was asked.

- Counts shrink to what the data holds (a note says so): the test images for the metrics, the train
  images for the probes and the noise images (a subset of the test images). When both splits come
  from one folder and it holds fewer than test + probe images, the test split keeps at most half of
  them and the probes get the rest. Without a probe no train images are drawn, so every unchosen
  image may stand in for an unreadable one.
- ``noise`` scores the last layer's linear probe, so it brings ``linear_probe`` with it (a note).
- ``linear_probe``, ``noise`` and ``tsne`` (coloured by class) need labels of at least two classes:
  on a flat folder or a one-class one they are skipped with a note, or refused when named in
  ``analyses``.
- ``cka`` and ``localisation`` need batches of at least 4 images (the unbiased HSIC): with a smaller
  batch they are skipped with a note, or refused when named.

:func:`check_control` refuses a control whose architecture (depth, heads, token grid, patch size)
differs from the CL model's, naming both shapes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "LABEL_ANALYSES",
    "BATCH_ANALYSES",
    "MIN_CKA_BATCH",
    "RunPlan",
    "plan_run",
    "ModelShape",
    "check_control",
    "split_notes",
]

LABEL_ANALYSES = ("linear_probe", "noise", "tsne")  # need labelled images of two classes or more
BATCH_ANALYSES = ("cka", "localisation")  # need batches of MIN_CKA_BATCH images or more
MIN_CKA_BATCH = 4  # the unbiased HSIC of minibatch CKA is defined from 4 examples


@dataclass(frozen=True)
class RunPlan:
    """What a run will do: the analyses and the counts the data allows, and why they differ from the asked.

    Attributes:
        wanted: the analyses that will run.
        num_test: test images for the metrics.
        num_train: train images for the probes (0 without a probe).
        num_noise: test images scored under noise (0 without noise).
        notes: one sentence per change from what was asked.
    """

    wanted: frozenset[str]
    num_test: int
    num_train: int
    num_noise: int
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Asked:
    """The counts and analyses asked for, and which analyses were named explicitly."""

    wanted: set[str]
    named: set[str]
    num_test: int
    num_train: int
    num_noise: int
    batch_size: int


def _classes(labels: np.ndarray | None) -> np.ndarray:
    """The distinct class labels (≥ 0) of a split; empty without labels."""
    if labels is None:
        return np.empty(0, dtype=np.int64)
    labels = np.asarray(labels)
    return np.unique(labels[labels >= 0])


def _drop(asked: _Asked, analyses: Iterable[str], reason: str, notes: list[str]) -> None:
    """Remove ``analyses`` from the run with a note, or refuse when one of them was named.

    ``reason`` follows "X needs"/"X need" (the verb agrees with the number of analyses named)."""
    present = [name for name in analyses if name in asked.wanted]
    if not present:
        return
    named = [name for name in present if name in asked.named]
    if named:
        verb = "needs" if len(named) == 1 else "need"
        raise ValueError(f"{' and '.join(named)} cannot run: {verb} {reason}; leave it out of the analyses")
    asked.wanted.difference_update(present)
    verb = "needs" if len(present) == 1 else "need"
    notes.append(f"{', '.join(present)} skipped: {verb} {reason}")


def _label_check(asked: _Asked, data: str, test_labels: np.ndarray | None, notes: list[str]) -> None:
    classes = _classes(test_labels)
    if len(classes) >= 2:
        return
    what = "no class labels (a flat folder, no class sub-folders)" if len(classes) == 0 else "a single class"
    _drop(asked, LABEL_ANALYSES, f"images of at least two classes and {data} has {what}", notes)


def _counts_one_source(asked: _Asked, size: int, probe: bool) -> tuple[int, int]:
    """(test, train) counts when both splits come from the same ``size`` images."""
    if not probe:
        return min(asked.num_test, size), 0
    if asked.num_test + asked.num_train <= size:
        return asked.num_test, asked.num_train
    test = min(asked.num_test, max(1, size // 2))
    return test, min(asked.num_train, size - test)


def _count_notes(asked: _Asked, test: int, train: int, sizes: tuple[int, int], same_source: bool) -> list[str]:
    probe = "linear_probe" in asked.wanted
    shrunk_test, shrunk_train = test < asked.num_test, probe and train < asked.num_train
    if not (shrunk_test or shrunk_train):
        return []
    if same_source and probe:
        return [
            f"the data holds {sizes[0]} images, fewer than the {asked.num_test} test + {asked.num_train} probe images "
            f"asked (--num-images, --probe-images): using {test} for the metrics and {train} for the probes"
        ]
    notes = []
    if shrunk_test:
        notes.append(f"the data holds {sizes[0]} test images, fewer than the {asked.num_test} asked (--num-images): "
                     f"using {test}")  # fmt: skip
    if shrunk_train:
        notes.append(f"the data holds {sizes[1]} train images, fewer than the {asked.num_train} probe images asked "
                     f"(--probe-images): using {train}")  # fmt: skip
    return notes


def plan_run(
    wanted: set[str],
    named: Sequence[str] | None,
    *,
    data: str,
    num_test: int,
    num_train: int,
    num_noise: int,
    batch_size: int,
    test_labels: np.ndarray | None,
    test_size: int,
    train_size: int,
    same_source: bool,
) -> RunPlan:
    """The analyses and counts a run can have on this data (see the module docstring).

    Args:
        wanted: the analyses asked for (validated names).
        named: the analyses the user named explicitly (None: the default set); a named analysis the data
            cannot serve is refused with a ValueError instead of being skipped.
        data: the data spec, for the notes.
        num_test, num_train, num_noise, batch_size: the counts asked for.
        test_labels: the test split's labels (-1 or None: unlabelled); ``test_size``/``train_size``: the
            number of images in each split (the same images when ``same_source``).
    """
    asked = _Asked(set(wanted), set(named or ()), num_test, num_train, num_noise, batch_size)
    notes: list[str] = []
    if "noise" in asked.wanted and "linear_probe" not in asked.wanted:
        asked.wanted.add("linear_probe")
        notes.append("linear_probe added: noise robustness scores the last layer's linear probe")
    _label_check(asked, data, test_labels, notes)
    if same_source and test_size < 2:
        _drop(asked, ("linear_probe", "noise"), f"a second image to train on and {data} holds one", notes)
    probe = "linear_probe" in asked.wanted
    if same_source:
        test, train = _counts_one_source(asked, test_size, probe)
    else:
        test, train = min(num_test, test_size), (min(num_train, train_size) if probe else 0)
    notes += _count_notes(asked, test, train, (test_size, train_size), same_source)
    smallest = min(batch_size, test)
    if smallest < MIN_CKA_BATCH:
        flag = f"--batch-size {batch_size}" if batch_size < MIN_CKA_BATCH else f"{test} test images"
        reason = f"batches of at least {MIN_CKA_BATCH} images for the unbiased HSIC of minibatch CKA ({flag})"
        _drop(asked, BATCH_ANALYSES, reason, notes)
    noise = min(num_noise, test) if "noise" in asked.wanted else 0
    if "noise" in asked.wanted and noise < num_noise:
        notes.append(f"noise robustness on all {noise} test images, fewer than the {num_noise} asked (--noise-images)")
    return RunPlan(frozenset(asked.wanted), test, train, noise, tuple(notes))


def split_notes(
    test_labels: np.ndarray | None,
    test_indices: np.ndarray,
    train_indices: np.ndarray,
    class_names: Sequence[str] = (),
) -> list[str]:
    """A note for every class the probe's test or train split lacks although the data holds it (a class
    whose images all went to the other split)."""
    if test_labels is None or len(train_indices) == 0:
        return []
    labels = np.asarray(test_labels)
    in_test, in_train = set(labels[test_indices].tolist()), set(labels[train_indices].tolist())
    notes = []
    for label in _classes(labels).tolist():
        name = class_names[label] if label < len(class_names) else str(label)
        count = int((labels == label).sum())
        if label in in_train and label not in in_test:
            notes.append(f"class {name!r} has {count} image(s): kept for the probe's training, not in the test images")
        elif label in in_test and label not in in_train:
            notes.append(f"class {name!r} has no image in the probe's training set (too few probe images asked)")
    return notes


@dataclass(frozen=True)
class ModelShape:
    """What must match between the CL model and its untrained control."""

    label: str
    kind: str
    num_layers: int
    num_heads: int | None
    grid: tuple[int, int]
    patch_size: tuple[int, int]

    def describe(self) -> str:
        heads = "no attention heads" if self.num_heads is None else f"{self.num_heads} heads"
        (gh, gw), (ph, pw) = self.grid, self.patch_size
        return f"{self.kind}, {self.num_layers} blocks, {heads}, {gh}×{gw} tokens of {ph}×{pw} px"

    def same_architecture(self, other: ModelShape) -> bool:
        mine = (self.kind, self.num_layers, self.num_heads, self.grid, self.patch_size)
        return mine == (other.kind, other.num_layers, other.num_heads, other.grid, other.patch_size)


def check_control(shapes: Mapping[str, ModelShape], roles: Mapping[str, str]) -> None:
    """Raise ValueError, naming both shapes, when ``roles['control']`` is not the CL model's architecture."""
    cl, control = roles.get("cl"), roles.get("control")
    if cl is None or control is None or cl not in shapes or control not in shapes:
        return
    a, b = shapes[cl], shapes[control]
    if not a.same_architecture(b):
        raise ValueError(
            f"the control {control!r} ({b.describe()}) is not the architecture of the CL model {cl!r} "
            f"({a.describe()}): the control must be an untrained copy of the CL model's architecture"
        )
