"""A run's results: tidy rows (:class:`Results`) and the results directory that holds them (:class:`RunDirectory`).

:class:`RunDirectory` is the only reader and writer of the files in a results directory:
``metrics.csv`` and ``metrics.json`` (rows and metadata), ``arrays.npz`` (attention maps, t-SNE
points, localisation maps), ``claims.json`` (the verdict), ``figures/`` (PNG + SVG), ``report.html``
and ``manifest.json`` (the run id and each data file's size and SHA-256, written last). Every file is
written atomically; a committed run (one with a manifest) is changed only through
:mod:`vitscope.rundir`, and what is read from it must match its manifest.

Rows have the columns ``model, metric, layer, head, value, stderr, n`` always (``head`` empty for per-layer values,
``layer`` 0 = patch embedding, 1..L = blocks), plus optional columns a metric needs:
``feature`` (cls/gap), ``band`` (noise band index), ``freq`` (Fourier frequency index), ``index``
(singular value rank), ``other_model`` and ``other_layer`` (CKA).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import time
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitscope.io import atomic_path, write_bytes_atomic, write_json_atomic, write_text_atomic

__all__ = ["BASE_COLUMNS", "EXTRA_COLUMNS", "COLUMNS", "Row", "make_row", "Results", "RunDirectory"]

BASE_COLUMNS = ("model", "metric", "layer", "head", "value", "stderr", "n")
EXTRA_COLUMNS = ("feature", "band", "freq", "index", "other_model", "other_layer")
COLUMNS = BASE_COLUMNS + EXTRA_COLUMNS
INT_COLUMNS = ("layer", "head", "n", "band", "freq", "index", "other_layer")
FLOAT_COLUMNS = ("value", "stderr")

Row = dict[str, Any]


def make_row(
    model: str,
    metric: str,
    layer: int | None,
    value: float,
    *,
    head: int | None = None,
    stderr: float | None = None,
    n: int | None = None,
    **extra: Any,
) -> Row:
    unknown = set(extra) - set(EXTRA_COLUMNS)
    if unknown:
        raise KeyError(f"unknown result columns: {sorted(unknown)}")
    row: Row = {
        "model": model,
        "metric": metric,
        "layer": layer,
        "head": head,
        "value": float(value),
        "stderr": None if stderr is None else float(stderr),
        "n": n,
    }
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

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "rows": [_json_row(r) for r in self.rows]}

    def save(self, out_dir: str | Path, *, overwrite: bool = False) -> None:
        """Write these rows as a committed run in ``out_dir`` (see :func:`vitscope.rundir.save_run`)."""
        from vitscope.rundir import save_run

        save_run(out_dir, self, overwrite=overwrite)

    @classmethod
    def load(cls, out_dir: str | Path) -> Results:
        """Read a results directory's rows (see :meth:`RunDirectory.load_results`)."""
        return RunDirectory(out_dir).load_results()


