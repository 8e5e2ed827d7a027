"""OpenCLIP visual towers: the capture (attention, head outputs, branches, layouts) and the loader, on tiny
random-weight models built from small configs; nothing is downloaded."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor, nn

open_clip = pytest.importorskip("open_clip")

from open_clip.model import CLIP  # noqa: E402

from vitscope.capture import make_capture  # noqa: E402
from vitscope.capture.layer import LayerOutput  # noqa: E402
from vitscope.capture.openclip import OpenCLIPCapture  # noqa: E402
from vitscope.capture.vit import UnsupportedModelError  # noqa: E402
from vitscope.data.transforms import build_transform, input_normalisation  # noqa: E402
from vitscope.models import (  # noqa: E402
    CheckpointMismatchError,
    UnsafeCheckpointError,
    WeightsNotFoundError,
    load_model,
)

ARCH = "vitscope-test-tiny-vit"
VISION = dict(layers=2, width=32, head_width=8, patch_size=8, image_size=32, mlp_ratio=2.0)
TEXT = dict(context_length=8, vocab_size=64, width=32, heads=4, layers=1)
CONFIG = {"embed_dim": 16, "vision_cfg": VISION, "text_cfg": TEXT}


def tiny_clip(seed: int = 0, **vision: object) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(16, {**VISION, **vision}, TEXT).eval()


def images(batch: int = 2, size: int = 32) -> Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def arch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A tiny config registered with open_clip's own API, removed again after this module."""
    import open_clip.factory as factory

    config_file = tmp_path_factory.mktemp("open_clip_configs") / f"{ARCH}.json"
    config_file.write_text(json.dumps(CONFIG))
    open_clip.add_model_config(config_file)
    try:
        yield ARCH
    finally:
        factory._MODEL_CONFIG_PATHS.remove(config_file)
        factory._MODEL_CONFIGS.pop(ARCH, None)


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ----------------------------------------------------------------------------- capture
def test_capture_leaves_output_unchanged_and_gives_every_depth() -> None:
    visual = tiny_clip().visual
    x = images()
    with torch.no_grad():
        plain = visual(x)
    capture = make_capture(visual)
    assert isinstance(capture, OpenCLIPCapture)
    layers = capture.collect(x)
    assert torch.allclose(capture.run(x, lambda _layer: None), plain, atol=1e-6)
    facts = capture.facts
    assert (facts.kind, facts.num_layers, facts.num_heads, facts.embed_dim) == ("vit", 2, 4, 32)
    assert (facts.num_prefix_tokens, facts.patch_size, facts.has_class_token) == (1, (8, 8), True)
    assert facts.layer_names == ("transformer.resblocks.0", "transformer.resblocks.1")
    assert [layer.depth for layer in layers] == [0, 1, 2]
    for layer in layers:
        assert layer.tokens.shape == (2, 1 + 4 * 4, 32)
        assert (layer.grid, layer.num_prefix_tokens, layer.patch_size) == ((4, 4), 1, (8, 8))
        assert layer.has_class_token
    with torch.no_grad():  # depth 0 by hand: patches, class token, position embedding, ln_pre
        patches = visual.conv1(x).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.expand(2, 1, -1)
        stream = visual.ln_pre(torch.cat([cls, patches], dim=1) + visual.positional_embedding)
        assert torch.allclose(layers[0].tokens, stream, atol=1e-6)
        for layer, block in zip(layers[1:], visual.transformer.resblocks):
            stream = block(stream)
            assert torch.allclose(layer.tokens, stream, atol=1e-5)
    assert layers[0].attn is None and layers[0].stream_in is None


