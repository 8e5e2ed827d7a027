"""Capture: attention, tokens and branches of one forward pass, checked against hand computation."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import timm
import torch
import torch.nn.functional as F

from tests.support.models import tiny_vit
from vitscope.capture import FeatureCapture, ViTCapture, make_capture, spatial_attention


def hand_attention(block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(QKᵀ/√d) and Ã·V for one timm ViT block, computed from its weights."""
    attn = block.attn
    b, t, c = x.shape
    heads = attn.num_heads
    d = c // heads
    h = block.norm1(x)
    qkv = F.linear(h, attn.qkv.weight, attn.qkv.bias).reshape(b, t, 3, heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return probs, probs @ v


def test_attention_equals_hand_softmax_and_blocks_equal_forward_intermediates(vit):
    images = torch.randn(3, 3, 32, 32)
    layers = ViTCapture(vit).collect(images)
    assert [layer.depth for layer in layers] == [0, 1, 2]
    x = layers[0].tokens
    for layer, block in zip(layers[1:], vit.blocks):
        probs, head_out = hand_attention(block, x)
        torch.testing.assert_close(layer.attn, probs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.head_outputs, head_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.stream_in, x)
        # the two branches add up to the block output
        torch.testing.assert_close(
            layer.stream_in + layer.attn_branch + layer.mlp_branch, layer.tokens, rtol=1e-5, atol=1e-5
        )
        x = block(x)
        torch.testing.assert_close(layer.tokens, x)
    reference = vit.forward_intermediates(images, intermediates_only=True, norm=False, output_fmt="NLC")
    for layer, ref in zip(layers[1:], reference):
        torch.testing.assert_close(layer.spatial_tokens, ref, rtol=1e-5, atol=1e-6)


def test_beit_attention_includes_relative_position_bias():
    model = timm.create_model(
        "beit_base_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=4,
        use_abs_pos_emb=False,
        use_shared_rel_pos_bias=True,
        init_values=0.1,
    ).eval()
    with torch.no_grad():  # give the shared bias table non-zero values so that it matters
        model.rel_pos_bias.relative_position_bias_table.normal_(0, 1.0)
    images = torch.randn(2, 3, 32, 32)
    layers = ViTCapture(model).collect(images)
    block, x = model.blocks[0], layers[0].tokens
    attn = block.attn
    b, t, _c = x.shape
    qkv_bias = torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias))
    qkv = F.linear(block.norm1(x), attn.qkv.weight, qkv_bias).reshape(b, t, 3, 4, -1).permute(2, 0, 3, 1, 4)
    logits = qkv[0] @ qkv[1].transpose(-1, -2) * attn.scale + model.rel_pos_bias()
    torch.testing.assert_close(layers[1].attn, logits.softmax(-1), rtol=1e-5, atol=1e-6)
    # layer scale (gamma_1) is part of the attention branch
    assert torch.allclose(
        layers[1].stream_in + layers[1].attn_branch + layers[1].mlp_branch, layers[1].tokens, atol=1e-5
    )


def test_fused_attention_restored_after_capture_and_after_error(vit):
    for block in vit.blocks:
        block.attn.fused_attn = True
    capture = ViTCapture(vit)
    seen_fused: list[bool] = []
    capture.run(torch.randn(1, 3, 32, 32), lambda layer: seen_fused.append(vit.blocks[0].attn.fused_attn))
    assert seen_fused and not any(seen_fused)  # off while capturing
    assert all(block.attn.fused_attn for block in vit.blocks)

    def explode(layer):
        if layer.depth == 1:
            raise RuntimeError("consumer failed")

    with pytest.raises(RuntimeError, match="consumer failed"):
        capture.run(torch.randn(1, 3, 32, 32), explode)
    assert all(block.attn.fused_attn for block in vit.blocks)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in vit.modules())  # hooks removed


