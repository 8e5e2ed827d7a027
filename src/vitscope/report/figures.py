"""Figures of every analysis, all models overlaid, one colour per model throughout.

Each ``fig_*`` function takes the :class:`ResultView`, the arrays of ``arrays.npz`` and the model
colours, and returns :class:`NamedFigure` s (none when the analysis is absent from the results).
Figures are built on ``matplotlib.figure.Figure`` directly (the Agg canvas; no pyplot global state)
and saved as PNG and SVG by :func:`save_figure`.
"""

from __future__ import annotations

import io
import math
import re
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.artist import Artist
from matplotlib.cm import ScalarMappable
from matplotlib.collections import PathCollection
from matplotlib.colors import Colormap, Normalize, to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import LogLocator, NullLocator

from vitscope.report.claims import band_shares
from vitscope.report.series import ResultView
from vitscope.results import RunDirectory

Arrays = Mapping[str, np.ndarray]
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
PNG_DPI = 120


@dataclass
class NamedFigure:
    key: str  # file stem under figures/
    section: str  # the report section it belongs to
    title: str
    figure: Figure


@dataclass(frozen=True)
class SavedFigure:
    key: str
    section: str
    title: str
    png: Path
    svg: Path | None


ROLE_COLORS = {"cl": "tab:blue", "mim": "tab:orange", "hybrid": "tab:purple", "control": "tab:gray"}
OTHER_COLORS = ("tab:green", "tab:red", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def model_colors(models: list[str], roles: Mapping[str, str] | None = None) -> dict[str, tuple]:
    """One colour per model, the same in every figure and every run: CL blue, MIM orange, hybrid purple,
    control grey; any other model a colour picked by its label (stable across runs), distinct within the run
    while colours last (then tab20)."""
    by_label = {label: ROLE_COLORS[role] for role, label in (roles or {}).items() if role in ROLE_COLORS}
    colors: dict[str, tuple] = {m: to_rgba(by_label[m]) for m in models if m in by_label}
    others = [m for m in models if m not in colors]
    palette = list(OTHER_COLORS) if len(others) <= len(OTHER_COLORS) else [colormaps["tab20"](i) for i in range(20)]
    taken: set[int] = set()
    for model in others:
        index = zlib.crc32(model.encode()) % len(palette)
        while index in taken and len(taken) < len(palette):
            index = (index + 1) % len(palette)
        taken.add(index)
        colors[model] = to_rgba(palette[index])
    return {m: colors[m] for m in models}


def hex_color(rgba: tuple) -> str:
    return "#" + "".join(f"{round(c * 255):02x}" for c in rgba[:3])


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_.") or "model"


def _new(ncols: int = 1, nrows: int = 1, width: float = 9.4, height: float = 4.4) -> tuple[Figure, np.ndarray]:
    """A figure of ``ncols`` × ``nrows`` panels of ``width`` × ``height`` inches. A single panel is as wide as
    the report's card (9.4 in at PNG_DPI ≈ 1130 px), so that it fills the card at its natural size."""
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    return fig, axes


def _drawn_x(ax) -> np.ndarray:
    """Every x value drawn on ``ax`` (lines and scatter dots)."""
    xs = [np.asarray(line.get_xdata(), float) for line in ax.get_lines()]
    dots = [c for c in ax.collections if isinstance(c, PathCollection)]  # scatter; bands' offsets are a dummy 0
    xs += [np.asarray(c.get_offsets(), float).reshape(-1, 2)[:, 0] for c in dots]
    return np.concatenate(xs) if xs else np.zeros(0)


def _depth_axis(ax, title: str, ylabel: str, unit: str = "block") -> None:
    """Depth on x: ``unit`` (block for ViTs, stage for CNNs); "0 = patch embedding" only where 0 is drawn."""
    ax.set_title(title)
    zero = unit == "block" and bool(np.any(np.isclose(_drawn_x(ax), 0.0, atol=0.2)))
    ax.set_xlabel(f"depth ({unit}; 0 = patch embedding)" if zero else f"depth ({unit})")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)


