"""`vitscope report DIR`: redraw every figure and rewrite DIR/report.html from saved results."""

from __future__ import annotations

import argparse

from vitscope.commands.common import open_results, positive_float
from vitscope.report import render_report
from vitscope.report.explorer import EXPLORER_MAX_BYTES


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", help="results directory written by `vitscope analyze --out DIR`")
    parser.add_argument("--no-svg", action="store_true", help="write PNG figures only (faster)")
    parser.add_argument(
        "--explorer-mb",
        type=positive_float,
        default=EXPLORER_MAX_BYTES / 2**20,
        help="MiB of attention maps the explorer embeds at most; over it, fewer images, then the head mean, "
        "then every other block (default: %(default)g)",
    )


def run(args: argparse.Namespace) -> int:
    open_results(args.dir)  # a clear error for a missing directory or metrics file
    path = render_report(args.dir, svg=not args.no_svg, explorer_max_bytes=int(args.explorer_mb * 2**20))
    print(f"wrote {path}")
    return 0
