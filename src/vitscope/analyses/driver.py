"""The one driver: every model's capture runs once per batch and feeds all of that model's reducers.

:func:`run_lockstep` walks the batches once; for each batch every :class:`ModelPass` (a model's
capture, its reducers and which view of the batch it reads) runs one forward pass, and each depth the
capture yields is handed to each of its reducers. Models see the same images in the same order, so
cross-model reducers (CKA between two models) pair their batches. :func:`run_reducers` is the
one-model case.

Per batch and model the call order is ``begin_batch(images, labels)``, ``update(layer)`` for depth
0..L, ``end_batch()`` (see :class:`~vitscope.analyses.reducer.Reducer`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from vitscope.analyses.reducer import Reducer
from vitscope.capture import Capture, LayerOutput
from vitscope.data import Batch, SkipCounter
from vitscope.progress import progress_bar

__all__ = ["ModelPass", "run_lockstep", "run_reducers", "as_batches"]


@dataclass
class ModelPass:
    """One model in a lockstep pass: its capture, the reducers it feeds and the view of each batch it reads
    (models with different input pipelines read different views of the same images)."""

    label: str
    capture: Capture
    reducers: list[Reducer] = field(default_factory=list)
    view: int = 0
    image_hw: tuple[int, int] | None = None  # the input size seen, set by the first batch
    layouts: dict[int, tuple[tuple[int, int], tuple[int, int] | None]] = field(default_factory=dict)
    # depth -> (token grid, attention window or None), as the first batch showed them


def as_batches(loader: Iterable) -> Iterable[list[Batch]]:
    """Each item of ``loader`` as a list of views: a :class:`Batch`, a list of them (one per view),
    an (images, labels) pair or a bare image tensor (labels −1)."""
    for item in loader:
        if isinstance(item, Batch):
            yield [item]
        elif isinstance(item, list) and item and all(isinstance(view, Batch) for view in item):
            yield item
        elif isinstance(item, Tensor):
            yield [Batch(item, torch.full((len(item),), -1, dtype=torch.long))]
        elif isinstance(item, (tuple, list)) and len(item) >= 2 and isinstance(item[0], Tensor):
            yield [Batch(item[0], torch.as_tensor(item[1]))]
        else:
            raise TypeError(
                f"loader yielded {type(item).__name__}; expected Batch, a list of Batch (views), "
                "(images, labels) or a tensor"
            )


def _run_one(
    model: ModelPass, batch: Batch, position: tuple[int, int], device: str | torch.device, dtype: torch.dtype | None
) -> None:
    images = batch.images.to(device, non_blocking=True)
    labels = batch.labels.to(device, non_blocking=True)
    model.image_hw = model.image_hw or (int(images.shape[-2]), int(images.shape[-1]))
    reducers = model.reducers

    def feed(layer: LayerOutput) -> None:
        if layer.depth not in model.layouts:
            model.layouts[layer.depth] = (layer.grid, layer.window)
        for reducer in reducers:
            reducer.update(layer)

    for reducer in reducers:
        reducer.batch_index, reducer.image_offset = position
        reducer.begin_batch(images, labels)
    if dtype is not None:
        with torch.autocast(torch.device(device).type, dtype=dtype):
            model.capture.run(images, feed)
    else:
        model.capture.run(images, feed)
    for reducer in reducers:
        reducer.end_batch()


def run_lockstep(
    models: Sequence[ModelPass],
    loader: Iterable,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    skips: SkipCounter | None = None,
    progress: str | None = "analyse",
    after_batch: Callable[[int, int], None] | None = None,
) -> int:
    """One pass over ``loader``: every model runs on every batch, feeding its reducers. Returns the number
    of images seen (per model).

    Args:
        models: the models with their captures and reducers.
        loader: yields batches (see :func:`as_batches`); with several views, model ``m`` reads
            ``views[m.view]``.
        device: where images go (models must already be there).
        dtype: autocast dtype of the forward pass (bf16; fp16 on CUDA); every reduction still runs in float32 or
            float64.
        skips: collects the unreadable files the batches report.
        progress: tqdm description, or None for no bar (one bar in images, with images/s and the time
            left; under torchrun it counts this process's images times the number of processes).
        after_batch: called after every batch (with no reducer inside a batch) with the batch's run-wide
            number and the images seen so far: where a checkpoint can be taken.
    """
    seen = 0
    sampler = getattr(loader, "sampler", None)
    share = int(getattr(sampler, "world", 1) or 1)  # this process sees one batch in `share`: show the run's pace
    bar = progress_bar(total=getattr(loader, "total_images", None), desc=progress, unit="img",
                       enabled=progress is not None)  # fmt: skip
    with bar:
        for number, views in enumerate(as_batches(loader)):
            if skips is not None:
                skips.update(views[0])
            first = views[0]
            if len(first.images):
                position = (first.index if first.index >= 0 else number, first.offset if first.offset >= 0 else seen)
                for model in models:
                    _run_one(model, views[model.view], position, device, dtype)
                seen += len(first.images)
                bar.update(len(first.images) * share)
            if after_batch is not None:
                after_batch(first.index if first.index >= 0 else number, seen)
    return seen


def run_reducers(
    capture: Capture,
    loader: Iterable,
    reducers: Sequence[Reducer],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    skips: SkipCounter | None = None,
    progress: str | None = "capture",
) -> int:
    """:func:`run_lockstep` for one model: run ``capture`` once per batch, feeding every reducer."""
    return run_lockstep(
        [ModelPass("model", capture, list(reducers))],
        loader,
        device=device,
        dtype=dtype,
        skips=skips,
        progress=progress,
    )