def kind_groups(view: ResultView, models: list[str]) -> list[tuple[str, list[str]]]:
    """Models split by depth unit: ("block", ViTs) and ("stage", CNNs), empty groups left out. CNN stages
    are not ViT blocks: they get their own axes."""
    cnn = [m for m in models if view.model_meta(m).get("kind") == "cnn"]
    vit = [m for m in models if m not in cnn]
    return [(unit, group) for unit, group in (("block", vit), ("stage", cnn)) if group]


def _legend_outside(fig: Figure, *axes, below: bool = False) -> None:
    """One legend right of the plots, or ``below`` them (every label once): it never hides data or a title and
    needs no placement search."""
    entries: dict[str, Artist] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        where = (
            dict(loc="outside lower center", ncols=min(len(entries), 3)) if below else dict(loc="outside right upper")
        )
        fig.legend(list(entries.values()), list(entries), fontsize="small", **where)


def _plot_series(ax, view: ResultView, model: str, metric: str, color, scale: float = 1.0, **where) -> bool:
    series = view.series(model, metric, **where)
    if not len(series):
        return False
    values, stderr = series.values * scale, series.stderr * scale
    ax.plot(series.layers, values, "-o", color=color, label=model, markersize=4, zorder=3)
    if not np.isnan(stderr).all():
        se = np.nan_to_num(stderr)
        ax.fill_between(series.layers, values - se, values + se, color=color, alpha=0.2, linewidth=0, zorder=2)
    return True


def layer_curve(
    view: ResultView,
    colors: Mapping[str, tuple],
    metric: str,
    key: str,
    section: str,
    title: str,
    ylabel: str,
    *,
    heads: bool = False,
    reference: Callable | None = None,
) -> list[NamedFigure]:
    """Per-layer mean of ``metric`` for every model (± stderr band), per-head values as dots behind."""
    models = [m for m in view.models() if view.series(m, metric).layers.size]
    if not models:
        return []
    groups = kind_groups(view, models)
    fig, axes = _new(ncols=len(groups), width=9.4 if len(groups) == 1 else 5.0)
    for ax, (unit, group) in zip(axes, groups):
        for i, model in enumerate(group):
            if heads:
                layers, values = view.head_points(model, metric)
                jitter = (i - (len(group) - 1) / 2) * 0.08
                ax.scatter(layers + jitter, values, s=12, color=colors[model], alpha=0.35, linewidths=0, zorder=1)
            _plot_series(ax, view, model, metric, colors[model])
        if reference is not None:
            reference(ax, group)
        _depth_axis(ax, title if len(groups) == 1 else f"{'ViTs' if unit == 'block' else 'CNNs'}", ylabel, unit)
    if len(groups) > 1:
        fig.suptitle(title)
    _legend_outside(fig, *axes)
    return [NamedFigure(key, section, title, fig)]


def _log_n_lines(view: ResultView) -> Callable:
    def draw(ax, models: list[str]) -> None:
        known = {n for n in map(view.attention_keys, models) if n is not None}
        for n in sorted(known):
            ax.axhline(
                math.log(n),
                linestyle="--",
                color="0.3",
                linewidth=1.2,
                label=f"log {n} = {math.log(n):.2f}\n(uniform)",
                zorder=2,
            )

    return draw


