"""The learning-curve figure (PNG, SVG) and a self-contained HTML page of :class:`~.curves.RunCurve` s.

One panel per value, one colour per run (the order given; the report's palette), the run's untrained
control as a dashed line in its colour, and for attention entropy the uniform limit log N when the
runs share one grid.
"""

from __future__ import annotations

import csv
import html
import io
import math
from pathlib import Path

from matplotlib.figure import Figure

from vitscope.io import write_bytes_atomic, write_text_atomic
from vitscope.pretrain.curves import RunCurve, tidy_rows
from vitscope.report.figures import model_colors

__all__ = ["DEFAULT_VALUES", "TITLES", "value_key", "curve_figure", "write_curves"]

DEFAULT_VALUES = (
    "knn_top1",
    "attention_distance",
    "nmi",
    "attention_entropy",
    "token_cosine",
    "effective_rank",
    "fourier_high",
    "embedding_spread",
)
TITLES = {
    "knn_top1": "kNN top-1",
    "attention_distance": "attention distance (px)",
    "nmi": "NMI",
    "attention_entropy": "attention entropy (nats)",
    "token_cosine": "token cosine",
    "effective_rank": "effective rank",
    "fourier_high": "high-frequency Δ log amplitude",
    "embedding_spread": "embedding spread",
    "uniform_heads": "near-uniform heads (share)",
}
UNRANGED = ("knn_top1", "embedding_spread")


def value_key(value: str, blocks: str) -> str:
    """The metrics key of a value over a block range: ``early``, ``late`` or ``blockN``."""
    return value if value in UNRANGED else f"{value}/{blocks}"


def curve_figure(curves: list[RunCurve], values: list[str], blocks: str, x: str) -> Figure:
    """Value against steps (``x="steps"``) or epochs (``x="epoch"``), one panel per value."""
    columns = min(4, len(values))
    rows = math.ceil(len(values) / columns)
    figure = Figure(figsize=(3.2 * columns, 2.6 * rows + 0.4), layout="constrained")
    axes = list(figure.subplots(rows, columns, squeeze=False).flat)
    colors = model_colors([c.name for c in curves])
    for ax, value in zip(axes, values):
        key = value_key(value, blocks)
        for curve in curves:
            points = [p for p in curve.points if key in p["metrics"]]
            if x == "epoch":
                points = [p for p in points if p["epoch"] is not None]
            xs = [p["epoch"] if x == "epoch" else p["trained_steps"] for p in points]
            ax.plot(xs, [p["metrics"][key] for p in points], marker=".", color=colors[curve.name], label=curve.name)
            if curve.control is not None and key in curve.control:
                ax.axhline(curve.control[key], color=colors[curve.name], linestyle="--", linewidth=0.8, alpha=0.6)
        title = TITLES.get(value, value)
        ax.set_title(title if value in UNRANGED else f"{blocks} blocks: {title}", fontsize=9)
        ax.set_xlabel("epoch" if x == "epoch" else "optimizer steps", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(values) :]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color="0.4", linestyle="--", linewidth=0.8))
        labels.append("untrained control")
        figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6), fontsize=8)
    return figure


def _html(curves: list[RunCurve], svg: str, title: str) -> str:
    runs = "".join(
        f"<li><b>{html.escape(c.name)}</b>: {html.escape(str(c.path))} — "
        f"{'track records of log.jsonl' if c.source == 'log' else 'kept encoders measured afresh'}, "
        f"{len(c.points)} points</li>"
        for c in curves
    )
    svg_body = svg[svg.index("<svg") :]
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1400px}"
        "svg{width:100%;height:auto}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><ul>{runs}</ul>{svg_body}"
        "<p>Dashed: each run's untrained control. Values: curves.csv beside this page.</p></body></html>\n"
    )


def write_curves(curves: list[RunCurve], out: Path, values: list[str], blocks: str, x: str) -> list[Path]:
    """``curves.png``, ``curves.svg``, ``curves.html`` (the SVG inline) and ``curves.csv`` (every value
    of every point) under ``out``, each written atomically; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    figure = curve_figure(curves, values, blocks, x)
    png, svg = io.BytesIO(), io.StringIO()
    figure.savefig(png, format="png", dpi=110)
    figure.savefig(svg, format="svg")
    paths = [out / "curves.png", out / "curves.svg", out / "curves.html", out / "curves.csv"]
    write_bytes_atomic(paths[0], png.getvalue())
    write_text_atomic(paths[1], svg.getvalue())
    title = "Learning curves: " + ", ".join(c.name for c in curves)
    write_text_atomic(paths[2], _html(curves, svg.getvalue(), title))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=["run", "source", "trained_steps", "epoch", "key", "value"])
    writer.writeheader()
    writer.writerows(tidy_rows(curves))
    write_text_atomic(paths[3], table.getvalue())
    return paths
