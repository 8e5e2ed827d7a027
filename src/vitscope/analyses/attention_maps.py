"""Attention maps to look at: the head-averaged attention of a few query tokens of one image, per block."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from vitscope.analyses.reducer import Reducer
from vitscope.capture import LayerOutput

__all__ = ["AttentionMaps"]


class AttentionMaps(Reducer):
    """Head-averaged spatial attention of a few query tokens of the run's first image, per block.

    Keeps [L, Q, h, w] floats (Q ≤ 4 query positions spread over the grid: centre first). The first
    image is the one at run-wide position 0, whichever process sees it.
    """

    def __init__(self, num_queries: int = 3) -> None:
        self.num_queries = num_queries
        self.maps: list[Tensor] = []
        self.queries: list[tuple[int, int]] = []
        self._active = True

    def begin_batch(self, images: Tensor, labels: Tensor) -> None:
        self._active = not self.maps and self.image_offset == 0

    def update(self, layer: LayerOutput) -> None:
        attn = layer.spatial_attn
        if not self._active or attn is None:
            return
        h, w = layer.grid
        if not self.queries:
            spots = [(h // 2, w // 2), (h // 4, w // 4), (3 * h // 4, 3 * w // 4), (h // 4, 3 * w // 4)]
            self.queries = spots[: self.num_queries]
        if layer.window is not None:  # attention within windows: no whole-grid map to show (drawn blank)
            self.maps.append(torch.full((len(self.queries), h, w), float("nan")))
            return
        rows = torch.tensor([r * w + c for r, c in self.queries], device=attn.device)
        self.maps.append(attn[0].float().mean(dim=0)[rows].reshape(len(rows), h, w).cpu())

    def end_batch(self) -> None:
        self._active = False

    def state(self) -> dict:
        return {"maps": self.maps, "queries": self.queries}

    def merge(self, states: list[dict]) -> None:
        for state in states:
            if not self.maps and state["maps"]:
                self.maps, self.queries = state["maps"], [tuple(q) for q in state["queries"]]

    def restore(self, snapshot: dict, device: str | torch.device = "cpu") -> None:
        self.merge([snapshot])  # the maps stay on the CPU, where update() puts them

    def arrays(self, label: str) -> dict[str, np.ndarray]:
        if not self.maps:
            return {}
        return {
            f"{label}/attention_maps": torch.stack(self.maps).numpy(),
            f"{label}/query_positions": np.array(self.queries, dtype=np.int64),
        }