def fig_layer_curves(view: ResultView, arrays: Arrays, colors: Mapping[str, tuple]) -> list[NamedFigure]:
    figs: list[NamedFigure] = []
    figs += layer_curve(
        view,
        colors,
        "attention_distance",
        "attention_distance",
        "attention-distance",
        "Attention distance (dots: heads, line: layer mean)",
        "mean attention distance (px)",
        heads=True,
    )
    figs += layer_curve(
        view, colors, "nmi", "nmi", "nmi", "Normalized mutual information of query and key", "NMI", heads=True
    )
    figs += layer_curve(
        view,
        colors,
        "attention_entropy",
        "attention_entropy",
        "attention-entropy",
        "Attention entropy (dashed: log N, uniform attention)",
        "row entropy (nats)",
        heads=True,
        reference=_log_n_lines(view),
    )
    figs += layer_curve(
        view,
        colors,
        "token_cosine",
        "token_cosine",
        "token-cosine",
        "Cosine similarity between tokens of an image",
        "mean token cosine similarity",
    )
    figs += layer_curve(
        view,
        colors,
        "head_cosine",
        "head_cosine",
        "head-cosine",
        "Cosine similarity between heads",
        "mean head cosine similarity",
    )
    figs += layer_curve(
        view,
        colors,
        "depth_cosine",
        "depth_cosine",
        "depth-cosine",
        "Cosine similarity of a token between consecutive blocks",
        "cosine(block l−1, block l)",
    )
    figs += layer_curve(
        view,
        colors,
        "effective_rank",
        "effective_rank",
        "singular-values",
        "Effective rank of the token matrix",
        "effective rank exp(H(σ/Σσ))",
    )
    figs += layer_curve(
        view,
        colors,
        "fourier_high",
        "fourier_high",
        "fourier",
        "High-frequency Δ log amplitude",
        "Δ log amplitude at the highest frequency",
    )
    return figs


def fig_panels_by_feature(
    view: ResultView,
    colors: Mapping[str, tuple],
    metric: str,
    column: str,
    panels: list[tuple[str, str]],
    key: str,
    section: str,
    title: str,
    ylabel: str,
    scale: float = 1.0,
    errors: Callable | None = None,
    legend_below: bool = False,
) -> list[NamedFigure]:
    present = [
        (value, name, unit, group)
        for value, name in panels
        for unit, group in kind_groups(view, view.models())
        if any(view.series(m, metric, **{column: value}).layers.size for m in group)
    ]
    if not present:
        return []
    fig, axes = _new(ncols=len(present), width=5.2)
    for ax, (value, name, unit, group) in zip(axes, present):
        for model in group:
            if errors is not None:
                errors(ax, model, colors[model], **{column: value})
            else:
                _plot_series(ax, view, model, metric, colors[model], scale=scale, **{column: value})
        _depth_axis(ax, name if unit == "block" else f"{name}, CNN stages", ylabel, unit)
    _legend_outside(fig, *axes, below=legend_below)
    fig.suptitle(title)
    return [NamedFigure(key, section, title, fig)]


def fig_residual(view: ResultView, arrays: Arrays, colors: Mapping[str, tuple]) -> list[NamedFigure]:
    present = [
        (metric, name)
        for metric, name in (("residual_ratio_attn", "attention branch"), ("residual_ratio_mlp", "MLP branch"))
        if any(view.series(m, metric).layers.size for m in view.models())
    ]
    if not present:
        return []
    fig, axes = _new(ncols=len(present), width=5.2)
    for ax, (metric, name) in zip(axes, present):
        for model in view.models():
            _plot_series(ax, view, model, metric, colors[model])
        _depth_axis(ax, name, "‖residual stream‖ / ‖branch output‖")
    _legend_outside(fig, *axes)
    fig.suptitle("Residual ratio: how strongly skip connections carry the signal")
    return [NamedFigure("residual_ratio", "residual-ratio", "Residual ratio", fig)]


