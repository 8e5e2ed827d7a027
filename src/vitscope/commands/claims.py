"""`vitscope claims DIR [--cl LABEL --mim LABEL ...]`: the papers' findings 1–7 checked on saved results.

The roles default to those the run saved (``meta.roles``, from ``vitscope analyze --cl ... --mim ...`` or the
demo); a flag given overrides that role."""

from __future__ import annotations

import argparse
import sys

from vitscope.analyses.preflight import ModelShape, check_control
from vitscope.commands.common import (
    ROLE_NAMES,
    CommandError,
    check_roles,
    finite_float,
    non_negative_float,
    open_results,
)
from vitscope.report import Roles, Tolerance, evaluate_claims, format_claims_table, save_claims
from vitscope.report.claims import print_warnings, summary_line
from vitscope.report.series import ResultView
from vitscope.results import Results


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", help="results directory written by `vitscope analyze --out DIR`")
    parser.add_argument(
        "--cl", metavar="LABEL", help="the contrastive (CL) model's label (default: the run's meta.roles.cl)"
    )
    parser.add_argument(
        "--mim", metavar="LABEL", help="the masked-image-modeling (MIM) model's label (default: meta.roles.mim)"
    )
    parser.add_argument(
        "--control",
        metavar="LABEL",
        help="an untrained model of the same architecture: tells collapse from near-uniform attention "
        "(default: meta.roles.control)",
    )
    parser.add_argument(
        "--hybrid", metavar="LABEL", help="a model trained with (1 − λ)·L_MIM + λ·L_CL (default: meta.roles.hybrid)"
    )
    parser.add_argument(
        "--rel-tol",
        type=finite_float(0.0, 1.0, high_open=True),
        default=Tolerance.rel,
        help="relative tolerance for 'indistinguishable' and 'near log N' (default: %(default)s)",
    )
    parser.add_argument(
        "--probe-points",
        type=non_negative_float,
        default=Tolerance.probe_points,
        help="points by which CL's probe must beat the control's (default: %(default)s)",
    )
    parser.add_argument("--full", action="store_true", help="print every finding's whole evidence")


def check_labels(results: Results, roles: Roles) -> None:
    """Every role names a model of these results, a different one each; the control has the CL model's
    architecture (when the results keep the models' metadata)."""
    view = ResultView(results)
    check_roles(vars(roles), view.models(), known="a model in these results; available")
    shapes = {label: shape for label in view.models() if (shape := _shape(view, label)) is not None}
    try:
        check_control(shapes, {k: v for k, v in vars(roles).items() if v is not None})
    except ValueError as err:
        raise CommandError(str(err)) from None


def _shape(view: ResultView, label: str) -> ModelShape | None:
    """A model's architecture from ``meta['models']``, or None when the results do not say."""
    info = view.model_meta(label)
    try:
        grid, patch = info["grid"], info["patch_size"]
        return ModelShape(label, info["kind"], int(info["num_layers"]), info.get("num_heads"),
                          (int(grid[0]), int(grid[1])), (int(patch[0]), int(patch[1])))  # fmt: skip
    except (KeyError, TypeError, IndexError, ValueError):
        return None


def roles_of(args: argparse.Namespace, results: Results, source: str) -> Roles:
    """The roles saved in ``meta.roles``, each overridden by its flag; CL and MIM must be named by one of them."""
    saved = results.meta.get("roles") or {}
    named: dict[str, str | None] = {role: getattr(args, role) or saved.get(role) for role in ROLE_NAMES}
    cl, mim = named["cl"], named["mim"]
    missing = [f"--{role}" for role in ("cl", "mim") if not named[role]]
    if missing or cl is None or mim is None:
        raise CommandError(
            f"{source} names no {' and no '.join(r[2:].upper() for r in missing)} model in meta.roles: "
            f"give {' and '.join(m + ' LABEL' for m in missing)}"
        )
    return Roles(cl, mim, named["control"], named["hybrid"])


def run(args: argparse.Namespace) -> int:
    run_dir, results = open_results(args.dir)
    roles = roles_of(args, results, str(run_dir.path / run_dir.METRICS_JSON))
    check_labels(results, roles)
    if not results.meta:
        print(f"note: {run_dir.path / run_dir.METRICS_JSON} is missing: the verdicts rest on {run_dir.METRICS_CSV} "
              "alone, without the models' metadata (token grid, depth)", file=sys.stderr)  # fmt: skip
    tolerance = Tolerance(rel=args.rel_tol, probe_points=args.probe_points)
    verdicts = evaluate_claims(results, **vars(roles), tolerance=tolerance)
    print(format_claims_table(verdicts, full=args.full))
    path = save_claims(args.dir, verdicts, roles, tolerance)
    print(f"wrote {path}")
    print_warnings(verdicts)
    print(summary_line(verdicts, f"report: `vitscope report {args.dir}` shows them in {run_dir.report_path}"))
    return 0
