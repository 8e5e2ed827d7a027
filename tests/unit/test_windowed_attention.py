"""Windowed attention (Swin, SAM): the streamed attention metrics equal a direct per-window computation.

Each image is captured alone (so no window order is assumed), its attention [W, H, n, n] is measured
window by window in float64 with the formulas of docs/metrics.md, and averaged over the image's
windows; the reducer's rows over a batch of several images must give those per-image values' mean
and standard error, per head and averaged over heads.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch

from vitscope.analyses import analyze_model
from vitscope.capture import ViTCapture
from vitscope.data import Batch

NUM_IMAGES = 3
MODELS = {
    "swin": (
        "swin_tiny_patch4_window7_224",
        dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4),
    ),
    "sam": (
        "samvit_base_patch16",
        dict(
            img_size=32,
            patch_size=8,
            embed_dim=32,
            depth=2,
            num_heads=4,
            window_size=2,
            global_attn_indexes=(1,),
            neck_chans=16,
        ),
    ),
}


def per_window(attn: np.ndarray, window: tuple[int, int], patch: tuple[int, int]) -> dict[str, np.ndarray]:
    """Metrics of one window's attention [H, n, n] (float64), each [H]."""
    rows, cols = np.divmod(np.arange(window[0] * window[1]), window[1])
    dist = np.hypot((rows[:, None] - rows[None]) * patch[0], (cols[:, None] - cols[None]) * patch[1])
    n = attn.shape[-1]
    plogp = np.where(attn > 0, attn * np.log(np.where(attn > 0, attn, 1.0)), 0.0)
    entropy = -plogp.sum(-1).mean(-1)
    marginal = attn.mean(-2)  # p(k) = (1/N) Σ_q A_qk
    key_entropy = -np.where(marginal > 0, marginal * np.log(np.where(marginal > 0, marginal, 1.0)), 0.0).sum(-1)
    mutual = key_entropy - entropy
    return {
        "attention_distance": (attn * dist).sum((-1, -2)) / n,
        "attention_entropy": entropy,
        "nmi": np.clip(mutual / np.sqrt(math.log(n) * key_entropy), 0.0, 1.0),
    }


def direct_values(model: torch.nn.Module, images: torch.Tensor) -> dict[tuple[str, int], np.ndarray]:
    """(metric, depth) -> per-image, per-head values [images, H] of the windowed blocks."""
    out: dict[tuple[str, int], list[np.ndarray]] = {}
    for image in images:
        for layer in ViTCapture(model).collect(image[None]):
            if layer.attn is None or layer.window is None:
                continue
            attn = layer.attn.double().numpy()  # [W, H, n, n]: this image's windows
            windows = [per_window(a, layer.window, layer.patch_size) for a in attn]
            for metric in windows[0]:
                mean_over_windows = np.mean([w[metric] for w in windows], axis=0)
                out.setdefault((metric, layer.depth), []).append(mean_over_windows)
    return {key: np.stack(values) for key, values in out.items()}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_windowed_attention_metrics_are_per_window_values_averaged_over_each_image(name):
    arch, kwargs = MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=5, **kwargs).eval()
    images = torch.randn(NUM_IMAGES, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = direct_values(model, images)
    assert expected, "no windowed block captured"
    results = analyze_model(
        model,
        [Batch(images, torch.arange(NUM_IMAGES))],
        label=name,
        metrics=["attention_distance", "nmi", "attention_entropy"],
        progress=None,
    )
    rows = {(r["metric"], r["layer"], r["head"]): r for r in results.rows}
    for (metric, depth), values in expected.items():
        for head in range(values.shape[1]):
            row = rows[(metric, depth, head)]
            assert row["value"] == pytest.approx(values[:, head].mean(), rel=1e-4, abs=1e-6), (metric, depth, head)
        per_image = values.mean(axis=1)
        row = rows[(metric, depth, None)]
        assert row["value"] == pytest.approx(per_image.mean(), rel=1e-4, abs=1e-6), (metric, depth)
        stderr = per_image.std(ddof=1) / math.sqrt(NUM_IMAGES)  # only right if windows are grouped by image
        assert row["stderr"] == pytest.approx(stderr, rel=1e-3, abs=1e-7), (metric, depth)