def test_fused_model_output_unchanged_by_capture(vit):
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = vit(images)
    out = ViTCapture(vit).run(images, lambda layer: None)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name, overrides, image_hw, prefix, grid, has_cls",
    [
        ("vit_small_patch16_224", {}, (32, 32), 1, (4, 4), True),
        ("deit_small_distilled_patch16_224", {}, (32, 32), 2, (4, 4), True),
        ("vit_small_patch16_224", {"reg_tokens": 4}, (32, 32), 5, (4, 4), True),
        ("vit_small_patch16_224", {"class_token": False, "global_pool": "avg"}, (32, 32), 0, (4, 4), False),
        ("vit_small_patch16_224", {"img_size": (32, 64)}, (32, 64), 1, (4, 8), True),
    ],
    ids=["cls", "distilled", "registers", "no-cls-gap", "non-square-2to1"],
)
def test_prefix_tokens_and_grid(name, overrides, image_hw, prefix, grid, has_cls):
    model = tiny_vit(name, **overrides)
    capture = make_capture(model)
    assert capture.facts.num_prefix_tokens == prefix
    assert capture.facts.has_class_token == has_cls
    layers = capture.collect(torch.randn(2, 3, *image_hw))
    n = grid[0] * grid[1]
    for layer in layers:
        assert layer.grid == grid
        assert layer.tokens.shape[1] == prefix + n
        assert layer.spatial_tokens.shape[1] == n
    attn = layers[-1].spatial_attn
    assert attn.shape == (2, 4, n, n)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4, n))


def test_spatial_attention_renormalises_after_dropping_prefix():
    attn = torch.tensor([[[[0.5, 0.25, 0.25], [0.2, 0.4, 0.4], [0.6, 0.1, 0.3]]]])
    expected = torch.tensor([[[[0.5, 0.5], [0.25, 0.75]]]])
    torch.testing.assert_close(spatial_attention(attn, 1), expected)


def test_peak_memory_holds_one_block_not_the_model():
    """While block l is handed out, no earlier block's attention or tokens are still alive."""
    model = tiny_vit(depth=12)
    alive_before: list[int] = []
    refs: list[weakref.ref] = []

    def consumer(layer):
        gc.collect()
        alive_before.append(sum(ref() is not None for ref in refs))
        for tensor in (layer.attn, layer.head_outputs, layer.attn_branch, layer.mlp_branch):
            if tensor is not None:
                refs.append(weakref.ref(tensor))

    ViTCapture(model).run(torch.randn(2, 3, 32, 32), consumer)
    assert len(alive_before) == 13
    assert alive_before == [0] * 13, alive_before
    # contrast: a consumer that keeps its tensors holds all twelve blocks
    kept = ViTCapture(model).collect(torch.randn(2, 3, 32, 32))
    assert sum(layer.attn is not None for layer in kept) == 12


def test_cnn_gives_stage_feature_maps_as_tokens():
    model = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    capture = make_capture(model)
    assert isinstance(capture, FeatureCapture)
    images = torch.randn(2, 3, 64, 64)
    layers = capture.collect(images)
    assert [layer.depth for layer in layers] == list(range(1, len(capture.facts.layer_names) + 1))
    stage4 = model.forward_features(images)  # [B, 512, 2, 2]
    torch.testing.assert_close(layers[-1].tokens, stage4.flatten(2).transpose(1, 2))
    assert layers[-1].grid == (2, 2) and layers[-1].attn is None


PEAK_SCRIPT = r"""
import os, sys, torch, timm
from vitscope.capture import ViTCapture
torch.set_num_threads(1)
torch.manual_seed(0)
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") / 1024


def rss_kib():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE_KIB


model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_heads=12).eval()
images = torch.randn(8, 3, 224, 224)
for block in model.blocks:
    block.attn.fused_attn = False
with torch.no_grad():
    model(images)
    model(images)
base = peak = rss_kib()
kept = []


def consumer(layer):
    global peak
    if sys.argv[1] == "keep" and layer.attn is not None:
        kept.append(layer.attn.clone())
    peak = max(peak, rss_kib())  # sampled while the layer's tensors are alive


ViTCapture(model).run(images, consumer)
print(peak - base)
"""


@pytest.mark.slow
def test_peak_rss_grows_by_about_one_block(tmp_path):
    """Measured: resident memory during a capture over a 12-block model, sampled in every callback,
    rises by about one block's attention, not twelve (a consumer that keeps them rises by eleven+)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "peak.py"
    script.write_text(PEAK_SCRIPT)
    block_kib = 8 * 12 * 197 * 197 * 4 / 1024  # one block's attention probabilities, float32

    # A fixed mmap threshold makes glibc return every large tensor to the OS when freed, so RSS follows
    # live memory; with its default dynamic threshold, freed blocks stay in the heap and get reused.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}

    def growth(mode: str) -> float:
        out = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, check=True, env=env)
        return float(out.stdout.strip().splitlines()[-1])

    streamed, kept = growth("drop"), growth("keep")
    assert streamed < 2.5 * block_kib, (streamed, block_kib)
    assert kept > 9 * block_kib, (kept, block_kib)
