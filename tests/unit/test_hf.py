"""Hugging Face ``transformers`` encoders: HFCapture checked against each model's own outputs, and ``hf:`` loading.

Every model is a tiny random-weight one built from a config (hidden 32, 2 blocks, 4 heads, 32 px, patch 8);
nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from vitscope.capture import LayerOutput, make_capture  # noqa: E402
from vitscope.capture.hf import HFCapture  # noqa: E402
from vitscope.data.transforms import build_transform, input_normalisation  # noqa: E402
from vitscope.models import CheckpointMismatchError, WeightsNotFoundError, load_model  # noqa: E402
from vitscope.models.hf import HFImageTransform  # noqa: E402

SIZE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
MLP = dict(intermediate_size=64)
GRID = 16  # (32 / 8)²


def _configs() -> dict[str, Callable[[], Any]]:
    t = transformers
    return {
        "vit": lambda: t.ViTConfig(**SIZE, **MLP),
        "deit": lambda: t.DeiTConfig(**SIZE, **MLP),
        "vit_mae": lambda: t.ViTMAEConfig(**SIZE, **MLP, mask_ratio=0.0),
        "vit_msn": lambda: t.ViTMSNConfig(**SIZE, **MLP),
        "ijepa": lambda: t.IJepaConfig(**SIZE, **MLP),
        "dinov2": lambda: t.Dinov2Config(**SIZE, mlp_ratio=2),
        "dinov2_with_registers": lambda: t.Dinov2WithRegistersConfig(**SIZE, mlp_ratio=2, num_register_tokens=3),
        "dinov3_vit": lambda: t.DINOv3ViTConfig(**SIZE, **MLP, num_register_tokens=2),
        "beit": lambda: t.BeitConfig(**SIZE, **MLP, use_relative_position_bias=True, layer_scale_init_value=0.1),
        "data2vec-vision": lambda: t.Data2VecVisionConfig(
            **SIZE, **MLP, use_relative_position_bias=True, layer_scale_init_value=0.1
        ),
        "clip": lambda: t.CLIPVisionConfig(**SIZE, **MLP),
        "siglip": lambda: t.SiglipVisionConfig(**SIZE, **MLP),
    }


# family -> (model class, prefix tokens, class token, attention-branch layer scale)
FAMILIES: dict[str, tuple[str, int, bool, str | None]] = {
    "vit": ("ViTModel", 1, True, None),
    "deit": ("DeiTModel", 2, True, None),
    "vit_mae": ("ViTMAEModel", 1, True, None),
    "vit_msn": ("ViTMSNModel", 1, True, None),
    "ijepa": ("IJepaModel", 0, False, None),
    "dinov2": ("Dinov2Model", 1, True, "layer_scale1.lambda1"),
    "dinov2_with_registers": ("Dinov2WithRegistersModel", 4, True, "layer_scale1.lambda1"),
    "dinov3_vit": ("DINOv3ViTModel", 3, True, "layer_scale1.lambda1"),
    "beit": ("BeitModel", 1, True, "lambda_1"),
    "data2vec-vision": ("Data2VecVisionModel", 1, True, "lambda_1"),
    "clip": ("CLIPVisionModel", 1, True, None),
    "siglip": ("SiglipVisionModel", 0, False, None),
}


def build(family: str, attn: str = "sdpa", **config_overrides: Any) -> torch.nn.Module:
    """A tiny random model of ``family`` in eval mode, its layer scales and relative position biases randomised
    (so that a missed layer scale or bias shows)."""
    config = _configs()[family]()
    for key, value in config_overrides.items():
        setattr(config, key, value)
    model_class = getattr(transformers, FAMILIES[family][0])
    torch.manual_seed(0)
    model = model_class._from_config(config, attn_implementation=attn).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lambda" in name or "relative_position_bias_table" in name:
                param.uniform_(0.05, 0.5)
    return model


def forward_kwargs(family: str, batch: int) -> dict[str, torch.Tensor]:
    """ViTMAE keeps grid order only with noise whose argsort is the identity."""
    return {"noise": torch.arange(GRID, dtype=torch.float32).expand(batch, -1)} if family == "vit_mae" else {}


def capture_all(capture: HFCapture, images: torch.Tensor) -> tuple[Any, list[LayerOutput]]:
    kept: list[LayerOutput] = []

    def keep(layer: LayerOutput) -> None:
        values = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in vars(layer).items()}
        kept.append(LayerOutput(**values))

    return capture.run(images, keep), kept


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_capture_agrees_with_the_models_own_outputs(family: str) -> None:
    model = build(family)
    images = torch.randn(2, 3, 32, 32)
    hooks_before, impl_before = hook_count(model), model.config._attn_implementation
    self_attn_classes = [type(m) for m in model.modules() if type(m).__name__.endswith("SelfAttention")]
    with torch.no_grad():
        plain = model(images, **forward_kwargs(family, 2))
    capture = HFCapture(model)
    output, layers = capture_all(capture, images)

    # the model is as it was: output, hooks, attention implementation (and Data2Vec's SDPA class)
    torch.testing.assert_close(output.last_hidden_state, plain.last_hidden_state, rtol=1e-5, atol=1e-5)
    assert hook_count(model) == hooks_before and model.config._attn_implementation == impl_before
    assert [type(m) for m in model.modules() if type(m).__name__.endswith("SelfAttention")] == self_attn_classes

    _, prefix, class_token, scale_path = FAMILIES[family]
    facts = capture.facts
    assert (facts.num_prefix_tokens, facts.has_class_token, facts.num_layers, facts.num_heads) == (
        prefix,
        class_token,
        2,
        4,
    )
    assert [layer.depth for layer in layers] == [0, 1, 2]
    assert all(layer.tokens.shape == (2, prefix + GRID, 32) and layer.grid == (4, 4) for layer in layers)

    eager = build(family, attn="eager")
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        reference = eager(images, output_attentions=True, output_hidden_states=True, **forward_kwargs(family, 2))
    for layer, hidden in zip(layers, reference.hidden_states):
        torch.testing.assert_close(layer.tokens, hidden, rtol=1e-5, atol=1e-6)
    for layer, probs, block in zip(layers[1:], reference.attentions, capture.blocks):
        assert layer.attn is not None and layer.head_outputs is not None
        assert layer.attn.shape == (2, 4, prefix + GRID, prefix + GRID)
        torch.testing.assert_close(layer.attn.sum(-1), torch.ones(2, 4, prefix + GRID))
        torch.testing.assert_close(layer.attn, probs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.stream_in, layers[layer.depth - 1].tokens)
        total = layer.stream_in + layer.attn_branch + layer.mlp_branch
        torch.testing.assert_close(total, layer.tokens, rtol=0, atol=1e-5)
        # per-head A·V, merged back and projected, is the attention branch (before its layer scale)
        out_proj = block.get_submodule(capture.layout.out_proj)
        projected = out_proj(layer.head_outputs.transpose(1, 2).flatten(2))
        scale = block.get_parameter(scale_path) if scale_path else 1.0
        torch.testing.assert_close(projected * scale, layer.attn_branch, rtol=1e-5, atol=1e-6)


def test_vit_mae_runs_unmasked_in_grid_order() -> None:
    model = build("vit_mae", mask_ratio=0.75)  # the pretraining default: 75 % of the patches dropped at random
    images = torch.randn(2, 3, 32, 32)
    capture = make_capture(model)
    assert isinstance(capture, HFCapture)
    first, layers = capture_all(capture, images)
    second, _ = capture_all(capture, images)
    embeddings = model.embeddings
    with torch.no_grad():
        in_grid_order = embeddings.patch_embeddings(images) + embeddings.position_embeddings[:, 1:]
    torch.testing.assert_close(layers[0].spatial_tokens, in_grid_order)
    assert layers[-1].tokens.shape == (2, 1 + GRID, 32)
    torch.testing.assert_close(first.last_hidden_state, second.last_hidden_state)
    assert not first.mask.any() and model.config.mask_ratio == 0.75


def test_wrappers_modes_and_unknown_models() -> None:
    torch.manual_seed(0)
    classifier = transformers.ViTForImageClassification(transformers.ViTConfig(**SIZE, **MLP, num_labels=3)).eval()
    capture = make_capture(classifier, attention=False, branches=False)
    assert isinstance(capture, HFCapture) and capture.layout.family == "vit"
    output, layers = capture_all(capture, torch.randn(1, 3, 32, 32))
    assert output.logits.shape == (1, 3) and len(layers) == 3
    assert all(layer.attn is None and layer.mlp_branch is None for layer in layers)
    assert classifier.config._attn_implementation == "sdpa"

    resnet = transformers.ResNetModel(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1]))
    with pytest.raises(TypeError, match=r"ResNetModel .*supported: ViTModel, DeiTModel"):
        make_capture(resnet)


# -- loading ---------------------------------------------------------------------------------------------


def test_save_pretrained_dir_loads_identical_weights_and_its_own_processor(tmp_path: Path) -> None:
    model = build("dinov2")
    model.save_pretrained(tmp_path)
    processor = transformers.ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]
    )
    processor.save_pretrained(tmp_path)
    loaded = load_model(f"hf:{tmp_path}")
    report = loaded.vitscope_load_report
    assert (type(loaded).__name__, report.source, report.arch, report.path) == (
        "Dinov2Model",
        "hf",
        "Dinov2Model",
        str(tmp_path),
    )
    assert report.complete and report.arch_kwargs["img_size"] == 32 and not loaded.training
    assert loaded.config._attn_implementation == "eager"
    state, expected = loaded.state_dict(), model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[key], expected[key]) for key in expected)

    transform = build_transform(loaded)
    assert isinstance(transform, HFImageTransform)
    assert list(transform.processor.image_mean) == [0.1, 0.2, 0.3]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    pixels = transform(image)
    assert pixels.shape == (3, 32, 32)
    torch.testing.assert_close(pixels, processor(images=image, return_tensors="pt")["pixel_values"][0])
    assert input_normalisation(loaded) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))


def test_full_clip_checkpoint_gives_the_vision_tower_and_drops_the_text_tower(tmp_path: Path) -> None:
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=64)
    text.update(bos_token_id=0, eos_token_id=1, pad_token_id=2)
    config = transformers.CLIPConfig(vision_config={**SIZE, **MLP}, text_config=text, projection_dim=16)
    torch.manual_seed(0)
    full = transformers.CLIPModel(config)
    full.save_pretrained(tmp_path)
    tower = load_model(f"hf:{tmp_path}")
    report = tower.vitscope_load_report
    assert type(tower).__name__ == "CLIPVisionModel" and not report.missing and not report.unexpected
    assert any(key.startswith("text_model.") for key in report.dropped) and "logit_scale" in report.dropped
    expected = full.vision_model.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in tower.state_dict().items())
    # no preprocessor_config.json: CLIP's processor class, resized and cropped to the config's 32 px
    transform = build_transform(tower)
    assert type(transform.processor).__name__ == "CLIPImageProcessor"
    assert transform(Image.new("L", (50, 40), 128)).shape == (3, 32, 32)


def test_vit_mae_pretraining_checkpoint_loads_the_unmasked_encoder(tmp_path: Path) -> None:
    decoder = dict(decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2)
    config = transformers.ViTMAEConfig(**SIZE, **MLP, **decoder, decoder_intermediate_size=32)
    torch.manual_seed(0)
    transformers.ViTMAEForPreTraining(config).save_pretrained(tmp_path)
    encoder = load_model(f"hf:{tmp_path}")
    report = encoder.vitscope_load_report
    assert type(encoder).__name__ == "ViTMAEModel" and encoder.config.mask_ratio == 0.0
    assert report.complete and report.dropped and all(key.startswith("decoder.") for key in report.dropped)


def _fake_cache_entry(cache: Path, repo: str, model: torch.nn.Module) -> None:
    """What `hf download REPO` leaves in the cache: a snapshot folder and refs/main naming it."""
    entry = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    model.save_pretrained(entry / "snapshots" / commit)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)


def test_repo_ids_come_from_the_local_cache_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(WeightsNotFoundError, match=r"google/vit-base-patch16-224 is not in the local") as err:
        load_model("hf:google/vit-base-patch16-224")
    assert str(cache) in str(err.value) and "hf download google/vit-base-patch16-224" in str(err.value)
    _fake_cache_entry(cache, "someone/tiny-siglip", build("siglip"))
    loaded = load_model("hf:someone/tiny-siglip")
    assert type(loaded).__name__ == "SiglipVisionModel" and loaded.vitscope_load_report.complete
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_model(f"hf:{tmp_path / 'absent'}")
    with pytest.raises(ValueError, match="option img_size= is not used"):
        load_model("hf:someone/tiny-siglip?img_size=64")
    timm_folder = tmp_path / "timm"
    timm_folder.mkdir()
    (timm_folder / "config.json").write_text('{"architecture": "vit_tiny_patch16_224"}')
    with pytest.raises(ValueError, match="holds a timm model"):
        load_model(f"hf:{timm_folder}")


def test_missing_or_misshapen_encoder_weights_are_refused(tmp_path: Path) -> None:
    build("vit").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    query = next(key for key in state if ".0." in key and key.endswith(("query.weight", "q_proj.weight")))
    del state[query]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=r"would stay random \(1\): layers\.0\.attention\.q_proj\.weight"):
        load_model(f"hf:{tmp_path}")
    loose = load_model(f"hf:{tmp_path}?strict=false")
    assert loose.vitscope_load_report.missing == ["layers.0.attention.q_proj.weight"]

    key = next(key for key in state if ".1." in key and key.endswith(("key.weight", "k_proj.weight")))
    state[key] = torch.zeros(8, 32)
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch \(1\): layers\.1\.attention\.k_proj"):
        load_model(f"hf:{tmp_path}")
