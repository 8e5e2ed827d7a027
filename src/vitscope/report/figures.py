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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.artist import Artist
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import LogLocator, NullLocator

from vitscope.report.series import ResultView
from vitscope.results import RunDirectory

Arrays = Mapping[str, np.ndarray]
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
PNG_DPI = 110


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


def model_colors(models: list[str]) -> dict[str, tuple]:
    """One colour per model, stable across every figure (tab10, then tab20 beyond ten models)."""
    palette = colormaps["tab10" if len(models) <= 10 else "tab20"]
    return {model: palette(i % palette.N) for i, model in enumerate(models)}


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_.") or "model"


def _new(ncols: int = 1, nrows: int = 1, width: float = 6.4, height: float = 4.0) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    return fig, axes


def _depth_axis(ax, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("depth (block; 0 = patch embedding)")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)


def _legend_outside(fig: Figure, *axes) -> None:
    """One legend right of the plots (every label once): it never hides data and needs no placement search."""
    entries: dict[str, Artist] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(list(entries.values()), list(entries), loc="outside right upper", fontsize="small")


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
    fig, (ax,) = _new()
    for i, model in enumerate(models):
        if heads:
            layers, values = view.head_points(model, metric)
            jitter = (i - (len(models) - 1) / 2) * 0.08
            ax.scatter(layers + jitter, values, s=12, color=colors[model], alpha=0.35, linewidths=0, zorder=1)
        _plot_series(ax, view, model, metric, colors[model])
    if reference is not None:
        reference(ax, models)
    _depth_axis(ax, title, ylabel)
    _legend_outside(fig, ax)
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
) -> list[NamedFigure]:
    present = [
        (value, name)
        for value, name in panels
        if any(view.series(m, metric, **{column: value}).layers.size for m in view.models())
    ]
    if not present:
        return []
    fig, axes = _new(ncols=len(present), width=5.2)
    for ax, (value, name) in zip(axes, present):
        for model in view.models():
            _plot_series(ax, view, model, metric, colors[model], scale=scale, **{column: value})
        _depth_axis(ax, name, ylabel)
    _legend_outside(fig, *axes)
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


def fig_probe(view: ResultView, arrays: Arrays, colors: Mapping[str, tuple]) -> list[NamedFigure]:
    scale = view.percent_scale("linear_probe_top1")
    return fig_panels_by_feature(
        view,
        colors,
        "linear_probe_top1",
        "feature",
        [("cls", "CLS token"), ("gap", "mean of spatial tokens (GAP)")],
        "linear_probe",
        "linear-probe",
        "Linear probe top-1 accuracy per layer",
        "top-1 accuracy (%)",
        scale=scale,
    )


def _per_model_panels(models: list[str], width: float = 4.6, height: float = 3.8) -> tuple[Figure, np.ndarray]:
    ncols = min(len(models), 3)
    nrows = math.ceil(len(models) / ncols)
    fig, axes = _new(ncols=ncols, nrows=nrows, width=width, height=height)
    for ax in axes[len(models) :]:
        ax.set_visible(False)
    return fig, axes


def _depth_colorbar(fig: Figure, axes, depth: int) -> tuple[Normalize, Colormap]:
    norm, cmap = Normalize(0, max(depth, 1)), colormaps["viridis"]
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), label="depth (block)", shrink=0.9)
    return norm, cmap


def fig_fourier_delta(view: ResultView, arrays: Arrays, colors: Mapping[str, tuple]) -> list[NamedFigure]:
    curves = {m: view.indexed(m, "fourier_delta", "freq") for m in view.models()}
    curves = {m: c for m, c in curves.items() if c}
    if not curves:
        return []
    fig, axes = _per_model_panels(list(curves))
    norm, cmap = _depth_colorbar(fig, axes[: len(curves)], max(max(c) for c in curves.values()))
    for ax, (model, by_layer) in zip(axes, curves.items()):
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


