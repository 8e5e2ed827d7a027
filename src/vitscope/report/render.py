"""Render a results directory: every figure (PNG + SVG) and the self-contained ``report.html``.

Works from the directory alone (``vitscope analyze --out DIR`` writes it): rows and metadata, the
optional arrays and the optional verdict, all read through :class:`~vitscope.results.RunDirectory`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vitscope.progress import progress_bar
from vitscope.report.claims import ClaimsRecord, ClaimVerdict, Roles, evaluate_claims, load_claims, save_claims
from vitscope.report.explorer import EXPLORER_MAX_BYTES, explorer_html, explorer_models
from vitscope.report.figures import SavedFigure, build_figures, hex_color, model_colors, save_figure
from vitscope.report.html import render_html
from vitscope.report.series import ResultView
from vitscope.results import Results, RunDirectory
from vitscope.rundir import update_run

__all__ = ["render_report", "write_verdict", "roles_from_meta"]


def roles_from_meta(results: Results) -> Roles | None:
    """The roles a run named (``meta['roles']``: cl, mim, control, hybrid), when it names CL and MIM."""
    named = results.meta.get("roles") or {}
    if named.get("cl") and named.get("mim"):
        return Roles(named["cl"], named["mim"], named.get("control"), named.get("hybrid"))
    return None


def write_verdict(out_dir: str | Path, roles: Roles, other_roles: Sequence[Roles] = ()) -> ClaimsRecord:
    """Evaluate the papers' claims on the saved results for ``roles`` (and again for each of
    ``other_roles``, kept as the record's ``others``) and save ``claims.json``."""
    results = RunDirectory(out_dir).check().load_results()
    verdicts = evaluate_claims(results, **vars(roles))
    others = tuple(ClaimsRecord(other, evaluate_claims(results, **vars(other))) for other in other_roles)
    save_claims(out_dir, verdicts, roles, others=others)
    return ClaimsRecord(roles, verdicts, others=others)


def _claims_for(
    out_dir: Path, results: Results, verdicts: list[ClaimVerdict] | None, roles: Roles | None
) -> ClaimsRecord | None:
    """Verdicts given, else ``claims.json``, else evaluated from ``meta['roles']`` when the run names them."""
    if verdicts is not None:
        if roles is None:
            raise ValueError("render_report: verdicts given without the roles they were evaluated for")
        return ClaimsRecord(roles, verdicts)
    saved = load_claims(out_dir)
    if saved is not None:
        return saved
    meta_roles = roles_from_meta(results)
    if meta_roles is not None:
        return ClaimsRecord(meta_roles, evaluate_claims(results, **vars(meta_roles)))
    return None


def _drop_stale_figures(run_dir: RunDirectory, saved: list[tuple[SavedFigure, bytes]]) -> None:
    """Remove figures an earlier render drew that this one did not (e.g. per-pair CKA heatmaps before the grid)."""
    drawn = {path.name for figure, _ in saved for path in (figure.png, figure.svg) if path is not None}
    for path in sorted(run_dir.figure_path("x", "png").parent.glob("*")):
        if path.suffix in (".png", ".svg") and path.name not in drawn:
            path.unlink()


def render_report(
    out_dir: str | Path,
    verdicts: list[ClaimVerdict] | None = None,
    roles: Roles | None = None,
    svg: bool = True,
    explorer_max_bytes: int = EXPLORER_MAX_BYTES,
) -> Path:
    """Draw every figure into ``DIR/figures/`` (PNG, and SVG unless ``svg`` is False) and write
    ``DIR/report.html`` with the PNGs embedded; return its path. The run directory is changed whole or not
    at all (:func:`vitscope.rundir.update_run`).

    The claims table comes from ``verdicts`` (with their ``roles``), else from ``DIR/claims.json``, else
    from ``meta['roles']`` (``{"cl": ..., "mim": ..., "control": ..., "hybrid": ...}``) when present.
    The attention explorer embeds at most ``explorer_max_bytes`` bytes of attention maps (:mod:`.explorer`).
    """
    with update_run(out_dir) as run_dir:  # the committed run changes whole or not at all
        results = run_dir.load_results()
        view = ResultView(results)
        arrays = run_dir.load_arrays()
        claims = _claims_for(run_dir.path, results, verdicts, roles)
        saved = []
        for named in progress_bar(build_figures(view, arrays), desc="figures", unit="fig"):
            figure = save_figure(named, run_dir, svg=svg)
            saved.append((figure, figure.png.read_bytes()))
        _drop_stale_figures(run_dir, saved)
        colors = {model: hex_color(rgba) for model, rgba in model_colors(view.models(), view.roles()).items()}
        maps = explorer_models(view.models(), arrays, colors, explorer_max_bytes)
        explorer = explorer_html(maps, arrays.get("example_images"))
        run_dir.save_report(render_html(view, saved, claims, explorer))
    return RunDirectory(out_dir).report_path
