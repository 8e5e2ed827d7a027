"""Capture faults: an architecture vitscope cannot analyse is refused with its reason, one it can is captured
exactly (attention equal to the model's own to 1e-6), never silently wrong numbers.

Every model is a small random-weight one built on the spot: timm (``pretrained=False``), transformers configs,
OpenCLIP configs; nothing is downloaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import ClassVar

import pytest
import timm
import torch
from timm.layers import Attention
from timm.utils import AttentionExtract
from torch import Tensor, nn

from vitscope import cli
from vitscope.capture import LayerOutput, ViTCapture, make_capture
from vitscope.capture import vit as vit_capture
from vitscope.capture.blocks import UnsupportedModelError
from vitscope.models import load_model

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)


def build(name: str, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def images(size: int | tuple[int, int] = 32, batch: int = 2) -> Tensor:
    height, width = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))


def own_attention(model: nn.Module, x: Tensor) -> list[Tensor]:
    """The model's own attention probabilities, block by block: the softmax nodes of its traced graph (timm)."""
    fused = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    for module, _ in fused:
        module.fused_attn = False
    try:
        with torch.no_grad():
            return list(AttentionExtract(model, method="fx")(x).values())
    finally:
        for module, value in fused:
            module.fused_attn = value


def assert_attention_is_the_models(layers: list[LayerOutput], theirs: list[Tensor]) -> None:
    ours = [layer.attn for layer in layers[1:]]
    assert len(ours) == len(theirs) and all(attn is not None for attn in ours)
    for attn, expected in zip(ours, theirs):
        assert attn is not None
        torch.testing.assert_close(attn, expected.reshape(attn.shape), rtol=0, atol=1e-6)
        torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn.sum(-1)), rtol=0, atol=1e-5)


def block_tokens(model: nn.Module, x: Tensor) -> list[Tensor]:
    """timm's own residual stream after each block (prefix tokens first), [B, T, C]."""
    with torch.no_grad():
        found = model.forward_intermediates(x, norm=False, output_fmt="NLC", return_prefix_tokens=True)
    return [torch.cat([prefix, spatial], dim=1) for spatial, prefix in found[1]]


# -- attention that is not one softmax map per head ----------------------------------------------------------


def test_diff_attention_is_refused_with_its_reason_and_its_tokens_stay_exact() -> None:
    model = build("vit_dwee_patch16_reg1_gap_256", **SMALL)
    with pytest.raises(UnsupportedModelError, match=r"A1 - λ·A2 .* attention=False") as refused:
        make_capture(model)
    assert isinstance(refused.value, ValueError) and "\n" not in str(refused.value)
    x = images()
    layers = make_capture(model, attention=False).collect(x)
    for layer, theirs in zip(layers[1:], block_tokens(model, x)):
        torch.testing.assert_close(layer.tokens, theirs, rtol=0, atol=0)
        assert layer.attn is None and layer.stream_in is not None  # its residual layout is plain x + attn + mlp


def test_the_generic_guard_refuses_diff_attention_even_unnamed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vit_capture, "_UNSUPPORTED_ATTENTION", {})
    model = build("vit_dwee_patch16_reg1_gap_256", **SMALL)
    with pytest.raises(UnsupportedModelError, match=r"block 1\): .*not one \[T, T\] map for each of its 2 heads"):
        make_capture(model).collect(images())


class TanhAttention(Attention):
    """An attention variant as a third party might write one: softmax(QKᵀ) as usual, heads tanh(A·V)."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn = self.attn_drop((q * self.scale @ k.transpose(-2, -1)).softmax(dim=-1))
        heads = torch.tanh(attn @ v)
        return self.proj(self.norm(heads.transpose(1, 2).reshape(batch, tokens, width)))


def test_an_attention_whose_heads_are_not_probabilities_times_values_is_refused() -> None:
    model = build("vit_small_patch16_224", **SMALL)
    for block in model.blocks:
        block.attn.__class__ = TanhAttention
    with pytest.raises(UnsupportedModelError, match=r"per-head outputs differ from attention x values"):
        make_capture(model).collect(images())
    layers = make_capture(model, attention=False).collect(images())  # tokens and branches need no attention
    assert layers[-1].mlp_branch is not None


class CountingAttention(Attention):
    """timm's attention, counting the rows of every input it is given."""

    rows: ClassVar[list[int]] = []

    def forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        CountingAttention.rows.append(int(x.shape[0]))
        return super().forward(x, *args, **kwargs)