def binomial_interval(accuracy: np.ndarray, n: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval (low, high) of accuracies (fractions) measured on ``n`` images each (scipy)."""
    from scipy.stats import binomtest  # imported here: scipy.stats costs every vitscope command a second at start

    bounds = [
        binomtest(round(float(a) * float(m)), int(m)).proportion_ci(confidence_level=level, method="wilson")
        for a, m in zip(accuracy, n)
    ]
    return np.array([b.low for b in bounds]), np.array([b.high for b in bounds])


def _probe_with_interval(view: ResultView, scale: float) -> Callable:
    """Draw one model's probe accuracy per layer with the 95 % binomial interval over its ``n`` test images."""

    def draw(ax, model: str, color, **where) -> None:
        rows = sorted(
            (r for r in view.rows(model, "linear_probe_top1", head=None, **where) if r.get("layer") is not None),
            key=lambda r: r["layer"],
        )
        if not rows:
            return
        layers = np.array([r["layer"] for r in rows], float)
        accuracy = np.array([r["value"] for r in rows], float) * scale / 100.0
        n = np.array([r.get("n") or np.nan for r in rows], float)
        ax.plot(layers, accuracy * 100, "-o", color=color, label=model, markersize=4, zorder=3)
        if np.isfinite(n).all():
            low, high = binomial_interval(np.clip(accuracy, 0, 1), n)
            ax.fill_between(layers, low * 100, high * 100, color=color, alpha=0.18, linewidth=0, zorder=2)

    return draw


def fig_probe(view: ResultView, arrays: Arrays, colors: Mapping[str, tuple]) -> list[NamedFigure]:
    scale = view.percent_scale("linear_probe_top1")
    rows = [r for m in view.models() for r in view.rows(m, "linear_probe_top1") if r.get("n")]
    n_text = f"; band: 95 % binomial interval over n = {min(r['n'] for r in rows)} test images" if rows else ""
    return fig_panels_by_feature(
        view,
        colors,
        "linear_probe_top1",
        "feature",
        [("cls", "CLS token"), ("gap", "mean of spatial tokens (GAP)")],
        "linear_probe",
        "linear-probe",
        f"Linear probe top-1 accuracy per layer{n_text}",
        "top-1 accuracy (%)",
        scale=scale,
        errors=_probe_with_interval(view, scale),
        legend_below=True,
    )


def _per_model_panels(models: list[str], width: float = 4.6, height: float = 3.8) -> tuple[Figure, np.ndarray]:
    ncols = min(len(models), 3)
    nrows = math.ceil(len(models) / ncols)
    fig, axes = _new(ncols=ncols, nrows=nrows, width=width, height=height)
    for ax in axes[len(models) :]:
        ax.set_visible(False)
    return fig, axes


def _depth_norm(view: ResultView, model: str, by_layer: Mapping[int, np.ndarray]) -> tuple[Normalize, Colormap]:
    """Colour by depth: viridis over ViT blocks, a separate scale (plasma) over a CNN's stages."""
    cnn = view.model_meta(model).get("kind") == "cnn"
    return Normalize(0, max(max(by_layer), 1)), colormaps["plasma" if cnn else "viridis"]


def _depth_colorbars(fig: Figure, view: ResultView, axes, curves: Mapping[str, Mapping[int, np.ndarray]]) -> None:
    """One colourbar per depth unit present: ViT blocks and CNN stages are different axes."""
    models = list(curves)
    for unit, group in kind_groups(view, models):
        depth = max(max(curves[m]) for m in group)
        norm, cmap = Normalize(0, max(depth, 1)), colormaps["plasma" if unit == "stage" else "viridis"]
        panels = [axes[models.index(m)] for m in group]
        label = "depth (block; 0 = patch embedding)" if unit == "block" else "CNN stage"
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=panels, label=label, shrink=0.9)


def fig_fourier_delta(view: ResultView, arrays: Arrays, colors: Mapping[str, tuple]) -> list[NamedFigure]:
    curves = {m: view.indexed(m, "fourier_delta", "freq") for m in view.models()}
    curves = {m: c for m, c in curves.items() if c}
    if not curves:
        return []
    fig, axes = _per_model_panels(list(curves))
    _depth_colorbars(fig, view, axes, curves)
    for ax, (model, by_layer) in zip(axes, curves.items()):
        norm, cmap = _depth_norm(view, model, by_layer)
        for layer, curve in by_layer.items():
            freq = np.linspace(0.0, 1.0, len(curve))
            ax.plot(freq, curve, color=cmap(norm(layer)), linewidth=1.4)
        ax.set_title(model, color=colors[model])
        ax.set_xlabel("frequency (× π; 0 = lowest)")
        ax.set_ylabel("Δ log amplitude")
        ax.grid(True, alpha=0.3)
    fig.suptitle("Relative log amplitude of Fourier-transformed feature maps (one line per block)")
    return [NamedFigure("fourier_delta", "fourier", "Fourier Δ log amplitude", fig)]


