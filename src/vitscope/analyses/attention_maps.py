"""Attention maps to explore: every head's attention of every query token, per block, for the first few images.

Kept compactly for the report's attention explorer: each attention row (one query's distribution over
the h·w keys) is quantised to uint8 relative to its own maximum, and the maximum is kept as float16, so
a row costs N + 2 bytes instead of 4·N (dequantised: ``rows / 255 * peaks``; error ≤ peak / 510).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from vitscope.analyses.reducer import Reducer
from vitscope.capture import LayerOutput

__all__ = ["AttentionMaps", "MAX_MAP_TOKENS", "quantise_rows"]

MAX_MAP_TOKENS = 1024  # blocks attending over more spatial tokens (a 32×32 grid) are not stored: N² per head


def quantise_rows(attn: Tensor) -> tuple[Tensor, Tensor]:
    """attn [..., N] (rows of attention) -> (uint8 [..., N] scaled to each row's maximum, float16 peaks [...])."""
    attn = attn.float()
    peaks = attn.amax(dim=-1)
    scaled = attn / peaks.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    return (scaled * 255).round().clamp(0, 255).to(torch.uint8), peaks.half()


class AttentionMaps(Reducer):
    """Per-head spatial attention [H, N, N] of the run's first ``num_images`` images, per global-attention block.

    Images are the run-wide positions 0..num_images−1, whichever process sees them. Blocks that attend
    within windows (Swin, SAM) or on a grid other than the first attending block's, or over more than
    :data:`MAX_MAP_TOKENS` tokens, are left out (``attention_blocks`` lists the depths kept).
    """

    def __init__(self, num_images: int = 2) -> None:
        self.num_images = num_images
        self.quantised: dict[int, dict[int, Tensor]] = {}  # image -> depth -> uint8 [H, N, N]
        self.peaks: dict[int, dict[int, Tensor]] = {}  # image -> depth -> float16 [H, N]
        self.grid: tuple[int, int] | None = None
        self._take: list[tuple[int, int]] = []  # (index in batch, run-wide image index)

    def begin_batch(self, images: Tensor, labels: Tensor) -> None:
        last = min(len(images), self.num_images - self.image_offset)
        self._take = [(i, self.image_offset + i) for i in range(max(last, 0))]

    def update(self, layer: LayerOutput) -> None:
        attn = layer.spatial_attn
        if not self._take or attn is None or layer.window is not None:
            return
        h, w = layer.grid
        if self.grid is None:
            self.grid = (h, w)
        if (h, w) != self.grid or h * w > MAX_MAP_TOKENS:
            return
        for index, image in self._take:
            rows, peaks = quantise_rows(attn[index].detach())
            self.quantised.setdefault(image, {})[layer.depth] = rows.cpu()
            self.peaks.setdefault(image, {})[layer.depth] = peaks.cpu()

    def end_batch(self) -> None:
        self._take = []

    def state(self) -> dict:
        return {"quantised": self.quantised, "peaks": self.peaks, "grid": self.grid}

    def merge(self, states: list[dict]) -> None:
        for state in states:
            if "quantised" not in state:  # a checkpoint of the earlier head-averaged maps: nothing to explore
                continue
            for image, by_depth in state["quantised"].items():
                self.quantised.setdefault(int(image), {}).update(by_depth)
                self.peaks.setdefault(int(image), {}).update(state["peaks"][image])
            if self.grid is None and state["grid"] is not None:
                self.grid = (int(state["grid"][0]), int(state["grid"][1]))

    def restore(self, snapshot: dict, device: str | torch.device = "cpu") -> None:
        self.merge([snapshot])  # the maps stay on the CPU, where update() puts them

    def arrays(self, label: str) -> dict[str, np.ndarray]:
        """``LABEL/attention_rows`` uint8 [I, B, H, N, N], ``LABEL/attention_peaks`` float16 [I, B, H, N],
        ``LABEL/attention_blocks`` [B] (depths 1..L), ``LABEL/attention_grid`` [2] (h, w)."""
        images = sorted(self.quantised)
        if not images or self.grid is None:
            return {}
        depths = sorted(set.intersection(*(set(self.quantised[i]) for i in images)))
        if not depths:
            return {}
        rows = [torch.stack([self.quantised[i][d] for d in depths]) for i in images]
        peaks = [torch.stack([self.peaks[i][d] for d in depths]) for i in images]
        return {
            f"{label}/attention_rows": torch.stack(rows).numpy(),
            f"{label}/attention_peaks": torch.stack(peaks).numpy(),
            f"{label}/attention_blocks": np.array(depths, dtype=np.int64),
            f"{label}/attention_grid": np.array(self.grid, dtype=np.int64),
        }