def test_the_first_batch_checks_the_model_on_its_first_two_images_and_still_catches_a_fault() -> None:
    model = build("vit_small_patch16_224", **SMALL)
    for block in model.blocks:
        block.attn.__class__ = CountingAttention
    CountingAttention.rows = []
    capture = make_capture(model)
    capture.collect(images(batch=5))  # verified: each module ran on 5 images, then again on 2 to show its values
    capture.collect(images(batch=5))  # verified already: no second call
    assert CountingAttention.rows == [5, 2, 5, 2, 5, 5]
    for block in model.blocks:
        block.attn.__class__ = TanhAttention
    with pytest.raises(UnsupportedModelError, match=r"per-head outputs differ from attention x values"):
        make_capture(model).collect(images(batch=5))


def test_shifted_window_attention_is_checked_on_the_first_images_windows_with_its_whole_mask() -> None:
    kwargs = dict(img_size=36, embed_dim=24, depths=(2, 2, 1, 1), num_heads=(1, 2, 3, 4), window_size=3, num_classes=0)
    model = build("swin_tiny_patch4_window7_224", **kwargs)  # blocks 2 and 4 shift their windows (a mask)
    x = images(36, batch=5)
    layers = make_capture(model).collect(x)
    assert_attention_is_the_models(layers, own_attention(model, x))


# -- parallel blocks -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "block"),
    [
        ("vit_pwee_patch16_reg1_gap_256", "ParallelScalingBlock"),
        ("vit_dpwee_patch16_reg1_gap_256", "DiffParallelScalingBlock"),
        ("vit_small_patch16_18x2_224", "ParallelThingsBlock"),
    ],
)
def test_parallel_blocks_refuse_attention_and_branches_and_give_exact_tokens(name: str, block: str) -> None:
    model = build(name, **SMALL)
    for attention, branches in ((True, True), (True, False), (False, True)):
        with pytest.raises(UnsupportedModelError, match=rf"{block}s run attention and MLP side by side"):
            make_capture(model, attention=attention, branches=branches)
    x = images()
    capture = make_capture(model, attention=False, branches=False)
    assert isinstance(capture, ViTCapture) and capture.facts.num_heads == 2
    layers = capture.collect(x)
    assert len(layers) == 3
    for layer, theirs in zip(layers[1:], block_tokens(model, x)):
        torch.testing.assert_close(layer.tokens, theirs, rtol=0, atol=0)


# -- strides read off the geometry ---------------------------------------------------------------------------


def test_swin_strides_and_heads_follow_its_stages_when_the_image_is_no_multiple_of_them() -> None:
    heads = (1, 2, 3, 4)
    kwargs = dict(img_size=36, embed_dim=24, depths=(1, 1, 1, 1), num_heads=heads, window_size=3, num_classes=0)
    model = build("swin_tiny_patch4_window7_224", **kwargs)
    x = images(36)
    inputs: list[Tensor] = []
    hooks = [
        stage.blocks[0].attn.register_forward_pre_hook(lambda _m, a: inputs.append(a[0])) for stage in model.layers
    ]
    capture = make_capture(model)
    layers = capture.collect(x)
    for hook in hooks:
        hook.remove()
    strides = [4, 4, 8, 16, 32]  # depth 0 is the patch embedding
    assert [layer.patch_size for layer in layers] == [(s, s) for s in strides]
    assert [layer.grid for layer in layers] == [(math.ceil(36 / s),) * 2 for s in strides]
    assert_attention_is_the_models(layers, own_attention(model, x))
    assert len(inputs) == len(heads)  # the verifying second call of each attention module is not the model's
    for layer, stage, windows_in in zip(layers[1:], model.layers, inputs):
        attn, out = layer.attn, layer.head_outputs
        assert attn is not None and out is not None
        module = stage.blocks[0].attn
        assert attn.shape[1] == out.shape[1] == module.num_heads
        with torch.no_grad():  # the values from the block's own projection, split into its own heads
            qkv = module.qkv(windows_in).reshape(*windows_in.shape[:2], 3, module.num_heads, -1)
        torch.testing.assert_close(out, attn @ qkv[:, :, 2].transpose(1, 2), rtol=0, atol=1e-6)


def test_hybrid_vit_stride_is_the_backbone_stride_times_the_patch() -> None:
    model = build("vit_tiny_r_s16_p8_224", img_size=64, depth=2, num_classes=0)
    x = images(64)
    capture = make_capture(model)
    assert capture.facts.patch_size == (32, 32)
    layers = capture.collect(x)
    assert all(layer.grid == (2, 2) and layer.tokens.shape[1] == 5 for layer in layers)
    assert_attention_is_the_models(layers, own_attention(model, x))