def _few_layers(layers: list[int], k: int = 5) -> list[int]:
    if len(layers) <= k:
        return layers
    picks = np.unique(np.round(np.linspace(0, len(layers) - 1, k)).astype(int))
    return [layers[i] for i in picks]


def spectrum_limits(spectra: list[np.ndarray], dynamic_range: float = 1e-6) -> tuple[float, float]:
    """(bottom, top) for log-scale spectra: values below ``dynamic_range`` × the largest are numerical floor
    (rank-deficient blocks reach 1e-12) and would squash every other curve; they sit below the axis."""
    values = np.concatenate([np.asarray(s, float) for s in spectra])
    top = float(values.max())
    shown = values[values >= top * dynamic_range]
    return float(shown.min()) / 2, top * 2


def fig_singular_values(view: ResultView, arrays: Arrays, colors: Mapping[str, tuple]) -> list[NamedFigure]:
    spectra = {m: view.indexed(m, "singular_values", "index") for m in view.models()}
    spectra = {m: s for m, s in spectra.items() if s}
    if not spectra:
        return []
    fig, axes = _per_model_panels(list(spectra))
    _depth_colorbars(fig, view, axes, spectra)
    for ax, (model, by_layer) in zip(axes, spectra.items()):
        norm, cmap = _depth_norm(view, model, by_layer)
        for layer, sv in by_layer.items():  # every block: the colour says which (colourbar)
            ax.semilogy(np.arange(len(sv)), np.clip(sv, 1e-30, None), color=cmap(norm(layer)), linewidth=1.2)
        ax.set_ylim(*spectrum_limits(list(by_layer.values())))
        ax.yaxis.set_major_locator(LogLocator(numticks=6))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_title(model, color=colors[model])
        ax.set_xlabel("singular value index")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("singular value (log)")
        ax.grid(True, alpha=0.3)
    fig.suptitle("Singular value spectra of the token matrix (one line per block; below 1e-6 × the largest: not shown)")
    return [NamedFigure("singular_values", "singular-values", "Singular value spectra", fig)]


def fig_attention_maps(view: ResultView, arrays: Arrays, colors: Mapping[str, tuple]) -> list[NamedFigure]:
    """Static maps of runs written before the attention explorer (``LABEL/attention_maps``); newer runs
    store per-head maps (``LABEL/attention_rows``) that the report's explorer draws instead."""
    figs = []
    image = arrays.get("example_image")
    for model in view.models():
        maps, queries = arrays.get(f"{model}/attention_maps"), arrays.get(f"{model}/query_positions")
        if maps is None or queries is None:
            continue
        figs.append(_attention_map_grid(model, np.asarray(maps, float), np.asarray(queries), image, colors[model]))
    return figs


