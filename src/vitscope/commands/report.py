"""`vitscope report DIR`: redraw every figure and rewrite DIR/report.html from saved results."""

from __future__ import annotations

import argparse

from vitscope.commands.common import open_results
from vitscope.report import render_report


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", help="results directory written by `vitscope analyze --out DIR`")
    parser.add_argument("--no-svg", action="store_true", help="write PNG figures only (faster)")


def run(args: argparse.Namespace) -> int:
    open_results(args.dir)  # a clear error for a missing directory or metrics file
    path = render_report(args.dir, svg=not args.no_svg)
    print(f"wrote {path}")
    return 0
