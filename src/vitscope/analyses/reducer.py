"""The streaming protocol: a :class:`Reducer` consumes one model's layers batch by batch, keeps only
running state, and turns it into tidy rows; :class:`RunningMoments` and :class:`MomentsReducer` are the
mean ± standard error machinery the metric reducers share."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vitscope.capture import LayerOutput
from vitscope.results import Row, make_row

__all__ = ["Reducer", "RunningMoments", "MomentsReducer", "to_cpu", "tensors_to"]


class Reducer:
    """Base class of streaming consumers. Override what you need.

    Call order per batch: ``begin_batch(images, labels)``, ``update(layer)`` for depth 0..L,
    ``end_batch()``. ``rows(model)`` may be called at any time after a batch.

    Before each batch the driver sets ``batch_index`` (the batch's number in the whole run) and
    ``image_offset`` (the run-wide index of its first image), so that a reducer whose result depends on
    which images it saw first (spectra of the first groups, the attention maps of the first image, probe
    features in data order) gives the same result when the batches are shared out between processes.

    Under ``torchrun`` every process feeds its own reducers; then :meth:`state` of each process is
    gathered and rank 0 folds them in with :meth:`merge`, after which its rows are those of one process
    that saw every batch. ``state`` holds plain containers (dict, list, tuple, str, numbers, None) and
    CPU tensors only.

    Between batches :meth:`snapshot` is everything the reducer holds, loadable with
    ``torch.load(weights_only=True)``, and :meth:`restore` continues from it on a fresh reducer with the
    same numbers as if it had never stopped (``vitscope analyze --resume``).
    """

    batch_index: int = 0
    image_offset: int = 0

    def begin_batch(self, images: Tensor, labels: Tensor) -> None:
        pass

    def update(self, layer: LayerOutput) -> None:
        raise NotImplementedError

    def end_batch(self) -> None:
        pass

    def rows(self, model: str) -> list[Row]:
        return []

    def state(self) -> Any:
        """What this process accumulated, for :meth:`merge` on rank 0 (picklable, CPU tensors)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged across processes")

    def merge(self, states: list[Any]) -> None:
        """Fold the :meth:`state` of the other processes into this one."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged across processes")

    def snapshot(self) -> Any:
        """Everything held between batches (default: :meth:`state`); plain containers and CPU tensors."""
        return self.state()

    def restore(self, snapshot: Any, device: str | torch.device = "cpu") -> None:
        """Continue from a :meth:`snapshot`, on a fresh reducer (default: merge it, tensors on ``device``)."""
        self.merge([tensors_to(snapshot, device)])


def tensors_to(value: Any, device: str | torch.device) -> Any:
    """``value`` with every tensor in its containers moved to ``device``."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: tensors_to(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(tensors_to(item, device) for item in value)
    return value


def to_cpu(value: Tensor | None) -> Tensor | None:
    return None if value is None else value.detach().cpu()


class RunningMoments:
    """Streaming mean and sum of squared deviations of per-sample values [n, *shape] (float64).

    Batches are merged with Chan et al.'s pairwise update, which stays exact where
    Σx² − n·mean² would cancel (a large mean with a small spread).
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def update(self, values: Tensor) -> None:
        values = values.detach()
        values = values.to(torch.float32 if values.device.type == "mps" else torch.float64)
        if values.shape[0] == 0:
            return
        batch_mean = values.mean(dim=0)
        self.combine(values.shape[0], batch_mean, (values - batch_mean).square().sum(dim=0))

    def combine(self, count: int, mean: Tensor | None, m2: Tensor | None) -> None:
        """Fold in another stream's moments (Chan et al.'s pairwise update)."""
        if count == 0 or mean is None or m2 is None:
            return
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        mean, m2 = mean.to(self.mean.device, self.mean.dtype), m2.to(self.m2.device, self.m2.dtype)
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * count / total)
        self.count = total

    def result(self) -> tuple[Any, Any | None]:
        """(means, standard errors) as nested lists (a float for scalars); standard errors are None below 2 samples."""
        if self.mean is None or self.m2 is None:
            raise RuntimeError("no values were added")
        mean = self.mean.cpu().tolist()
        if self.count < 2:
            return mean, None
        stderr = (self.m2 / (self.count - 1) / self.count).sqrt().cpu().tolist()
        return mean, stderr


@dataclass(frozen=True)
class _Key:
    metric: str
    layer: int
    column: str | None = None  # None: one value per sample; "head"/"freq"/"index": a vector per sample


class MomentsReducer(Reducer):
    """Base of the metric reducers: running moments per (metric, layer[, column]) and their rows.

    Subclasses list the metric names they can emit in ``names`` and call :meth:`add` from
    :meth:`update`; ``metrics`` restricts what they compute and report.
    """

    names: tuple[str, ...] = ()
    images_per_sample: int = 1  # images behind one sample (k for per-group metrics)

    def __init__(self, metrics: Iterable[str] | None = None) -> None:
        wanted = set(self.names if metrics is None else metrics) & set(self.names)
        if not wanted:
            raise ValueError(f"{type(self).__name__} computes {self.names}; none of them was asked for")
        self.wanted = wanted
        self.moments: dict[_Key, RunningMoments] = {}

    def wants(self, *names: str) -> bool:
        return any(name in self.wanted for name in names)

    def add(self, metric: str, layer: int, values: Tensor, column: str | None = None) -> None:
        """Add per-sample ``values``: [B] (column None) or [B, K] (one value per column entry)."""
        if metric not in self.wanted:
            return
        self.moments.setdefault(_Key(metric, layer, column), RunningMoments()).update(values)

    def add_per_head(self, metric: str, layer: int, values: Tensor) -> None:
        """Add [B, H] values: per head, and their mean over heads as the per-layer value."""
        self.add(metric, layer, values, column="head")
        self.add(metric, layer, values.mean(dim=-1))

    def state(self) -> Any:
        """(metric, layer, column) -> (count, mean, m2)."""
        return {
            (key.metric, key.layer, key.column): (m.count, to_cpu(m.mean), to_cpu(m.m2))
            for key, m in self.moments.items()
        }

    def merge(self, states: list[Any]) -> None:
        for state in states:
            for key, (count, mean, m2) in state.items():
                self.moments.setdefault(_Key(*key), RunningMoments()).combine(count, mean, m2)

    def rows(self, model: str) -> list[Row]:
        order = {name: i for i, name in enumerate(self.names)}
        keys = sorted(
            self.moments, key=lambda k: (order.get(k.metric, len(order)), k.metric, k.layer, k.column is not None)
        )
        rows: list[Row] = []
        for key in keys:
            moments = self.moments[key]
            mean, stderr = moments.result()
            n = moments.count * self.images_per_sample
            if key.column is None:
                rows.append(make_row(model, key.metric, key.layer, mean, stderr=stderr, n=n))
                continue
            for i, value in enumerate(mean):
                err = None if stderr is None else stderr[i]
                if key.column == "head":
                    rows.append(make_row(model, key.metric, key.layer, value, head=i, stderr=err, n=n))
                else:
                    rows.append(make_row(model, key.metric, key.layer, value, stderr=err, n=n, **{key.column: i}))
        return rows
