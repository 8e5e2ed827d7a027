"""The attention explorer's maps: the reducer on a real tiny ViT against attention computed from its weights,
and the report's size cap (fewer images, then the mean over heads, then fewer blocks)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from tests.support.models import tiny_vit
from vitscope.analyses import AttentionMaps
from vitscope.capture import ViTCapture
from vitscope.report.explorer import explorer_html, explorer_models


def hand_spatial_attention(vit: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Per block: softmax(QKᵀ/√d) from the block's weights, CLS row and column dropped, rows renormalised
    ([B, H, N, N])."""
    x = vit._pos_embed(vit.patch_embed(images))
    maps = []
    for block in vit.blocks:
        attn, (b, t, c) = block.attn, x.shape
        d = c // attn.num_heads
        qkv = F.linear(block.norm1(x), attn.qkv.weight, attn.qkv.bias).reshape(b, t, 3, attn.num_heads, d)
        q, k = qkv.permute(2, 0, 3, 1, 4)[:2]
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)[..., 1:, 1:]
        maps.append(probs / probs.sum(dim=-1, keepdim=True))
        x = block(x)
    return maps


def run_maps(vit: torch.nn.Module, batches: list[torch.Tensor], num_images: int) -> AttentionMaps:
    reducer, offset = AttentionMaps(num_images), 0
    capture = ViTCapture(vit)
    for images in batches:
        reducer.image_offset = offset
        reducer.begin_batch(images, torch.zeros(len(images)))
        with torch.no_grad():
            capture.run(images, reducer.update)
        reducer.end_batch()
        offset += len(images)
    return reducer


def test_maps_of_the_first_images_dequantise_to_the_hand_attention():
    vit = tiny_vit(img_size=32, patch_size=8, depth=3)  # 4×4 grid, 4 heads
    torch.manual_seed(1)
    images = torch.randn(5, 3, 32, 32)
    arrays = run_maps(vit, [images[:1], images[1:4], images[4:]], num_images=3).arrays("cl")
    rows, peaks = arrays["cl/attention_rows"], arrays["cl/attention_peaks"]
    assert rows.dtype == np.uint8 and peaks.dtype == np.float16
    assert rows.shape == (3, 3, 4, 16, 16) and peaks.shape == (3, 3, 4, 16)  # images 0..2, blocks 1..3
    assert arrays["cl/attention_blocks"].tolist() == [1, 2, 3] and arrays["cl/attention_grid"].tolist() == [4, 4]
    with torch.no_grad():
        expected = torch.stack(hand_spatial_attention(vit, images[:3]), dim=1).numpy()  # [I, B, H, N, N]
    dequantised = rows / 255.0 * peaks.astype(np.float64)[..., None]
    tolerance = expected.max(axis=-1, keepdims=True) * (1 / 510 + 1e-3)  # rounding to 1/255 of the peak; float16
    assert np.all(np.abs(dequantised - expected) <= tolerance)
    assert (rows.max(axis=-1) == 255).all()  # every row scaled to its own maximum


def test_maps_gathered_from_two_processes_equal_one_process():
    vit = tiny_vit(img_size=32, patch_size=8)
    torch.manual_seed(2)
    images = torch.randn(4, 3, 32, 32)
    single = run_maps(vit, [images[:2], images[2:]], num_images=3).arrays("m")
    first = run_maps(vit, [images[:2]], num_images=3)
    second = AttentionMaps(3)  # the other process saw the second batch only (run-wide offset 2)
    second.image_offset = 2
    second.begin_batch(images[2:], torch.zeros(2))
    with torch.no_grad():
        ViTCapture(vit).run(images[2:], second.update)
    second.end_batch()
    merged = AttentionMaps(3)
    merged.merge([second.state(), first.state()])
    for key, value in single.items():
        np.testing.assert_array_equal(merged.arrays("m")[key], value)


def explorer_arrays(images: int = 3, blocks: int = 4, heads: int = 4, n: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {}
    for model in ("a", "b"):
        attn = rng.dirichlet(np.ones(n), size=(images, blocks, heads, n))
        peaks = attn.max(axis=-1)
        arrays[f"{model}/attention_rows"] = np.round(attn / peaks[..., None] * 255).astype(np.uint8)
        arrays[f"{model}/attention_peaks"] = peaks.astype(np.float16)
        arrays[f"{model}/attention_blocks"] = np.arange(1, blocks + 1)
        arrays[f"{model}/attention_grid"] = np.array([4, n // 4])
    arrays["example_images"] = rng.integers(0, 256, (images, 8, 8, 3)).astype(np.uint8)
    return arrays


def test_explorer_fits_its_size_cap_images_first_then_heads_then_blocks():
    arrays = explorer_arrays()
    colors = {"a": "#1f77b4", "b": "#ff7f0e"}
    per_image = 4 * 4 * 16 * 16  # blocks × heads × N² bytes, per model
    full = explorer_models(["a", "b"], arrays, colors, max_bytes=2 * 3 * per_image)
    assert [m.rows.shape for m in full] == [(3, 4, 4, 16, 16)] * 2 and all(m.per_head for m in full)
    two = explorer_models(["a", "b"], arrays, colors, max_bytes=2 * 3 * per_image - 1)
    assert [m.rows.shape[0] for m in two] == [2, 2]
    mean = explorer_models(["a", "b"], arrays, colors, max_bytes=2 * per_image - 1)
    assert [m.rows.shape for m in mean] == [(1, 4, 1, 16, 16)] * 2 and not mean[0].per_head
    attn = arrays["a/attention_rows"][0] / 255.0 * arrays["a/attention_peaks"][0].astype(np.float32)[..., None]
    got = mean[0].rows[0, :, 0] / 255.0 * mean[0].peaks[0, :, 0][..., None]
    np.testing.assert_allclose(got, attn.mean(axis=1), atol=attn.max() / 500)
    fewer = explorer_models(["a", "b"], arrays, colors, max_bytes=2 * 2 * 16 * 16)
    assert [m.blocks for m in fewer] == [[2, 4], [2, 4]]  # every other block, the last one kept
    page = explorer_html(fewer, arrays["example_images"])
    assert "1 image, mean over heads (size cap), blocks 2, 4" in page and 'value="0">head 1' not in page