def _attention_map_grid(
    model: str, maps: np.ndarray, queries: np.ndarray, image: np.ndarray | None, color
) -> NamedFigure:
    """maps [L, Q, h, w] as one mosaic: columns = blocks (at most 12, evenly spaced), rows = query tokens.

    Each cell blends the example image with its attention map (scaled to the map's maximum, inferno
    colours); the query's patch is outlined in cyan. One image on one axes keeps rendering fast.
    """
    num_layers, num_queries, h, w = maps.shape
    blocks = _few_layers(list(range(num_layers)), k=12)
    cell_h, cell_w = (image.shape[1], image.shape[2]) if image is not None else (16 * h, 16 * w)
    pad = max(1, cell_h // 16)
    mosaic = np.ones((num_queries * (cell_h + pad) - pad, len(blocks) * (cell_w + pad) - pad, 3))
    base = None if image is None else np.clip(np.transpose(image, (1, 2, 0)), 0.0, 1.0)[..., :3]
    row_index, col_index = (np.arange(cell_h) * h) // cell_h, (np.arange(cell_w) * w) // cell_w
    cmap = colormaps["inferno"]
    for q in range(num_queries):
        for b, layer in enumerate(blocks):
            attn = maps[layer, q]
            heat = cmap(attn / attn.max() if attn.max() > 0 else attn)[..., :3][row_index][:, col_index]
            top, left = q * (cell_h + pad), b * (cell_w + pad)
            mosaic[top : top + cell_h, left : left + cell_w] = heat if base is None else 0.3 * base + 0.7 * heat
    fig, (ax,) = _new(width=1.4 + 1.05 * len(blocks), height=0.7 + 1.05 * num_queries)
    ax.imshow(mosaic, interpolation="nearest")
    for q, (row, col) in enumerate(queries):
        for b in range(len(blocks)):
            top, left = q * (cell_h + pad), b * (cell_w + pad)
            ax.add_patch(
                _query_box(left + col * cell_w / w - 0.5, top + row * cell_h / h - 0.5, cell_w / w, cell_h / h)
            )
    ax.set_xticks(
        [b * (cell_w + pad) + cell_w / 2 for b in range(len(blocks))],
        [f"block {layer + 1}" for layer in blocks],
        fontsize="small",
    )
    ax.set_yticks(
        [q * (cell_h + pad) + cell_h / 2 for q in range(num_queries)],
        [f"query\n({row}, {col})" for row, col in queries],
        fontsize="small",
    )
    ax.tick_params(length=0)
    ax.xaxis.tick_top()
    for spine in ax.spines.values():
        spine.set_visible(False)
    title = f"Attention maps of {model} (query outlined in cyan; each map scaled to its maximum)"
    fig.suptitle(title, color=color)
    return NamedFigure(f"attention_maps_{slug(model)}", "attention-maps", title, fig)


def _query_box(x: float, y: float, w: float, h: float):
    return Rectangle((x, y), w, h, fill=False, edgecolor="cyan", linewidth=1.6)


def fig_cka(view: ResultView, arrays: Arrays, colors: Mapping[str, tuple]) -> list[NamedFigure]:
    """Every CKA matrix in one grid: row = model, column = other model (upper triangle and diagonal)."""
    pairs = view.cka_pairs()
    if not pairs:
        return []
    models = [m for m in view.models() if any(m in pair for pair in pairs)]
    size = len(models)
    fig, axes = _new(ncols=size, nrows=size, width=2.3 if size > 2 else 3.6, height=2.2 if size > 2 else 3.4)
    grid = axes.reshape(size, size)
    image = None
    for i, model in enumerate(models):
        for j, other in enumerate(models):
            ax = grid[i, j]
            pair = (model, other) if (model, other) in pairs else (other, model) if (other, model) in pairs else None
            if pair is None or j < i:  # the upper triangle: each pair once
                ax.set_visible(False)
                continue
            rows, cols, matrix = view.cka_matrix(*pair)
            if pair != (model, other):
                rows, cols, matrix = cols, rows, matrix.T
            ax.set_label(f"cka:{model}:{other}")
            image = ax.imshow(
                matrix,
                origin="lower",
                cmap="magma",
                vmin=0.0,
                vmax=1.0,
                aspect="auto",
                extent=(cols[0] - 0.5, cols[-1] + 0.5, rows[0] - 0.5, rows[-1] + 0.5),
            )
            ax.tick_params(labelsize="x-small")
            if i == 0:
                ax.set_title(other, color=colors[other], fontsize="small")
            if j == i or (j > 0 and not grid[i, j - 1].get_visible()):
                ax.set_ylabel(model, color=colors[model])
            if i == size - 1 or j == i:
                ax.set_xlabel(other, color=colors[other])
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="linear CKA", shrink=0.6)
    title = "Linear CKA between layers: row model (y: its depth) × column model (x: its depth)"
    fig.suptitle(title)
    return [NamedFigure("cka", "cka", title, fig)]


