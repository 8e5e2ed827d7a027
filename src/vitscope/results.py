"""Tidy results: one row per (model, metric, layer, head, ...) value, saved as CSV and JSON.

Columns: ``model, metric, layer, head, value, stderr, n`` always (``head`` empty for per-layer values,
``layer`` 0 = patch embedding, 1..L = blocks), plus optional columns a metric needs:
``feature`` (cls/gap), ``band`` (noise band index), ``freq`` (Fourier frequency index), ``index``
(singular value rank), ``other_model`` and ``other_layer`` (CKA).
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from vitscope.io import write_json_atomic, write_text_atomic

BASE_COLUMNS = ("model", "metric", "layer", "head", "value", "stderr", "n")
EXTRA_COLUMNS = ("feature", "band", "freq", "index", "other_model", "other_layer")
COLUMNS = BASE_COLUMNS + EXTRA_COLUMNS
INT_COLUMNS = ("layer", "head", "n", "band", "freq", "index", "other_layer")
FLOAT_COLUMNS = ("value", "stderr")

Row = dict[str, Any]


def make_row(model: str, metric: str, layer: int | None, value: float, *, head: int | None = None,
             stderr: float | None = None, n: int | None = None, **extra: Any) -> Row:
    unknown = set(extra) - set(EXTRA_COLUMNS)
    if unknown:
        raise KeyError(f"unknown result columns: {sorted(unknown)}")
    row: Row = {"model": model, "metric": metric, "layer": layer, "head": head, "value": float(value),
                "stderr": None if stderr is None else float(stderr), "n": n}
    row.update(extra)
    return row


@dataclass
class Results:
    """A list of tidy rows plus run metadata."""

    rows: list[Row] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def extend(self, rows: Iterable[Row]) -> None:
        self.rows.extend(rows)

    def select(self, **where: Any) -> list[Row]:
        return [row for row in self.rows if all(row.get(k) == v for k, v in where.items())]

    def value(self, **where: Any) -> float:
        matches = self.select(**where)
        if len(matches) != 1:
            raise KeyError(f"{len(matches)} rows match {where}, expected 1")
        return float(matches[0]["value"])

    def models(self) -> list[str]:
        return list(dict.fromkeys(row["model"] for row in self.rows))

    def to_csv_text(self) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: _csv_cell(row.get(k)) for k in COLUMNS})
        return buffer.getvalue()

    def save(self, out_dir: str | Path) -> None:
        """Write ``metrics.csv`` and ``metrics.json`` (rows + meta) atomically."""
        out = Path(out_dir)
        write_text_atomic(out / "metrics.csv", self.to_csv_text())
        write_json_atomic(out / "metrics.json", {"meta": self.meta, "rows": [_json_row(r) for r in self.rows]})

    @classmethod
    def load(cls, out_dir: str | Path) -> "Results":
        """Read ``metrics.json`` (preferred) or ``metrics.csv`` from ``out_dir``."""
        out = Path(out_dir)
        if (out / "metrics.json").exists():
            data = json.loads((out / "metrics.json").read_text())
            return cls([_typed(r) for r in data["rows"]], data.get("meta", {}))
        if (out / "metrics.csv").exists():
            with open(out / "metrics.csv", newline="") as fh:
                return cls([_typed(r) for r in csv.DictReader(fh)], {})
        raise FileNotFoundError(f"{out}: no metrics.json or metrics.csv")


def _csv_cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value


def _json_row(row: Row) -> Row:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items() if v is not None}


def _typed(raw: dict[str, Any]) -> Row:
    row: Row = {k: None for k in COLUMNS}
    for key, value in raw.items():
        if value in ("", None):
            row[key] = None
        elif key in INT_COLUMNS:
            row[key] = int(float(value))
        elif key in FLOAT_COLUMNS:
            row[key] = float(value)
        else:
            row[key] = value
    return row
