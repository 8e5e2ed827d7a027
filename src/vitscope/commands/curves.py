"""`vitscope curves RUN [RUN ...]`: learning curves of training runs, one colour per run.

Each RUN is a `vitscope pretrain`/`finetune` run directory: its ``log.jsonl`` track records
(``--track-every N``), or else its kept encoders (``--keep-every N``) measured afresh.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vitscope.commands.common import CommandError, positive_int

BLOCK_RANGES = ("late", "early")


def configure(parser: argparse.ArgumentParser) -> None:
    from vitscope.pretrain.curves_plot import DEFAULT_VALUES, TITLES

    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories (NAME=DIR names a run's curve)")
    parser.add_argument("--out", required=True, help="where curves.png, curves.svg, curves.html and curves.csv go")
    parser.add_argument(
        "--values",
        nargs="+",
        default=list(DEFAULT_VALUES),
        choices=sorted(TITLES),
        metavar="VALUE",
        help=f"panels, from {', '.join(sorted(TITLES))} (default: all but uniform_heads)",
    )
    parser.add_argument(
        "--blocks", default="late", help="block range of the per-block values: late, early or blockN (default: late)"
    )
    parser.add_argument("--x", default="steps", choices=["steps", "epoch"], help="x axis (default: %(default)s)")
    parser.add_argument(
        "--images",
        type=positive_int,
        default=64,
        help="held-out images of the per-token metrics when kept encoders are measured afresh (default: %(default)s)",
    )
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")


def _named(item: str) -> tuple[str, Path]:
    name, sep, path = item.partition("=")
    if sep and name and "/" not in name:
        return name, Path(path)
    return Path(item).resolve().name, Path(item)


def run(args: argparse.Namespace) -> int:
    from vitscope.commands.common import set_threads
    from vitscope.pretrain.curves import read_run
    from vitscope.pretrain.curves_plot import write_curves

    if args.blocks not in BLOCK_RANGES and not (args.blocks.startswith("block") and args.blocks[5:].isdigit()):
        raise CommandError(f"--blocks {args.blocks}: expected late, early or blockN (N = 1..depth)")
    named = [_named(item) for item in args.runs]
    names = [name for name, _ in named]
    if len(set(names)) < len(names):
        raise CommandError(f"two runs are named alike ({', '.join(names)}); name them with NAME=DIR")
    for _, path in named:
        if not path.is_dir():
            raise CommandError(f"{path}: not a directory (expected a vitscope pretrain or finetune run)")
    set_threads(args.threads)
    curves = [read_run(path, name, args.images) for name, path in named]
    paths = write_curves(curves, Path(args.out), list(args.values), args.blocks, args.x)
    for curve in curves:
        print(f"{curve.name}: {len(curve.points)} points ({curve.source})")
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0
