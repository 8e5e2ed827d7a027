"""Read curves out of tidy results: per-layer series, per-head points, depth ranges, model order.

Everything the figures and the claims need from ``metrics.json`` goes through :class:`ResultView`,
which indexes the rows once by (model, metric).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from vitscope.results import Results, Row
from vitscope.runmeta import RunMeta, models_of


@dataclass(frozen=True)
class Series:
    """One model's per-layer curve: ``layers`` ascending, ``values`` and ``stderr`` (NaN when unknown)."""

    layers: np.ndarray
    values: np.ndarray
    stderr: np.ndarray

    def __len__(self) -> int:
        return len(self.layers)

    def at(self, layers: Iterable[int]) -> Series:
        keep = np.isin(self.layers, list(layers))
        return Series(self.layers[keep], self.values[keep], self.stderr[keep])


class ResultView:
    """Rows of a :class:`Results` indexed by (model, metric), plus the run metadata."""

    def __init__(self, results: Results) -> None:
        self.results = results
        self.meta: dict[str, Any] = RunMeta.from_dict(results.meta).as_dict()  # older shapes read as today's
        self._rows: dict[tuple[str, str], list[Row]] = defaultdict(list)
        for row in results.rows:  # a value saved as NaN comes back empty: not a measurement
            if row.get("value") is not None and not math.isnan(row["value"]):
                self._rows[(row["model"], row["metric"])].append(row)

    # -- models ---------------------------------------------------------------------------------
    def models(self) -> list[str]:
        """Model labels: those in ``meta['models']`` (in order), then any others found in rows."""
        ordered = list(models_of(self.meta))
        return ordered + [m for m in self.results.models() if m not in ordered]

    def roles(self) -> dict[str, str]:
        """role (cl, mim, control, hybrid) -> model label, as ``meta['roles']`` names them."""
        named = self.meta.get("roles") or {}
        return {role: label for role, label in named.items() if isinstance(label, str) and label}

    def model_meta(self, model: str) -> dict[str, Any]:
        """The model's entry of ``meta['models']``, the fields the run did not record left out."""
        info = models_of(self.meta).get(model)
        return {k: v for k, v in info.as_dict().items() if v is not None} if info is not None else {}

    def num_layers(self, model: str) -> int | None:
        """Number of blocks: ``meta`` first, else the deepest layer in the rows."""
        declared = self.model_meta(model).get("num_layers")
        if declared:
            return int(declared)
        layers = [
            r["layer"] for (m, _), rows in self._rows.items() if m == model for r in rows if r.get("layer") is not None
        ]
        return max(layers) if layers else None

    def attention_keys(self, model: str) -> int | None:
        """Keys per attention row in the model's last attending block: the window's tokens for windowed
        attention (Swin, SAM), else the grid's N = h·w (uniform attention has entropy log of this)."""
        keys = [k for k in self.model_meta(model).get("attention_keys") or [] if k]
        return int(keys[-1]) if keys else self.num_spatial_tokens(model)

    def num_spatial_tokens(self, model: str) -> int | None:
        """N = h·w spatial tokens of the last layer (from the grid, else ``num_tokens``)."""
        info = self.model_meta(model)
        grid = info.get("grid")
        if grid and len(grid) == 2:
            return int(grid[0]) * int(grid[1])
        return int(info["num_tokens"]) if info.get("num_tokens") else None

    # -- rows -----------------------------------------------------------------------------------
    def rows(self, model: str, metric: str, **where: Any) -> list[Row]:
        return [r for r in self._rows.get((model, metric), []) if all(r.get(k) == v for k, v in where.items())]

    def has(self, model: str, metric: str) -> bool:
        return bool(self._rows.get((model, metric)))

    def series(self, model: str, metric: str, **where: Any) -> Series:
        """Per-layer values (``head`` empty) of ``metric`` for ``model``, sorted by layer."""
        rows = [r for r in self.rows(model, metric, head=None, **where) if r.get("layer") is not None]
        return _to_series(rows)

    def head_points(self, model: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-head values as (layers, values) arrays, for scatter plots."""
        rows = [r for r in self.rows(model, metric) if r.get("head") is not None and r.get("layer") is not None]
        return (np.array([r["layer"] for r in rows], dtype=float), np.array([r["value"] for r in rows], dtype=float))

    def indexed(self, model: str, metric: str, column: str, **where: Any) -> dict[int, np.ndarray]:
        """layer -> values ordered by ``column`` (``freq`` or ``index``) for curve-per-layer metrics."""
        by_layer: dict[int, list[tuple[int, float]]] = defaultdict(list)
        for r in self.rows(model, metric, **where):
            if r.get(column) is not None and r.get("layer") is not None:
                by_layer[int(r["layer"])].append((int(r[column]), float(r["value"])))
        return {layer: np.array([v for _, v in sorted(pairs)]) for layer, pairs in sorted(by_layer.items())}

    def noise_curve(self, model: str) -> tuple[np.ndarray, np.ndarray]:
        """(bands, accuracy drops) of ``noise_drop``; the deepest layer's row wins if several exist."""
        chosen: dict[int, Row] = {}
        for r in self.rows(model, "noise_drop"):
            if r.get("band") is None:
                continue
            band, old = int(r["band"]), chosen.get(int(r["band"]))
            if old is None or _depth_key(r) > _depth_key(old):
                chosen[band] = r
        bands = sorted(chosen)
        return np.array(bands, dtype=int), np.array([chosen[b]["value"] for b in bands], dtype=float)

    def cka_pairs(self) -> list[tuple[str, str]]:
        pairs: dict[tuple[str, str], None] = {}
        for model in self.models():
            for r in self.rows(model, "cka"):
                if r.get("other_model") is not None:
                    pairs[(model, r["other_model"])] = None
        return list(pairs)

    def cka_matrix(self, model: str, other: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(layers of ``model``, layers of ``other``, matrix[i, j]) with NaN where a pair is missing."""
        rows = [
            r
            for r in self.rows(model, "cka", other_model=other)
            if r.get("layer") is not None and r.get("other_layer") is not None
        ]
        rows_layers = np.array(sorted({int(r["layer"]) for r in rows}), dtype=int)
        cols_layers = np.array(sorted({int(r["other_layer"]) for r in rows}), dtype=int)
        matrix = np.full((len(rows_layers), len(cols_layers)), np.nan)
        row_pos = {v: i for i, v in enumerate(rows_layers)}
        col_pos = {v: i for i, v in enumerate(cols_layers)}
        for r in rows:
            matrix[row_pos[int(r["layer"])], col_pos[int(r["other_layer"])]] = float(r["value"])
        return rows_layers, cols_layers, matrix

    def percent_scale(self, metric: str) -> float:
        """100 when ``metric`` (an accuracy) is stored as fractions (all |v| ≤ 1), else 1."""
        values = [abs(r["value"]) for m in self.models() for r in self.rows(m, metric)]
        return 100.0 if values and max(values) <= 1.0 else 1.0


def _depth_key(row: Row) -> float:
    return math.inf if row.get("layer") is None else float(row["layer"])


def _to_series(rows: list[Row]) -> Series:
    rows = sorted(rows, key=lambda r: r["layer"])
    return Series(
        layers=np.array([r["layer"] for r in rows], dtype=int),
        values=np.array([r["value"] for r in rows], dtype=float),
        stderr=np.array([np.nan if r.get("stderr") is None else r["stderr"] for r in rows], dtype=float),
    )


def thirds(num_layers: int) -> tuple[list[int], list[int]]:
    """(early, late) blocks: the first and the last third of blocks 1..L (at least one block each)."""
    k = max(1, round(num_layers / 3))
    return list(range(1, k + 1)), list(range(num_layers - k + 1, num_layers + 1))