def test_naflexvit_is_captured_on_images_exactly() -> None:
    model = build("naflexvit_base_patch16_gap", depth=2, embed_dim=32, num_heads=2, num_classes=0)
    x = images((64, 48))
    capture = make_capture(model)
    assert capture.facts.patch_size == (16, 16) and capture.facts.num_prefix_tokens == model.num_prefix_tokens
    layers = capture.collect(x)
    assert all(layer.grid == (4, 3) for layer in layers)
    assert_attention_is_the_models(layers, own_attention(model, x))
    for layer, theirs in zip(layers[1:], block_tokens(model, x)):  # timm's fused attention: float rounding apart
        torch.testing.assert_close(layer.tokens, theirs, rtol=1e-5, atol=1e-6)


# -- loaders ---------------------------------------------------------------------------------------------------


def test_openclip_siglip_image_size_sets_its_timm_trunk_and_is_captured_exactly() -> None:
    visual = load_model("open_clip:ViT-B-16-SigLIP?image_size=32")
    trunk = visual.trunk
    assert tuple(trunk.patch_embed.img_size) == (32, 32) and trunk.pos_embed.shape[1] == 4
    assert any("set_input_size" in line for line in visual.vitscope_load_report.resized)
    x = images(32)
    capture = make_capture(visual)
    with torch.no_grad():
        expected = visual(x)
    layers = capture.collect(x)
    with torch.no_grad():
        torch.testing.assert_close(capture.run(x, lambda layer: None), expected, rtol=1e-5, atol=1e-5)
    assert [layer.grid for layer in layers] == [(2, 2)] * 13
    assert_attention_is_the_models(layers, own_attention(trunk, x))


def test_openclip_timm_tower_weights_are_resampled_to_image_size(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed

    vision = dict(timm_model_name="vit_tiny_patch16_224", timm_pool="", timm_proj="linear", image_size=224)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 16, "vision_cfg": vision}}))
    native = load_model(f"open_clip:local-dir:{tmp_path}?seed=3")
    save_file({f"visual.{k}": v.contiguous() for k, v in native.state_dict().items()}, tmp_path / "model.safetensors")
    resized = load_model(f"open_clip:local-dir:{tmp_path}?image_size=64")
    expected = resample_abs_pos_embed(native.trunk.pos_embed.detach(), new_size=[4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(resized.trunk.pos_embed, expected, rtol=0, atol=0)
    torch.testing.assert_close(resized.trunk.blocks[0].attn.qkv.weight, native.trunk.blocks[0].attn.qkv.weight)
    assert make_capture(resized).collect(images(64))[-1].grid == (4, 4)


def test_hf_siglip2_is_refused_with_its_reason(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.Siglip2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=8, num_patches=16
    )
    model = transformers.Siglip2VisionModel(config).eval()
    model.save_pretrained(tmp_path)  # no preprocessor_config.json beside it
    with pytest.raises(UnsupportedModelError, match=r"Siglip2VisionModel: it takes variable-resolution patch"):
        load_model(f"hf:{tmp_path}")
    with pytest.raises(UnsupportedModelError, match=r"not images on a fixed grid"):
        make_capture(model)


def test_cli_refuses_diff_attention_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    spec = "random:vit_dwee_patch16_reg1_gap_256?img_size=32&patch_size=8&embed_dim=32&depth=2&num_heads=2"
    code = cli.main(["capture", "--model", spec, "--num-images", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("vitscope capture: error: VisionTransformer: its blocks use differential")
    assert len(err.splitlines()) == 1


def test_cli_capture_reports_swin_stages_per_image(capsys: pytest.CaptureFixture[str]) -> None:
    swin = "img_size=36&embed_dim=24&depths=(1,1,1,1)&num_heads=(1,2,3,4)&window_size=3"
    spec = f"random:swin_tiny_patch4_window7_224?{swin}"
    assert cli.main(["capture", "--model", spec, "--num-images", "2", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "hierarchical, 4 layers, 1, 2, 3, 4 heads" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    entropies = {int(row[0]): float(row[-1]) for row in rows if row[-1] != "—"}  # depth 0 has no attention
    assert [row[-1] for row in rows if int(row[0]) == 0] == ["—"]
    for depth in range(1, 5):  # a window of 3x3 tokens (or fewer): the mean row entropy is at most ln 9
        assert 0 < entropies[depth] <= math.log(9) + 1e-6
