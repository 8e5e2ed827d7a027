"""Markdown tables for docs/reproduction.md from a demo run and the training runs' learning curves.

    python scripts/reproduction_tables.py [--demo runs/demo] [--curves docs/figures/learning_curves.csv]
                                          [--sweep runs/sweep-moco-a runs/sweep-moco-b]

Prints (1) the demo's per-layer linear-probe top-1 (CLS), (2) the demo's per-block values of the
metrics behind findings 1-4 (``--per-block``: rank, Fourier Δ, token cosine, entropy, distance, NMI), (3)
late-block metrics against epochs from ``curves.csv`` (scripts/track_snapshots.py), (4) for each sweep
directory, every variant's late-block metrics at its last snapshot. Numbers only: the page's text is written by hand.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

from vitscope.results import Results, RunDirectory

CURVE_METRICS = ("attention_distance", "nmi", "attention_entropy", "token_cosine", "effective_rank", "fourier_high")
PER_BLOCK_DIGITS = {"effective_rank": 1, "fourier_high": 2, "token_cosine": 3, "attention_entropy": 2,
                    "attention_distance": 1, "nmi": 3}  # fmt: skip
HEADERS = ("distance (px)", "NMI", "entropy (nats)", "token cos", "eff. rank", "high-freq Δ")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def probe_table(results: Results) -> str:
    models = list(dict.fromkeys(row["model"] for row in results.select(metric="linear_probe_top1")))
    depths = sorted({row["layer"] for row in results.select(metric="linear_probe_top1")})
    rows = []
    for model in models:
        values = {
            r["layer"]: r["value"] for r in results.select(metric="linear_probe_top1", model=model, feature="cls")
        }
        best = max(values, key=lambda d: values[d])
        scale = 100.0 if max(values.values()) <= 1.0 else 1.0
        rows.append(
            [model]
            + [
                f"**{scale * values[d]:.1f}**" if d == best else f"{scale * values.get(d, float('nan')):.1f}"
                for d in depths
            ]
        )
    return table(["model"] + [str(d) for d in depths], rows)


def per_block_table(results: Results, metric: str, digits: int) -> str:
    """One row per model: ``metric``'s per-layer value (the layer mean, not per head) at every depth."""
    rows = [r for r in results.select(metric=metric) if r["head"] is None]
    models = list(dict.fromkeys(r["model"] for r in rows))
    depths = sorted({r["layer"] for r in rows})
    values = {(r["model"], r["layer"]): r["value"] for r in rows}
    body = [[m] + [f"{values[(m, d)]:.{digits}f}" if (m, d) in values else "" for d in depths] for m in models]
    return table(["model"] + [str(d) for d in depths], body)


def read_curves(path: Path) -> dict[tuple[str, float], dict[str, float]]:
    late: dict[tuple[str, float], dict[str, float]] = defaultdict(dict)
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            late[(row["run"], float(row["epoch"]))][row["metric"]] = float(row["late"])
    return late


def curve_rows(late: dict[tuple[str, float], dict[str, float]], keep: set[float] | None) -> list[list[str]]:
    rows = []
    for (run, epoch), values in sorted(late.items()):
        if keep is not None and run != "random" and epoch not in keep:
            continue
        rows.append([run, f"{epoch:g}"] + [f"{values.get(m, float('nan')):.3g}" for m in CURVE_METRICS])
    return rows


def last_snapshots(late: dict[tuple[str, float], dict[str, float]]) -> dict[tuple[str, float], dict[str, float]]:
    final: dict[str, float] = {}
    for run, epoch in late:
        final[run] = max(epoch, final.get(run, epoch))
    return {(run, epoch): values for (run, epoch), values in late.items() if final[run] == epoch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"))
    parser.add_argument("--curves", type=Path, default=Path("docs/figures/learning_curves.csv"))
    parser.add_argument("--epochs", type=float, nargs="*", default=[1, 2, 4, 6, 8, 10, 12, 16, 20, 25, 30])
    parser.add_argument("--sweep", type=Path, nargs="*", default=[])
    parser.add_argument("--per-block", nargs="*", default=list(PER_BLOCK_DIGITS), help="metrics to tabulate per depth")
    args = parser.parse_args()
    header = ["run", "epoch", *HEADERS]
    if (args.demo / "metrics.csv").exists():
        results = RunDirectory(args.demo).load_results()
        print("linear probe top-1 (%), CLS token, per depth\n" + probe_table(results) + "\n")
        for metric in args.per_block:
            digits = PER_BLOCK_DIGITS.get(metric, 3)
            print(f"{metric} per depth\n" + per_block_table(results, metric, digits) + "\n")
    if args.curves.exists():
        print("late blocks against epochs\n" + table(header, curve_rows(read_curves(args.curves), set(args.epochs))))
    for sweep in args.sweep:
        late = last_snapshots(read_curves(sweep / "curves.csv"))
        print(f"\n{sweep}: late blocks at each variant's last snapshot\n" + table(header, curve_rows(late, None)))


if __name__ == "__main__":
    main()
