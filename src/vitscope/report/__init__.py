"""Reporting on saved results: figures, the self-contained HTML report and the claims verdict.

Works from a results directory alone (``vitscope analyze --out DIR`` writes it):
``metrics.json``/``metrics.csv``, optional ``arrays.npz`` and optional ``claims.json``.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vitscope.io import write_text_atomic
from vitscope.report.claims import (ClaimsRecord, ClaimVerdict, Roles, Tolerance, evaluate_claims,
                                    format_claims_table, load_claims, save_claims)
from vitscope.report.figures import build_figures, save_figure
from vitscope.report.html import SECTIONS, render_html
from vitscope.report.series import ResultView
from vitscope.results import Results

__all__ = ["ClaimsRecord", "ClaimVerdict", "Roles", "Tolerance", "SECTIONS", "evaluate_claims", "format_claims_table",
           "load_arrays", "load_claims", "render_report", "save_claims"]

REPORT_FILE = "report.html"
FIGURE_DIR = "figures"


def load_arrays(out_dir: str | Path) -> dict[str, np.ndarray]:
    """``DIR/arrays.npz`` as a dict (empty when the file is absent); no pickled objects are read."""
    path = Path(out_dir) / "arrays.npz"
    if not path.exists():
        return {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: cannot read arrays ({err})") from err


def _claims_for(out_dir: Path, results: Results, verdicts: list[ClaimVerdict] | None,
                roles: Roles | None) -> ClaimsRecord | None:
    """Verdicts given, else ``claims.json``, else evaluated from ``meta['roles']`` when the run names them."""
    if verdicts is not None:
        if roles is None:
            raise ValueError("render_report: verdicts given without the roles they were evaluated for")
        return ClaimsRecord(roles, verdicts)
    saved = load_claims(out_dir)
    if saved is not None:
        return saved
    named = results.meta.get("roles") or {}
    if named.get("cl") and named.get("mim"):
        meta_roles = Roles(named["cl"], named["mim"], named.get("control"), named.get("hybrid"))
        return ClaimsRecord(meta_roles, evaluate_claims(results, **vars(meta_roles)))
    return None


def render_report(out_dir: str | Path, verdicts: list[ClaimVerdict] | None = None,
                  roles: Roles | None = None, svg: bool = True) -> Path:
    """Draw every figure into ``DIR/figures/`` (PNG, and SVG unless ``svg`` is False) and write
    ``DIR/report.html`` with the PNGs embedded; return its path.

    The claims table comes from ``verdicts`` (with their ``roles``), else from ``DIR/claims.json``, else
    from ``meta['roles']`` (``{"cl": ..., "mim": ..., "control": ..., "hybrid": ...}``) when present.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"{out}: no such results directory")
    results = Results.load(out)
    view = ResultView(results)
    arrays = load_arrays(out)
    claims = _claims_for(out, results, verdicts, roles)
    saved = []
    for named in tqdm(build_figures(view, arrays), desc="figures", unit="fig", leave=False):
        figure = save_figure(named, out / FIGURE_DIR, svg=svg)
        saved.append((figure, figure.png.read_bytes()))
    path = out / REPORT_FILE
    write_text_atomic(path, render_html(view, saved, claims))
    return path
