"""Hand-made results directories shaped like `vitscope analyze --out DIR` writes them.

Four 6-block ViTs on a 4×4 grid of 8-px patches (N = 16, log N ≈ 2.77) with the papers' profiles:
``cl`` (global, collapsed, homogeneous, low-pass, separable late), ``mim`` (local, diverse, keeps high
frequencies, best probe in the middle), ``control`` (untrained: near-uniform attention) and ``hybrid``
(MIM-like early, CL-like late), plus a CNN ``resnet`` (no attention metrics). Tests override single
curves with ``overrides={(model, metric): values}`` (values over blocks 1..L; token metrics get
layer 0 = first value), set a metric's standard error with ``stderrs={(model, metric): se}`` and drop
metrics with ``drop={(model, metric), ...}``.

The rows have the format real runs write (checked against ``vitscope analyze``'s metrics.csv): the
streaming metrics carry a stderr and n = the test images; linear probes are percentages (correct / n)
over ``probe_n`` test images without a stderr; noise drops are percentage points without a stderr.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from vitscope.results import Results, Row, make_row
from vitscope.rundir import save_run

L = 6
GRID = (4, 4)
PATCH = (8, 8)
N = GRID[0] * GRID[1]
LOG_N = math.log(N)
HEADS = 3
HEAD_SPREAD = {"attention_distance": 2.0, "nmi": 0.05, "attention_entropy": 0.1}
ATTENTION_METRICS = ("attention_distance", "nmi", "attention_entropy")
TOKEN_METRICS = ("token_cosine", "effective_rank", "fourier_high")
LAYER_METRICS = ("head_cosine", "depth_cosine", "residual_ratio_attn", "residual_ratio_mlp")

PROFILES: dict[str, dict[str, list[float]]] = {
    "cl": {
        "attention_distance": [9.0, 10.0, 12.0, 14.0, 16.0, 17.0],
        "nmi": [0.30, 0.25, 0.15, 0.08, 0.05, 0.04],
        "attention_entropy": [2.3, 2.1, 1.8, 1.5, 1.4, 1.3],
        "token_cosine": [0.20, 0.25, 0.40, 0.60, 0.75, 0.80],
        "head_cosine": [0.20, 0.25, 0.35, 0.50, 0.65, 0.70],
        "depth_cosine": [0.95, 0.95, 0.90, 0.80, 0.70, 0.60],
        "effective_rank": [12.0, 11.0, 9.0, 6.0, 4.0, 3.0],
        "fourier_high": [-0.5, -0.8, -1.2, -1.8, -2.3, -2.6],
        "residual_ratio_attn": [3.0, 3.5, 4.0, 4.5, 5.0, 5.5],
        "residual_ratio_mlp": [2.0, 2.5, 3.0, 3.5, 4.0, 4.5],
        "probe_cls": [40.0, 48.0, 58.0, 68.0, 76.0, 80.0],
        "probe_gap": [42.0, 50.0, 58.0, 66.0, 73.0, 78.0],
        "noise_drop": [20.0, 12.0, 6.0, 3.0, 2.0, 1.0],
    },
    "mim": {
        "attention_distance": [8.0, 7.0, 6.0, 6.0, 5.5, 5.0],
        "nmi": [0.35, 0.40, 0.45, 0.50, 0.50, 0.48],
        "attention_entropy": [2.2, 2.0, 1.9, 1.9, 1.8, 1.8],
        "token_cosine": [0.20, 0.22, 0.25, 0.25, 0.28, 0.30],
        "head_cosine": [0.15, 0.18, 0.20, 0.22, 0.22, 0.25],
        "depth_cosine": [0.60, 0.70, 0.85, 0.90, 0.95, 0.95],
        "effective_rank": [13.0, 13.0, 12.5, 12.0, 11.5, 11.0],
        "fourier_high": [-0.3, -0.3, -0.2, -0.3, -0.4, -0.4],
        "residual_ratio_attn": [2.0, 2.2, 2.4, 2.6, 2.8, 3.0],
        "residual_ratio_mlp": [1.5, 1.7, 1.9, 2.1, 2.3, 2.5],
        "probe_cls": [45.0, 55.0, 65.0, 66.0, 60.0, 55.0],
        "probe_gap": [47.0, 57.0, 66.0, 67.0, 62.0, 57.0],
        "noise_drop": [2.0, 3.0, 4.0, 6.0, 10.0, 18.0],
    },
    "control": {
        "attention_distance": [14.5, 14.5, 14.6, 14.6, 14.6, 14.6],
        "nmi": [0.01, 0.01, 0.01, 0.01, 0.01, 0.01],
        "attention_entropy": [2.76, 2.76, 2.76, 2.77, 2.77, 2.77],
        "token_cosine": [0.50, 0.55, 0.60, 0.62, 0.64, 0.66],
        "head_cosine": [0.30, 0.30, 0.31, 0.31, 0.32, 0.32],
        "depth_cosine": [0.90, 0.92, 0.93, 0.94, 0.95, 0.95],
        "effective_rank": [8.0, 7.5, 7.0, 6.8, 6.6, 6.5],
        "fourier_high": [-1.0, -1.1, -1.2, -1.2, -1.3, -1.3],
        "residual_ratio_attn": [5.0, 5.0, 5.0, 5.0, 5.0, 5.0],
        "residual_ratio_mlp": [4.0, 4.0, 4.0, 4.0, 4.0, 4.0],
        "probe_cls": [30.0, 30.0, 30.0, 30.0, 30.0, 30.0],
        "probe_gap": [31.0, 31.0, 31.0, 31.0, 31.0, 31.0],
        "noise_drop": [5.0, 5.0, 5.0, 5.0, 5.0, 5.0],
    },
    "hybrid": {
        "attention_distance": [8.0, 7.5, 9.0, 12.0, 15.0, 16.0],
        "nmi": [0.35, 0.38, 0.30, 0.15, 0.08, 0.06],
        "attention_entropy": [2.2, 2.0, 1.9, 1.7, 1.5, 1.4],
        "token_cosine": [0.20, 0.22, 0.30, 0.45, 0.60, 0.70],
        "head_cosine": [0.15, 0.18, 0.25, 0.40, 0.50, 0.55],
        "depth_cosine": [0.70, 0.75, 0.85, 0.85, 0.80, 0.75],
        "effective_rank": [13.0, 12.5, 11.0, 8.0, 6.0, 5.0],
        "fourier_high": [-0.3, -0.4, -0.8, -1.4, -1.9, -2.2],
        "residual_ratio_attn": [2.5, 2.8, 3.2, 3.8, 4.2, 4.8],
        "residual_ratio_mlp": [1.8, 2.1, 2.6, 3.0, 3.4, 3.8],
        "probe_cls": [46.0, 56.0, 66.0, 72.0, 80.0, 87.0],
        "probe_gap": [47.0, 57.0, 66.0, 71.0, 78.0, 85.0],
        "noise_drop": [8.0, 6.0, 5.0, 5.0, 6.0, 8.0],
    },
    "resnet": {
        "token_cosine": [0.10, 0.15, 0.25, 0.35],
        "effective_rank": [14.0, 13.0, 11.0, 9.0],
        "fourier_high": [0.2, -0.2, -0.6, -1.0],
        "probe_gap": [35.0, 50.0, 65.0, 74.0],
    },
}
VIT_MODELS = ("cl", "mim", "control", "hybrid")


def model_meta(label: str) -> dict:
    if label == "resnet":
        return {
            "spec": "timm:resnet18",
            "kind": "cnn",
            "num_layers": 4,
            "num_heads": None,
            "num_prefix_tokens": 0,
            "grid": [4, 4],
            "patch_size": [8, 8],
            "num_tokens": N,
        }
    return {
        "spec": f"checkpoint:/models/{label}.pth",
        "kind": "vit",
        "num_layers": L,
        "num_heads": HEADS,
        "num_prefix_tokens": 1,
        "grid": list(GRID),
        "grids": [list(GRID)] * (L + 1),
        "windows": [None] * (L + 1),
        "attention_keys": [None] + [N] * L,
        "patch_size": list(PATCH),
        "num_tokens": N,
    }


TEST_IMAGES = 64  # n of the streaming metrics
PROBE_TEST_IMAGES = 500  # n of the probes by default (as the demo's 500 test images)
NOISE_IMAGES = 64


def _stderr(value: float) -> float:
    return 0.01 * abs(value) + 1e-4


def per_layer_rows(
    model: str, metric: str, values: Iterable[float], *, first_layer: int = 1, stderr: float | None = None, **extra
) -> list[Row]:
    return [
        make_row(
            model, metric, first_layer + i, v, stderr=_stderr(v) if stderr is None else stderr, n=TEST_IMAGES, **extra
        )
        for i, v in enumerate(values)
    ]


def probe_rows(model: str, feature: str, percents: Iterable[float], n: int) -> list[Row]:
    """Probe accuracies as real runs write them: percent of ``n`` test images (rounded to whole images)."""
    return [
        make_row(model, "linear_probe_top1", layer, 100.0 * round(p / 100.0 * n) / n, n=n, feature=feature)
        for layer, p in enumerate(percents, start=1)
    ]


def _head_rows(model: str, metric: str, values: list[float], stderr: float | None) -> list[Row]:
    offsets = np.linspace(-HEAD_SPREAD[metric], HEAD_SPREAD[metric], HEADS)  # heads average to the layer value
    return [
        make_row(model, metric, layer, v + off, head=h, stderr=_stderr(v) if stderr is None else stderr, n=TEST_IMAGES)
        for layer, v in enumerate(values, start=1)
        for h, off in enumerate(offsets)
    ]


def model_rows(
    model: str,
    profile: Mapping[str, list[float]],
    skip: set[str],
    stderrs: Mapping[str, float] | None = None,
    probe_n: int = PROBE_TEST_IMAGES,
) -> list[Row]:
    rows: list[Row] = []
    se = dict(stderrs or {})
    for metric in ATTENTION_METRICS:
        if metric in profile and metric not in skip:
            rows += per_layer_rows(model, metric, profile[metric], stderr=se.get(metric))
            rows += _head_rows(model, metric, profile[metric], se.get(metric))
    for metric in TOKEN_METRICS:
        if metric in profile and metric not in skip:
            values = [profile[metric][0]] + list(profile[metric])
            rows += per_layer_rows(model, metric, values, first_layer=0, stderr=se.get(metric))
    for metric in LAYER_METRICS:
        if metric in profile and metric not in skip:
            rows += per_layer_rows(model, metric, profile[metric], stderr=se.get(metric))
    if "linear_probe_top1" not in skip:
        for feature in ("cls", "gap"):
            if f"probe_{feature}" in profile:
                rows += probe_rows(model, feature, profile[f"probe_{feature}"], probe_n)
    if "noise_drop" in profile and "noise_drop" not in skip:
        rows += [
            make_row(model, "noise_drop", None, v, n=NOISE_IMAGES, band=b) for b, v in enumerate(profile["noise_drop"])
        ]
    depth = len(profile["token_cosine"])
    if "fourier_delta" not in skip:
        for layer in range(depth + 1):
            high = profile["fourier_high"][max(layer - 1, 0)]
            curve = high * np.linspace(0.0, 1.0, GRID[0] - GRID[0] // 2)  # h − h//2 values (docs/metrics.md)
            rows += [make_row(model, "fourier_delta", layer, v, freq=f) for f, v in enumerate(curve)]
    if "singular_values" not in skip:
        for layer in range(depth + 1):
            rank = profile["effective_rank"][max(layer - 1, 0)]
            spectrum = 10.0 * np.exp(-np.arange(16) / (rank / 3.0))
            rows += [make_row(model, "singular_values", layer, v, index=i) for i, v in enumerate(spectrum)]
    return rows


def cka_rows(model: str, other: str, depth: int, other_depth: int) -> list[Row]:
    i, j = np.meshgrid(np.arange(depth + 1), np.arange(other_depth + 1), indexing="ij")
    sim = np.exp(-np.abs(i / depth - j / other_depth) * 2.5)
    return [
        make_row(model, "cka", int(a), float(sim[a, b]), other_model=other, other_layer=int(b))
        for a in range(depth + 1)
        for b in range(other_depth + 1)
    ]


def make_results(
    models: Iterable[str] = ("cl", "mim", "control", "hybrid", "resnet"),
    *,
    overrides: Mapping[tuple[str, str], list[float]] | None = None,
    drop: Iterable[tuple[str, str]] = (),
    meta_models: bool = True,
    stderrs: Mapping[tuple[str, str], float] | None = None,
    probe_n: int = PROBE_TEST_IMAGES,
    roles: Mapping[str, str] | None = None,
) -> Results:
    """Rows of ``models`` in the real format (probes in percent of ``probe_n`` test images, no stderr);
    ``roles`` is saved as ``meta['roles']`` (as ``vitscope analyze --cl ... --mim ...`` does)."""
    models = list(models)
    overrides = dict(overrides or {})
    dropped = set(drop)
    rows: list[Row] = []
    for model in models:
        profile = {k: list(v) for k, v in PROFILES[model].items()}
        for (m, metric), values in overrides.items():
            if m == model:
                profile[metric] = list(values)
        skip = {metric for m, metric in dropped if m == model}
        model_se = {metric: se for (m, metric), se in (stderrs or {}).items() if m == model}
        rows += model_rows(model, profile, skip, model_se, probe_n)
    if "cl" in models and ("cl", "cka") not in dropped:
        rows += cka_rows("cl", "cl", L, L)
        if "resnet" in models:
            rows += cka_rows("cl", "resnet", L, 4)
    meta = {
        "models": {m: model_meta(m) for m in models} if meta_models else {},
        "data": "folder:/data/imagenette-val",
        "num_images": TEST_IMAGES,
        "skipped": [["/data/imagenette-val/broken.jpg", "cannot identify image file"]],
        "versions": {"vitscope": "0.1.0", "torch": "2.14.1", "timm": "1.0.31"},
        "seed": 0,
        "wall_time_s": 12.5,
        "notes": ["attention metrics skipped for resnet: not a transformer"],
        "roles": dict(roles or {}),
    }
    return Results(rows, meta)


def _fake_attention(model: str, rng: np.random.Generator, queries: np.ndarray) -> np.ndarray:
    """[L, Q, h, w]: MIM-like maps stay around the query; CL-like late maps all look at one region."""
    rows, cols = np.mgrid[0 : GRID[0], 0 : GRID[1]]
    collapse_from = {"cl": 3, "hybrid": 4}.get(model, L)
    maps = np.empty((L, len(queries), *GRID))
    for layer in range(L):
        for q, (qr, qc) in enumerate(queries):
            if model == "control":
                logits = rng.normal(scale=0.05, size=GRID)
            elif layer >= collapse_from:
                logits = -((rows - 1.0) ** 2 + (cols - 2.0) ** 2) / 0.8 + rng.normal(scale=0.1, size=GRID)
            else:
                logits = -((rows - qr) ** 2 + (cols - qc) ** 2) / (0.6 + 0.3 * layer) + rng.normal(scale=0.1, size=GRID)
            maps[layer, q] = np.exp(logits) / np.exp(logits).sum()
    return maps


def make_arrays(models: Iterable[str] = VIT_MODELS, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    blob = np.exp(-((yy - 0.35) ** 2 + (xx - 0.6) ** 2) / 0.03)
    image = np.stack([0.3 + 0.6 * blob, 0.2 + 0.5 * yy, 0.6 - 0.4 * xx]).clip(0, 1)
    arrays: dict[str, np.ndarray] = {"example_image": image.astype(np.float32)}
    queries = np.array([[0, 0], [1, 2], [3, 3]])
    for model in models:
        arrays[f"{model}/attention_maps"] = _fake_attention(model, rng, queries).astype(np.float32)
        arrays[f"{model}/query_positions"] = queries
        centres = rng.normal(scale=4.0, size=(3, 2))
        labels = np.repeat(np.arange(3), 2 * N)
        image_ids = np.repeat(np.arange(6), N)
        arrays[f"{model}/tsne_points"] = (centres[labels] + rng.normal(size=(len(labels), 2))).astype(np.float32)
        arrays[f"{model}/tsne_labels"] = labels
        arrays[f"{model}/tsne_image_ids"] = image_ids
        # spatial localisation: each last-block position peaks at its own input position (4 x 4 grid)
        cells = np.stack(np.meshgrid(np.arange(4), np.arange(4), indexing="ij"), -1).reshape(-1, 2)
        dist = np.linalg.norm(cells[:, None] - cells[None], axis=-1)
        arrays[f"{model}/localisation"] = np.exp(-dist).reshape(16, 4, 4).astype(np.float32)
    return arrays


def write_results_dir(
    out_dir: str | Path, results: Results | None = None, arrays: Mapping[str, np.ndarray] | None = None
) -> Path:
    """Write a committed run: metrics.{csv,json}, arrays.npz (pass ``arrays={}`` to leave it out), manifest.json."""
    out = Path(out_dir)
    save_run(out, results if results is not None else make_results(), make_arrays() if arrays is None else arrays)
    return out


def only(results: Results, *metrics: str) -> Results:
    """The rows of ``metrics`` only, with the same metadata."""
    return Results([r for r in results.rows if r["metric"] in metrics], results.meta)
