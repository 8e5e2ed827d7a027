"""`vitscope claims DIR --cl LABEL --mim LABEL`: the papers' findings 1–7 checked on saved results."""

from __future__ import annotations

import argparse

from vitscope.commands.common import CommandError, open_results
from vitscope.report import Roles, Tolerance, evaluate_claims, format_claims_table, save_claims
from vitscope.report.series import ResultView
from vitscope.results import Results


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", help="results directory written by `vitscope analyze --out DIR`")
    parser.add_argument("--cl", required=True, metavar="LABEL", help="the contrastive (CL) model's label")
    parser.add_argument("--mim", required=True, metavar="LABEL", help="the masked-image-modeling (MIM) model's label")
    parser.add_argument(
        "--control",
        metavar="LABEL",
        help="an untrained model of the same architecture: tells collapse from near-uniform attention",
    )
    parser.add_argument("--hybrid", metavar="LABEL", help="a model trained with (1 − λ)·L_MIM + λ·L_CL")
    parser.add_argument(
        "--rel-tol",
        type=float,
        default=Tolerance.rel,
        help="relative tolerance for 'indistinguishable' and 'near log N' (default: %(default)s)",
    )
    parser.add_argument(
        "--probe-points",
        type=float,
        default=Tolerance.probe_points,
        help="points by which CL's probe must beat the control's (default: %(default)s)",
    )


def check_labels(results: Results, roles: Roles) -> None:
    known = ResultView(results).models()
    for role, label in vars(roles).items():
        if label is not None and label not in known:
            raise CommandError(
                f"--{role} {label!r} is not a model in these results; available: {', '.join(known) or 'none'}"
            )


def run(args: argparse.Namespace) -> int:
    _, results = open_results(args.dir)
    roles = Roles(args.cl, args.mim, args.control, args.hybrid)
    check_labels(results, roles)
    if not 0 <= args.rel_tol < 1:
        raise CommandError(f"--rel-tol must be in [0, 1), got {args.rel_tol}")
    tolerance = Tolerance(rel=args.rel_tol, probe_points=args.probe_points)
    verdicts = evaluate_claims(results, **vars(roles), tolerance=tolerance)
    print(format_claims_table(verdicts))
    path = save_claims(args.dir, verdicts, roles, tolerance)
    print(f"\nwrote {path} (include it in the report with `vitscope report {args.dir}`)")
    return 0
