"""Streaming: one forward pass per batch feeds every reducer; nothing per image is kept.

A :class:`Reducer` consumes one model's :class:`~vitscope.capture.LayerOutput` s, batch by batch,
and turns what it accumulated into tidy rows (see :mod:`vitscope.results`). :func:`run_reducers`
drives a capture over a loader and hands each depth to every reducer, so all metrics share one pass.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from vitscope.capture import Capture, LayerOutput
from vitscope.data import Batch, SkipCounter
from vitscope.results import Row


class Reducer:
    """Base class of streaming consumers. Override what you need.

    Call order per batch: ``begin_batch(images, labels)``, ``update(layer)`` for depth 0..L,
    ``end_batch()``. ``rows(model)`` may be called at any time after a batch.
    """

    def begin_batch(self, images: Tensor, labels: Tensor) -> None:
        pass

    def update(self, layer: LayerOutput) -> None:
        raise NotImplementedError

    def end_batch(self) -> None:
        pass

    def rows(self, model: str) -> list[Row]:
        return []


def run_reducers(capture: Capture, batches: Iterable[Batch], reducers: Sequence[Reducer], *,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 skips: SkipCounter | None = None, progress: str | None = "capture") -> int:
    """Run ``capture`` once per batch, feeding every reducer. Returns the number of images seen.

    Images are moved to ``device`` (and cast to ``dtype`` under autocast on CUDA when given).
    Skipped files are added to ``skips``.
    """
    seen = 0

    def feed(layer: LayerOutput) -> None:
        for reducer in reducers:
            reducer.update(layer)

    iterator = tqdm(batches, desc=progress, unit="batch", disable=progress is None, leave=False)
    for batch in iterator:
        if skips is not None:
            skips.update(batch)
        if len(batch.images) == 0:
            continue
        images = batch.images.to(device)
        labels = batch.labels.to(device)
        for reducer in reducers:
            reducer.begin_batch(images, labels)
        if dtype is not None and torch.device(device).type == "cuda":
            with torch.autocast("cuda", dtype=dtype):
                capture.run(images, feed)
        else:
            capture.run(images, feed)
        for reducer in reducers:
            reducer.end_batch()
        seen += len(images)
    return seen
