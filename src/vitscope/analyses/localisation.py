"""Spatial localisation (Raghu et al.): does a deep layer's token at position p still hold the input at p?

:class:`SpatialLocalisation`: for each token position p of a deep layer, its CKA over images with the
patch embedding (depth 0) at every position q, as an [N, h, w] grid per p. A model that keeps spatial
information peaks at q = p. Streamed with the minibatch unbiased HSIC of
:class:`~vitscope.analyses.cka.CKAAccumulator`, vectorised over positions (one [N, b²] × [b², N]
matmul per batch).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

from vitscope.analyses.cka import CKAAccumulator
from vitscope.analyses.driver import run_reducers
from vitscope.analyses.reducer import Reducer
from vitscope.capture import Capture, LayerOutput
from vitscope.data import Batch
from vitscope.results import Row, make_row

__all__ = ["SpatialLocalisation", "spatial_localisation"]


class SpatialLocalisation(Reducer):
    """CKA over images between each position of a deep layer and every position of depth 0.

    Args:
        depth: the deep layer (default: the last depth the capture yields).
        dtype: accumulation dtype.
    """

    def __init__(self, depth: int | None = None, *, dtype: torch.dtype = torch.float64) -> None:
        self.depth = depth
        self.accumulator = CKAAccumulator("linear", dtype=dtype)
        self.grid: tuple[int, int] | None = None
        self.measured_depth: int | None = None
        self._batch_size = 0
        self._base: Tensor | None = None  # depth 0, [N, b²]
        self._deep: Tensor | None = None  # chosen depth, [N, b²] (or its tokens when depth is None)
        self._deep_depth: int | None = None

    def _centred(self, layer: LayerOutput) -> Tensor:
        per_position = layer.spatial_tokens.detach().transpose(0, 1)  # [N, b, C]
        return self.accumulator.centred_grams(per_position)

    def begin_batch(self, images: Tensor, labels: Tensor) -> None:
        self._batch_size = int(images.shape[0])
        self._base = self._deep = None
        self._deep_depth = None

    def update(self, layer: LayerOutput) -> None:
        if self._batch_size < 4:
            return
        if layer.depth == 0:
            self._base = self._centred(layer)
            if self.grid is None:
                self.grid = layer.grid
        elif self.depth is None:  # keep the latest depth's tokens; centred at end_batch
            self._deep, self._deep_depth = layer.spatial_tokens.detach().clone(), layer.depth
        elif layer.depth == self.depth:
            self._deep, self._deep_depth = self._centred(layer), layer.depth

    def end_batch(self) -> None:
        if self._batch_size < 4:
            self.accumulator.skip_batch(self._batch_size)
            return
        if self._base is None or self._deep is None:
            raise RuntimeError(f"spatial localisation: the capture fed no depth 0 or no depth {self.depth}")
        deep = self._deep
        if self.depth is None:
            deep = self.accumulator.centred_grams(deep.transpose(0, 1))
        if deep.shape[0] != self._base.shape[0]:
            raise RuntimeError(
                f"depth {self._deep_depth} has {deep.shape[0]} positions, depth 0 has {self._base.shape[0]}"
            )
        self.measured_depth = self._deep_depth
        self.accumulator.update_centred(deep, self._base)
        self._base = self._deep = None

    def state(self) -> dict:
        return {"accumulator": self.accumulator.state(), "grid": self.grid, "depth": self.measured_depth}

    def merge(self, states: list[dict]) -> None:
        self.accumulator.merge([state["accumulator"] for state in states])
        for state in states:
            self.grid = self.grid or state["grid"]
            self.measured_depth = self.measured_depth or state["depth"]

    def maps(self) -> np.ndarray:
        """[N, h, w]: for each deep position p (row-major), CKA with depth 0 at every grid cell."""
        if self.grid is None:
            raise RuntimeError("spatial localisation: no batch accumulated")
        h, w = self.grid
        return self.accumulator.matrix().reshape(-1, h, w).numpy()

    def rows(self, model: str) -> list[Row]:
        """Summary rows at the deep layer: ``spatial_self_cka`` (mean CKA of a position with itself)
        and ``spatial_peak_hit`` (fraction of positions whose best match is their own position)."""
        if self.accumulator.num_batches == 0:
            return []
        matrix = self.accumulator.matrix()
        n = self.accumulator.num_examples
        own = matrix.diagonal()
        hits = (matrix.argmax(dim=1) == torch.arange(matrix.shape[0])).double().mean()
        return [
            make_row(model, "spatial_self_cka", self.measured_depth, float(own.mean()), n=n),
            make_row(model, "spatial_peak_hit", self.measured_depth, float(hits), n=n),
        ]


def spatial_localisation(
    capture: Capture,
    batches: Iterable[Batch],
    *,
    depth: int | None = None,
    device: str | torch.device = "cpu",
    progress: str | None = "localisation",
) -> np.ndarray:
    """Run :class:`SpatialLocalisation` over ``batches``; returns the [N, h, w] maps."""
    reducer = SpatialLocalisation(depth)
    run_reducers(capture, batches, [reducer], device=device, progress=progress)
    return reducer.maps()