def fig_tsne(view: ResultView, arrays: Arrays, colors: Mapping[str, tuple]) -> list[NamedFigure]:
    models = [m for m in view.models() if f"{m}/tsne_points" in arrays and f"{m}/tsne_labels" in arrays]
    if not models:
        return []
    names = [str(n) for n in arrays.get("class_names", [])]
    fig, axes = _per_model_panels(models, width=4.4, height=4.0)
    class_colors = colormaps["tab10"]
    image_count = 0
    for ax, model in zip(axes, models):
        points = np.asarray(arrays[f"{model}/tsne_points"], float)
        labels = np.asarray(arrays[f"{model}/tsne_labels"])
        image_ids = np.asarray(arrays.get(f"{model}/tsne_image_ids", np.zeros(len(points), int)))
        for image_index, image_id in enumerate(np.unique(image_ids)):
            pick = image_ids == image_id
            ax.scatter(
                points[pick, 0],
                points[pick, 1],
                s=18,
                alpha=0.75,
                linewidths=0,
                marker=MARKERS[image_index % len(MARKERS)],
                color=class_colors(int(labels[pick][0]) % 10),
            )
        image_count = max(image_count, len(np.unique(image_ids)))
        ax.set_title(model, color=colors[model])
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
    classes = sorted({int(v) for m in models for v in np.unique(arrays[f"{m}/tsne_labels"])})
    class_handles = [
        Line2D(
            [],
            [],
            linestyle="",
            marker="o",
            color=class_colors(c % 10),
            label=names[c] if c < len(names) else f"class {c}",
        )
        for c in classes
    ]
    marker_handles = [
        Line2D([], [], linestyle="", marker=MARKERS[i], color="0.35", label=f"image {i + 1}")
        for i in range(min(image_count, len(MARKERS)))
    ]
    fig.legend(handles=class_handles, title="colour = class", loc="outside right upper", fontsize="small")
    repeat = " (markers repeat)" if image_count > len(MARKERS) else ""
    fig.legend(handles=marker_handles, title=f"marker = image{repeat}", loc="outside right lower", fontsize="x-small")
    fig.suptitle("t-SNE of last-layer spatial tokens: colour = class, marker = image")
    return [NamedFigure("tsne", "tsne", "Token t-SNE", fig)]


def fig_noise(view: ResultView, arrays: Arrays, colors: Mapping[str, tuple]) -> list[NamedFigure]:
    """Accuracy drop per frequency band, the lowest and highest third shaded (the bands whose share of the
    drop the claims compare), each model's shares in its legend entry."""
    curves = {m: view.noise_curve(m) for m in view.models()}
    curves = {m: c for m, c in curves.items() if len(c[0])}
    if not curves:
        return []
    scale = view.percent_scale("noise_drop")
    fig, (ax,) = _new()
    bands = max(len(b) for b, _ in curves.values())
    k = max(1, round(bands / 3))
    ax.axvspan(-0.5, k - 0.5, color="tab:blue", alpha=0.07, linewidth=0)
    ax.axvspan(bands - k - 0.5, bands - 0.5, color="tab:red", alpha=0.07, linewidth=0)
    for model, (band_ids, drops) in curves.items():
        shares = band_shares(drops)
        share_text = "" if shares is None else f" (low {shares[0]:.0%}, high {shares[1]:.0%} of its drop)"
        ax.plot(band_ids, drops * scale, "-o", color=colors[model], label=model + share_text, markersize=4)
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    strength = (view.meta.get("config") or {}).get("noise_relative_norm")
    noise = f"noise RMS {strength:g} per input value (normalised inputs)" if isinstance(strength, (int, float)) else ""
    fig.suptitle("Accuracy drop under frequency-band-limited Gaussian noise" + (f"\n{noise}" if noise else ""))
    ax.set_xlabel(f"radial frequency band of the noise (0 = lowest of {bands}; shaded: lowest / highest third)")
    ax.set_ylabel("top-1 accuracy drop (percentage points)")  # fractions are scaled to points

    ax.set_xlim(-0.5, bands - 0.5)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3)
    _legend_outside(fig, ax, below=True)
    return [NamedFigure("noise_robustness", "noise-robustness", "Noise robustness", fig)]


