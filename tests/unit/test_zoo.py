"""The model zoo, in the spirit of timm's test_models.py: every architecture vitscope claims to analyse, built
small with random weights, checked for the capture's invariants against the model's own computation.

For each transformer: the capture leaves the output unchanged; every depth has prefix + grid tokens;
attention rows sum to 1 and equal timm's own attention (``timm.utils.AttentionExtract``, fx graph); the
residual branches add up to the block output and the MLP branch equals the block's MLP recomputed on
its input (also with LayerScale at 1e-5, where a subtraction loses it). For CNNs and conv hybrids:
stage grids match the strides. Architectures vitscope cannot analyse raise an error naming what.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.utils import AttentionExtract

from vitscope.capture import FeatureCapture, ViTCapture, make_capture
from vitscope.capture.vit import UnsupportedModelError

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
TRANSFORMERS = {
    "vit_small_patch16_224": SMALL,  # CLS token
    "deit_tiny_distilled_patch16_224": SMALL,  # CLS + distillation token
    "deit3_small_patch16_224": {**SMALL, "init_values": 1e-5},  # LayerScale at 1e-5
    "vit_small_patch14_reg4_dinov2": {**SMALL, "init_values": 1e-5},  # CLS + 4 registers
    "vit_medium_patch16_gap_256": SMALL,  # no class token, global average pooling
    "vit_relpos_small_patch16_224": SMALL,  # relative position bias
    "vit_base_patch16_clip_224": SMALL,  # CLIP pre-norm
    "vit_base_patch16_siglip_224": SMALL,  # SigLIP, attention pooling head
    "flexivit_small": SMALL,
    "beit_base_patch16_224": SMALL,  # relative position bias, layer scale 0.1
    "eva02_tiny_patch14_224": SMALL,  # RoPE, SwiGLU
    "samvit_base_patch16": {**SMALL, "window_size": 2, "global_attn_indexes": (1,), "neck_chans": 16},  # windows
    "swin_tiny_patch4_window7_224": dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4),
    "swinv2_tiny_window8_256": dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4),
}
STAGED = {"resnet18": {}, "convnext_atto": {}, "levit_128s": {"img_size": 64}}


def build(name: str, kwargs: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()
    for module in model.modules():  # the reference must see non-zero branches, LayerScale included
        if hasattr(module, "gamma") and isinstance(module.gamma, torch.nn.Parameter):
            module.gamma.data.normal_(0, 1e-5 if kwargs.get("init_values") == 1e-5 else 0.1)
    return model


def images(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def timm_attention(model: torch.nn.Module, x: torch.Tensor, blocks: tuple[str, ...]) -> list[torch.Tensor]:
    """timm's own attention probabilities of the named blocks, from the softmax nodes of the traced graph."""
    fused = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    for module, _ in fused:
        module.fused_attn = False
    try:
        with torch.no_grad():
            found = AttentionExtract(model, method="fx")(x)
    finally:
        for module, value in fused:
            module.fused_attn = value
    return [next(v for k, v in found.items() if k.startswith(f"{block}.attn")) for block in blocks]


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_transformer_capture_matches_the_model(name):
    model = build(name, TRANSFORMERS[name])
    x = images()
    with torch.no_grad():
        reference = model(x)
    capture = make_capture(model)
    assert isinstance(capture, ViTCapture)
    layers = capture.collect(x)
    with torch.no_grad():
        torch.testing.assert_close(capture.run(x, lambda layer: None), reference)  # output unchanged
    assert [layer.depth for layer in layers] == list(range(capture.facts.num_layers + 1))
    for layer in layers:  # token count = prefix + grid
        assert layer.tokens.shape[1] == layer.num_prefix_tokens + layer.grid[0] * layer.grid[1]
        assert layer.patch_size[0] * layer.grid[0] == 32
    expected = timm_attention(model, x, capture.facts.layer_names)
    assert len(expected) == capture.facts.num_layers
    for layer, theirs in zip(layers[1:], expected):
        ours = layer.attn
        assert ours is not None
        torch.testing.assert_close(ours.sum(-1), torch.ones_like(ours.sum(-1)))
        torch.testing.assert_close(ours, theirs.reshape(ours.shape), rtol=1e-5, atol=1e-6)
        if layer.window is not None:  # per window: [B·W, H, n, n] with n the window's tokens
            assert ours.shape[-1] == layer.window[0] * layer.window[1]
            assert ours.shape[0] % x.shape[0] == 0


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_residual_branches_are_read_not_derived(name):
    model = build(name, TRANSFORMERS[name])
    layers = make_capture(model).collect(images())
    blocks = make_capture(model).blocks
    for layer, block in zip(layers[1:], blocks):
        assert layer.stream_in is not None and layer.attn_branch is not None and layer.mlp_branch is not None
        torch.testing.assert_close(layer.stream_in + layer.attn_branch + layer.mlp_branch, layer.tokens)
        if not hasattr(block, "ls2"):
            continue
        with torch.no_grad():  # the MLP branch recomputed from the stream between the branches
            mid = layer.stream_in + layer.attn_branch
            shape = (mid.shape[0], *layer.grid, mid.shape[-1]) if name.startswith("samvit") else mid.shape
            direct = block.ls2(block.mlp(block.norm2(mid.reshape(shape)))).reshape(mid.shape)
        torch.testing.assert_close(layer.mlp_branch, direct, rtol=1e-5, atol=1e-9)
        if TRANSFORMERS[name].get("init_values") == 1e-5:  # tiny branches keep their relative precision
            relative = (layer.mlp_branch - direct).norm() / direct.norm()
            assert float(relative) < 1e-5


@pytest.mark.parametrize("name", list(STAGED))
def test_stage_grids_match_their_strides(name):
    model = build(name, STAGED[name])
    size = STAGED[name].get("img_size", 32)
    capture = make_capture(model)
    assert isinstance(capture, FeatureCapture)
    layers = capture.collect(images(size))
    for layer, stride in zip(layers, capture.strides):
        assert layer.grid == (math.ceil(size / stride), math.ceil(size / stride)) or layer.grid == (
            size // stride,
            size // stride,
        )
        assert layer.tokens.shape[1] == layer.grid[0] * layer.grid[1] and layer.attn is None


@pytest.mark.parametrize(
    ("name", "kwargs", "reason"),
    [
        ("xcit_nano_12_p8_224", dict(img_size=32, embed_dim=32, depth=2, num_heads=4), "attends over channels"),
        ("cait_xxs24_224", {**SMALL, "depth_token_only": 1}, "talking heads"),
    ],
)
def test_attention_vitscope_cannot_read_is_refused_with_its_reason_and_tokens_still_work(name, kwargs, reason):
    model = build(name, kwargs)
    with pytest.raises(UnsupportedModelError, match=reason):
        make_capture(model)
    capture = make_capture(model, attention=False, branches=False)
    layers = capture.collect(images())
    assert capture.facts.num_prefix_tokens == 0  # the class token joins after these blocks
    assert all(layer.attn is None for layer in layers) and layers[-1].tokens.shape[1] == 16


def test_a_stage_output_of_the_wrong_shape_is_an_error():
    model = build("resnet18", {})
    capture = FeatureCapture(model, module_names=["layer1"])
    capture.strides = [8]  # layer1 has stride 4: its 8x8 maps do not fit the 4x4 grid stride 8 implies
    with pytest.raises(RuntimeError, match=r"layer1 gave shape \(2, 64, 8, 8\)"):
        capture.collect(images())