class RunDirectory:
    """A results directory (``vitscope analyze --out DIR``): the one place its files are read and written.

    Reading a directory with ``manifest.json`` checks each data file read against it (size and SHA-256):
    a file of another run, a missing one or one the manifest does not list is refused naming it.
    Writing is for a staging or update directory (``staged=True``, given out by :mod:`vitscope.rundir`);
    a committed run refuses writes.
    """

    METRICS_CSV = "metrics.csv"
    METRICS_JSON = "metrics.json"
    ARRAYS = "arrays.npz"
    CLAIMS = "claims.json"
    REPORT = "report.html"
    FIGURES = "figures"
    MANIFEST = "manifest.json"
    DATA_FILES = (METRICS_CSV, METRICS_JSON, ARRAYS)

    def __init__(self, path: str | os.PathLike, *, staged: bool = False) -> None:
        self.path = Path(path)
        self.staged = staged
        self._verified: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) checked against the manifest

    def __repr__(self) -> str:
        return f"RunDirectory({str(self.path)!r})"

    def check(self) -> RunDirectory:
        """Raise FileNotFoundError unless this is a directory holding saved results, ValueError (naming the
        file) when a file does not match ``manifest.json``."""
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: no such results directory")
        if not (self.path / self.METRICS_JSON).exists() and not (self.path / self.METRICS_CSV).exists():
            raise FileNotFoundError(
                f"{self.path}: no {self.METRICS_JSON} or {self.METRICS_CSV} "
                f"(run `vitscope analyze --out {self.path}` first)"
            )
        manifest = self.manifest()
        if manifest is not None:
            for name in self.DATA_FILES:
                if name in manifest["files"] or (self.path / name).exists():
                    self.verify(name)
        return self

    # -- manifest ---------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any] | None:
        """``manifest.json`` (run id, written, files: name -> size and sha256), or None when absent."""
        path = self.path / self.MANIFEST
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            if not isinstance(data.get("run_id"), str) or not isinstance(data.get("files"), dict):
                raise ValueError("expected run_id and files")
            for entry in data["files"].values():
                int(entry["size"]), str(entry["sha256"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path}: not a vitscope manifest ({err})") from err
        return data

    @property
    def run_id(self) -> str | None:
        """The id of the run held here (from ``manifest.json``), or None when the directory has no manifest."""
        manifest = self.manifest()
        return None if manifest is None else manifest["run_id"]

    def verify(self, name: str) -> None:
        """Raise ValueError naming ``name`` unless it is the file ``manifest.json`` lists (a directory without
        a manifest is not checked)."""
        manifest = self.manifest()
        if manifest is None:
            return
        path = self.path / name
        expected = manifest["files"].get(name)
        run = manifest["run_id"]
        if expected is None:
            if path.exists():
                raise ValueError(f"{path}: not part of run {run} (not listed in {self.MANIFEST}); this directory "
                                 "mixes runs: analyse again with --overwrite")  # fmt: skip
            return
        if not path.is_file():
            raise ValueError(f"{path}: missing, but {self.MANIFEST} of run {run} lists it; analyse again with "
                             "--overwrite")  # fmt: skip
        stat = path.stat()
        if self._verified.get(name) == (stat.st_size, stat.st_mtime_ns):
            return
        if stat.st_size != expected["size"] or _sha256(path) != expected["sha256"]:
            raise ValueError(f"{path}: not the file run {run} wrote (its size or SHA-256 differs from "
                             f"{self.MANIFEST}); the directory mixes runs: analyse again with --overwrite")  # fmt: skip
        self._verified[name] = (stat.st_size, stat.st_mtime_ns)

    def data_digests(self) -> dict[str, dict[str, Any]]:
        """Size and SHA-256 of each data file present (metrics.csv, metrics.json, arrays.npz)."""
        return {
            name: {"size": (self.path / name).stat().st_size, "sha256": _sha256(self.path / name)}
            for name in self.DATA_FILES
            if (self.path / name).is_file()
        }

    def write_manifest(self, run_id: str) -> Path:
        """``manifest.json``: the run id and every data file's size and SHA-256; written last, it marks the
        run complete."""
        self._require_staged()
        record = {"run_id": run_id, "written": time.strftime("%Y-%m-%d %H:%M:%S"), "files": self.data_digests()}
        path = self.path / self.MANIFEST
        write_json_atomic(path, record)
        return path

    def _require_staged(self) -> None:
        if not self.staged and (self.path / self.MANIFEST).exists():
            raise ValueError(
                f"{self.path} is a committed run: change it through vitscope.rundir.update_run "
                "(`vitscope claims` and `vitscope report` do), or write a new run"
            )

    # -- rows -------------------------------------------------------------------------------------
    def save_results(self, results: Results) -> None:
        """``metrics.csv`` and ``metrics.json`` (rows + meta)."""
        self._require_staged()
        write_text_atomic(self.path / self.METRICS_CSV, results.to_csv_text())
        write_json_atomic(self.path / self.METRICS_JSON, results.to_json())

    def load_results(self) -> Results:
        """``metrics.json`` (preferred, it has the metadata) or ``metrics.csv``."""
        json_path, csv_path = self.path / self.METRICS_JSON, self.path / self.METRICS_CSV
        if json_path.exists():
            self.verify(self.METRICS_JSON)
            try:
                data = json.loads(json_path.read_text())
                return Results([_typed(r) for r in data["rows"]], data.get("meta", {}))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{json_path}: not a vitscope metrics file ({err})") from err
        if csv_path.exists():
            self.verify(self.METRICS_CSV)
            with open(csv_path, newline="") as fh:
                return Results([_typed(r) for r in csv.DictReader(fh)], {})
        raise FileNotFoundError(f"{self.path}: no {self.METRICS_JSON} or {self.METRICS_CSV}")

    # -- arrays -----------------------------------------------------------------------------------
    def save_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        """``arrays.npz`` (compressed; plain arrays only)."""
        self._require_staged()
        with atomic_path(self.path / self.ARRAYS) as tmp, open(tmp, "wb") as fh:
            named: dict[str, Any] = dict(arrays)  # **Mapping[str, ndarray] could also fill allow_pickle: bool
            np.savez_compressed(fh, **named)

    def load_arrays(self) -> dict[str, np.ndarray]:
        """``arrays.npz`` as a dict (empty when absent); no pickled objects are read."""
        path = self.path / self.ARRAYS
        self.verify(self.ARRAYS)
        if not path.exists():
            return {}
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {key: npz[key] for key in npz.files}
        except (ValueError, OSError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path}: cannot read arrays ({err})") from err

    # -- claims -----------------------------------------------------------------------------------
    def save_claims(self, record: Mapping[str, Any]) -> Path:
        """``claims.json``: the verdict as :mod:`vitscope.report.claims` serialises it, with the run id it
        was evaluated on."""
        self._require_staged()
        path = self.path / self.CLAIMS
        write_json_atomic(path, {**dict(record), "run_id": self.run_id})
        return path

    def load_claims(self) -> dict[str, Any] | None:
        """``claims.json`` as a dict, or None when absent; malformed JSON is a ValueError naming the file."""
        path = self.path / self.CLAIMS
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not a vitscope claims file ({err})") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a vitscope claims file (expected an object)")
        return data

    def claims_are_current(self, record: Mapping[str, Any]) -> bool:
        """Whether a ``claims.json`` record was evaluated on this run (always, in a directory without manifest)."""
        run_id = self.run_id
        return run_id is None or record.get("run_id") == run_id

    # -- figures and report -----------------------------------------------------------------------
    def figure_path(self, key: str, fmt: str) -> Path:
        return self.path / self.FIGURES / f"{key}.{fmt}"

    def save_figure(self, key: str, fmt: str, data: bytes) -> Path:
        """``figures/KEY.FMT``."""
        self._require_staged()
        path = self.figure_path(key, fmt)
        write_bytes_atomic(path, data)
        return path

    @property
    def report_path(self) -> Path:
        return self.path / self.REPORT

    def save_report(self, html_text: str) -> Path:
        """``report.html``."""
        self._require_staged()
        write_text_atomic(self.report_path, html_text)
        return self.report_path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _csv_cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value


def _json_row(row: Row) -> Row:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items() if v is not None}


def _typed(raw: dict[str, Any]) -> Row:
    row: Row = dict.fromkeys(COLUMNS)
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