def fig_localisation(view: ResultView, arrays: Arrays, colors: Mapping[str, tuple]) -> list[NamedFigure]:
    """Raghu et al.'s spatial localisation: for a few last-block positions, CKA with every input position."""
    models = [m for m in view.models() if f"{m}/localisation" in arrays]
    if not models:
        return []
    figs = []
    for model in models:
        maps = np.asarray(arrays[f"{model}/localisation"], float)  # [N, h, w]
        _n, h, w = maps.shape
        spots = [(h // 2, w // 2), (0, 0), (h - 1, w - 1), (0, w - 1), (h // 4, 3 * w // 4)]
        fig, axes = _new(ncols=len(spots), width=2.2, height=2.6)
        for ax, (r, c) in zip(np.ravel(axes), spots):
            image = ax.imshow(maps[r * w + c], cmap="viridis", vmin=0.0, vmax=1.0)
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.6))
            ax.set_title(f"position ({r}, {c})", fontsize="small")
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(image, ax=list(np.ravel(axes)), shrink=0.8, label="CKA with input patch")
        fig.suptitle(f"Spatial localisation of {model}: last-block token vs every input position", color=colors[model])
        figs.append(NamedFigure(f"localisation_{slug(model)}", "localisation", f"Spatial localisation of {model}", fig))
    return figs


FIGURE_BUILDERS: tuple[Callable[[ResultView, Arrays, Mapping[str, tuple]], list[NamedFigure]], ...] = (
    fig_layer_curves,
    fig_attention_maps,
    fig_singular_values,
    fig_fourier_delta,
    fig_noise,
    fig_probe,
    fig_tsne,
    fig_cka,
    fig_residual,
    fig_localisation,
)


def build_figures(view: ResultView, arrays: Arrays) -> list[NamedFigure]:
    colors = model_colors(view.models(), view.roles())
    figures = [fig for builder in FIGURE_BUILDERS for fig in builder(view, arrays, colors)]
    seen: dict[str, int] = {}
    for fig in figures:  # labels that slug alike ("a b", "a_b") must not overwrite each other's files
        count = seen.get(fig.key, 0)
        seen[fig.key] = count + 1
        if count:
            fig.key = f"{fig.key}_{count + 1}"
    return figures


def figure_bytes(figure: Figure, fmt: str) -> bytes:
    """The figure encoded as ``fmt`` (png at PNG_DPI, or svg), without time stamps."""
    buffer = io.BytesIO()
    metadata = {"Date": None} if fmt == "svg" else {"Software": None}
    figure.savefig(buffer, format=fmt, dpi=PNG_DPI, metadata=metadata)
    return buffer.getvalue()


def save_figure(named: NamedFigure, run_dir: RunDirectory, svg: bool = True) -> SavedFigure:
    """Write the figure as ``figures/KEY.png`` (and ``KEY.svg`` unless ``svg`` is False) in ``run_dir``."""
    png_path = run_dir.save_figure(named.key, "png", figure_bytes(named.figure, "png"))
    named.figure.set_layout_engine("none")  # keep the layout the PNG computed; laying out again is slow
    svg_path = run_dir.save_figure(named.key, "svg", figure_bytes(named.figure, "svg")) if svg else None
    return SavedFigure(named.key, named.section, named.title, png_path, svg_path)