def hand_attention(block: nn.Module, stream_in: Tensor) -> tuple[Tensor, Tensor]:
    """softmax(QKᵀ/√d) [B, H, T, T] and A·V [B, H, T, D] from the block's weights, independently of torch's MHA."""
    attn = block.attn
    b, t, c = stream_in.shape
    heads = attn.num_heads
    q, k, v = F.linear(block.ln_1(stream_in), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (z.reshape(b, t, heads, c // heads).transpose(1, 2) for z in (q, k, v))
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // heads), dim=-1)
    return probs, probs @ v


@pytest.mark.parametrize("ls_init_value", [None, 1e-5])
def test_attention_heads_and_branches_are_exact(ls_init_value: float | None) -> None:
    visual = tiny_clip(ls_init_value=ls_init_value).visual
    if ls_init_value is not None:  # random per-channel layer scales around 1e-5
        for module in visual.modules():
            if hasattr(module, "gamma"):
                module.gamma.data.uniform_(0.5e-5, 2e-5)
    layers = OpenCLIPCapture(visual).collect(images())
    with torch.no_grad():
        for layer, block in zip(layers[1:], visual.transformer.resblocks):
            probs, heads = hand_attention(block, layer.stream_in)
            assert layer.attn.shape == (2, 4, 17, 17) and layer.head_outputs.shape == (2, 4, 17, 8)
            assert torch.allclose(layer.attn.sum(-1), torch.ones(2, 4, 17), atol=1e-6)
            assert torch.allclose(layer.attn, probs, atol=1e-6)
            assert torch.allclose(layer.head_outputs, heads, atol=1e-6)
            merged = block.attn.out_proj(layer.head_outputs.transpose(1, 2).flatten(2))
            assert torch.allclose(block.ls_1(merged), layer.attn_branch, rtol=1e-5, atol=1e-9)
            mlp = block.ls_2(block.mlp(block.ln_2(layer.stream_in + layer.attn_branch)))
            assert torch.allclose(layer.mlp_branch, mlp, rtol=1e-6, atol=0)  # exact, not a difference
            assert torch.allclose(layer.stream_in + layer.attn_branch + layer.mlp_branch, layer.tokens, atol=1e-6)
            if ls_init_value is not None:
                assert layer.mlp_branch.abs().max() < 1e-3 * layer.tokens.abs().max()


def test_sequence_first_blocks_give_the_same_batch_first_layers() -> None:
    """Older open_clip runs the blocks on [T, B, C] (nn.MultiheadAttention.batch_first False)."""
    visual = tiny_clip().visual
    legacy = copy.deepcopy(visual)
    legacy.transformer.batch_first = False
    for block in legacy.transformer.resblocks:
        block.attn.batch_first = False
    x = images()
    with torch.no_grad():
        assert torch.allclose(legacy(x), visual(x), atol=1e-6)
    expected, found = OpenCLIPCapture(visual).collect(x), OpenCLIPCapture(legacy).collect(x)
    for a, b in zip(expected, found):
        for name in ("tokens", "attn", "head_outputs", "stream_in", "attn_branch", "mlp_branch"):
            left, right = getattr(a, name), getattr(b, name)
            assert (left is None) == (right is None), name
            if left is not None:
                assert left.shape == right.shape and torch.allclose(left, right, atol=1e-5), name


def test_mha_and_checkpointing_restored_after_run_and_after_an_exception() -> None:
    visual = tiny_clip().visual
    visual.transformer.grad_checkpointing = True
    capture = OpenCLIPCapture(visual)
    x = images()
    capture.run(x, lambda _layer: None)
    assert all_hooks(visual) == 0 and visual.transformer.grad_checkpointing is True

    def fail(layer: LayerOutput) -> None:
        if layer.depth == 1:
            raise KeyError("consumer failed")

    with pytest.raises(KeyError, match="consumer failed"):
        capture.run(x, fail)
    assert all_hooks(visual) == 0 and visual.transformer.grad_checkpointing is True
    calls: list[object] = []
    visual.transformer.resblocks[0].attn.register_forward_pre_hook(
        lambda _m, _args, kwargs: calls.append(kwargs.get("need_weights")), with_kwargs=True
    )
    with torch.no_grad():
        visual(x)
    assert calls == [False]  # open_clip's own call again, not the capture's need_weights=True


def test_attentional_pooler_and_no_ln_pre_variants() -> None:
    visual = tiny_clip(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=4, no_ln_pre=True).visual
    x = images()
    with torch.no_grad():
        plain = visual(x)
    capture = OpenCLIPCapture(visual)
    layers = capture.collect(x)
    assert torch.allclose(capture.run(x, lambda _layer: None), plain, atol=1e-6)
    assert len(layers) == 3 and all(layer.tokens.shape == (2, 17, 32) for layer in layers)
    assert all_hooks(visual) == 0


def test_custom_blocks_need_attention_off_and_whole_models_are_refused() -> None:
    visual = tiny_clip(qk_norm=True).visual
    with pytest.raises(UnsupportedModelError, match="attention=False"):
        OpenCLIPCapture(visual)
    layers = OpenCLIPCapture(visual, attention=False).collect(images())
    assert layers[1].attn is None
    block = layers[1]
    assert torch.allclose(block.stream_in + block.attn_branch + block.mlp_branch, block.tokens, atol=1e-6)
    with pytest.raises(UnsupportedModelError, match=r"model\.visual"):
        make_capture(tiny_clip())


def test_timm_tower_is_captured_on_its_trunk() -> None:
    torch.manual_seed(0)
    vision = dict(timm_model_name="test_vit", timm_model_pretrained=False, timm_pool="token", image_size=160)
    visual = CLIP(16, vision, TEXT).visual.eval()
    x = images(1, 160)
    with torch.no_grad():
        plain = visual(x)
    capture = make_capture(visual)
    layers = capture.collect(x)
    assert torch.allclose(capture.run(x, lambda _layer: None), plain, atol=1e-6) and plain.shape == (1, 16)
    assert capture.facts.num_layers == len(layers) - 1 == 6
    assert layers[-1].tokens.shape[1] == capture.facts.num_prefix_tokens + 10 * 10


# ----------------------------------------------------------------------------- loading
def test_random_init_is_seeded_with_openclip_preprocessing(arch: str) -> None:
    a = load_model(f"open_clip:{arch}", seed=3)
    b = load_model(f"open_clip:{arch}?seed=3")
    c = load_model(f"open_clip:{arch}", seed=4)
    assert type(a).__name__ == "VisionTransformer" and not a.training
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.conv1.weight, c.conv1.weight)
    report = a.vitscope_load_report
    assert report.source == "open_clip" and report.path is None
    assert any("random initialisation (seed=3)" in note for note in report.notes)
    assert input_normalisation(a) == (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    assert build_transform(a)(Image.new("RGB", (50, 40))).shape == (3, 32, 32)


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "training"])
def test_checkpoint_files_load_identical_visual_weights(arch: str, tmp_path: Path, fmt: str) -> None:
    clip = tiny_clip(seed=7)
    state = {key: value.contiguous() for key, value in clip.state_dict().items()}
    if fmt == "safetensors":
        path = tmp_path / "open_clip_model.safetensors"
        save_file(state, str(path))
    elif fmt == "pt":  # the tower's own state dict
        path = tmp_path / "visual.pt"
        torch.save(clip.visual.state_dict(), path)
    else:  # open_clip's training checkpoint: epoch, name, DataParallel-prefixed state_dict
        path = tmp_path / "epoch_3.pt"
        torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    model = load_model(f"open_clip:{arch}?pretrained={path}")
    expected = clip.visual.state_dict()
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(model.state_dict()[key], expected[key]) for key in expected)
    report = model.vitscope_load_report
    assert report.complete and report.loaded == len(expected) and report.path == str(path)
    if fmt == "pt":
        assert report.dropped == []
    else:
        text_keys = [key for key in state if not key.startswith("visual.")]
        assert sorted(report.dropped) == sorted(text_keys)
        assert {"logit_scale", "token_embedding.weight"} <= set(text_keys)
    x = images()
    with torch.no_grad():
        assert torch.allclose(make_capture(model).run(x, lambda _layer: None), clip.visual(x), atol=1e-6)