def fig_singular_values(view: ResultView, arrays: Arrays, colors: Mapping[str, tuple]) -> list[NamedFigure]:
    spectra = {m: view.indexed(m, "singular_values", "index") for m in view.models()}
    spectra = {m: s for m, s in spectra.items() if s}
    if not spectra:
        return []
    fig, axes = _per_model_panels(list(spectra))
    norm, cmap = _depth_colorbar(fig, axes[: len(spectra)], max(max(s) for s in spectra.values()))
    for ax, (model, by_layer) in zip(axes, spectra.items()):
        for layer in _few_layers(list(by_layer)):
            sv = by_layer[layer]
            ax.semilogy(np.arange(len(sv)), np.clip(sv, 1e-12, None), color=cmap(norm(layer)), label=f"block {layer}")
        ax.yaxis.set_major_locator(LogLocator(numticks=6))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_title(model, color=colors[model])
        ax.set_xlabel("singular value index")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("singular value (log)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small", loc="upper right")
    fig.suptitle("Singular value spectra of the token matrix")
    return [NamedFigure("singular_values", "singular-values", "Singular value spectra", fig)]


def fig_attention_maps(view: ResultView, arrays: Arrays, colors: Mapping[str, tuple]) -> list[NamedFigure]:
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
    figs = []
    for model, other in view.cka_pairs():
        rows, cols, matrix = view.cka_matrix(model, other)
        fig, (ax,) = _new(width=5.0, height=4.4)
        image = ax.imshow(
            matrix,
            origin="lower",
            cmap="magma",
            vmin=0.0,
            vmax=1.0,
            aspect="auto",
            extent=(cols[0] - 0.5, cols[-1] + 0.5, rows[0] - 0.5, rows[-1] + 0.5),
        )
        fig.colorbar(image, ax=ax, label="linear CKA")
        title = f"CKA: {model} × {other}" if model != other else f"CKA within {model}"
        ax.set_title(title)
        ax.set_xlabel(f"{other} layer")
        ax.set_ylabel(f"{model} layer")
        figs.append(NamedFigure(f"cka_{slug(model)}_vs_{slug(other)}", "cka", title, fig))
    return figs


def fig_tsne(view: ResultView, arrays: Arrays, colors: Mapping[str, tuple]) -> list[NamedFigure]:
    models = [m for m in view.models() if f"{m}/tsne_points" in arrays and f"{m}/tsne_labels" in arrays]
    if not models:
        return []
    fig, axes = _per_model_panels(models, width=4.4, height=4.0)
    class_colors = colormaps["tab10"]
    for ax, model in zip(axes, models):
        points = np.asarray(arrays[f"{model}/tsne_points"], float)
        labels = np.asarray(arrays[f"{model}/tsne_labels"])
        image_ids = np.asarray(arrays.get(f"{model}/tsne_image_ids", np.zeros(len(points), int)))
        for image_index, image_id in enumerate(np.unique(image_ids)):
            pick = image_ids == image_id
            label = labels[pick][0]
            ax.scatter(
                points[pick, 0],
                points[pick, 1],
                s=18,
                alpha=0.75,
                linewidths=0,
                marker=MARKERS[image_index % len(MARKERS)],
                color=class_colors(int(label) % 10),
            )
        for label in np.unique(labels):
            ax.scatter([], [], color=class_colors(int(label) % 10), label=f"class {label}", s=14)
        ax.set_title(model, color=colors[model])
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
        ax.legend(fontsize="x-small", loc="upper right")
    fig.suptitle("t-SNE of last-layer tokens: colour = class, marker = image")
    return [NamedFigure("tsne", "tsne", "Token t-SNE", fig)]


def fig_noise(view: ResultView, arrays: Arrays, colors: Mapping[str, tuple]) -> list[NamedFigure]:
    curves = {m: view.noise_curve(m) for m in view.models()}
    curves = {m: c for m, c in curves.items() if len(c[0])}
    if not curves:
        return []
    scale = view.percent_scale("noise_drop")
    fig, (ax,) = _new()
    for model, (bands, drops) in curves.items():
        ax.plot(bands, drops * scale, "-o", color=colors[model], label=model, markersize=4)
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.set_title("Accuracy drop under frequency-band-limited noise")
    ax.set_xlabel("noise frequency band (0 = lowest)")
    ax.set_ylabel("top-1 accuracy drop" + (" (points)" if scale == 100.0 else ""))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3)
    _legend_outside(fig, ax)
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
    colors = model_colors(view.models())
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