def test_missing_file_tag_and_unknown_names_are_clear_errors(arch: str, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        load_model(f"open_clip:{arch}?pretrained={missing}")
    with pytest.raises(WeightsNotFoundError, match="never downloads") as caught:
        load_model("open_clip:ViT-B-32?pretrained=laion2b_s34b_b79k")
    assert "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in str(caught.value)
    with pytest.raises(WeightsNotFoundError, match="never downloads"):
        load_model("open_clip:hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    with pytest.raises(ValueError, match="unknown OpenCLIP model config 'ViT-B-33'.*ViT-B-32"):
        load_model("open_clip:ViT-B-33")
    with pytest.raises(ValueError, match="unknown option depth="):
        load_model(f"open_clip:{arch}?depth=3")


def test_a_missing_visual_key_is_a_mismatch_unless_not_strict(arch: str, tmp_path: Path) -> None:
    clip = tiny_clip()
    state = {key: value.contiguous() for key, value in clip.state_dict().items() if key != "visual.ln_post.weight"}
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointMismatchError, match=r"ln_post\.weight"):
        load_model(f"open_clip:{arch}?pretrained={path}")
    model = load_model(f"open_clip:{arch}?pretrained={path}&strict=false")
    assert model.vitscope_load_report.missing == ["ln_post.weight"]
    assert torch.equal(model.conv1.weight, clip.visual.conv1.weight)


def test_unsafe_pickles_are_refused(arch: str, tmp_path: Path) -> None:
    path = tmp_path / "unsafe.pt"
    torch.save({"state_dict": tiny_clip().state_dict(), "extra": Path("x")}, path)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        load_model(f"open_clip:{arch}?pretrained={path}")


def test_image_size_resizes_position_embeddings_and_local_dirs_load(arch: str, tmp_path: Path) -> None:
    clip = tiny_clip()
    state = {key: value.contiguous() for key, value in clip.state_dict().items()}
    save_file(state, str(tmp_path / "open_clip_model.safetensors"))
    bigger = load_model(f"open_clip:{arch}?pretrained={tmp_path / 'open_clip_model.safetensors'}&image_size=48")
    assert bigger.positional_embedding.shape == (1 + 6 * 6, 32)
    assert bigger.vitscope_load_report.resized and make_capture(bigger).collect(images(1, 48))[-1].grid == (6, 6)
    config = {"model_cfg": CONFIG, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    local = load_model(f"open_clip:local-dir:{tmp_path}")
    assert torch.equal(local.conv1.weight, clip.visual.conv1.weight)
    assert input_normalisation(local) == ((0.5,) * 3, (0.5,) * 3)
