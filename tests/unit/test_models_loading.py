"""Spec strings, safe reading, strictness, timm's cache without network, plain files and bundled models."""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import socket
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import vitscope
from vitscope.models import (
    CheckpointMismatchError,
    UnsafeCheckpointError,
    WeightsNotFoundError,
    load_model,
    parse_spec,
    read_checkpoint,
)

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=0)


def tiny_vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY, **kwargs}).eval()


# ----------------------------------------------------------------------------- spec strings
def test_parse_spec_kinds_and_options() -> None:
    spec = parse_spec("random:vit_small_patch16_224?depth=6&img_size=32&strict=false&arch=x_y&scale=0.5")
    assert (spec.kind, spec.target) == ("random", "vit_small_patch16_224")
    assert spec.options == {"depth": 6, "img_size": 32, "strict": False, "arch": "x_y", "scale": 0.5}
    assert parse_spec("mocov3:/ckpt/vit-s-300ep.pth.tar").kind == "moco-v3"
    assert parse_spec("mae:/a/b?c/mae.pth").target == "/a/b?c/mae.pth"  # a '?' without k=v stays in the path
    assert parse_spec("mae:/ckpt/mae.pth").label == "mae:mae.pth"
    with pytest.raises(ValueError, match="expected KIND:TARGET"):
        parse_spec("vit_base_patch16_224")
    with pytest.raises(ValueError, match="unknown kind 'torchvision'"):
        parse_spec("torchvision:resnet50")
    with pytest.raises(ValueError, match="nothing after 'mae:'"):
        parse_spec("mae:")


def test_top_level_load_model_is_the_same() -> None:
    a = vitscope.load_model("random:vit_tiny_patch16_224", img_size=32, depth=1)
    b = load_model("random:vit_tiny_patch16_224?img_size=32&depth=1")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ----------------------------------------------------------------------------- random controls
def test_random_is_seeded_and_passes_kwargs() -> None:
    a = load_model("random:vit_tiny_patch16_224", img_size=32, depth=3)
    b = load_model("random:vit_tiny_patch16_224", img_size=32, depth=3)
    c = load_model("random:vit_tiny_patch16_224", img_size=32, depth=3, seed=1)
    assert len(a.blocks) == 3 and a.patch_embed.grid_size == (2, 2) and not a.training
    assert torch.equal(a.blocks[0].attn.qkv.weight, b.blocks[0].attn.qkv.weight)
    assert not torch.equal(a.blocks[0].attn.qkv.weight, c.blocks[0].attn.qkv.weight)
    assert a.vitscope_load_report.source == "random"
    with pytest.raises(ValueError, match="weights="):
        load_model("random:vit_small_patch16_224", weights="x.pth")


def test_unknown_timm_name_suggests_close_matches() -> None:
    with pytest.raises(ValueError, match="vit_small_patch16_224"):
        load_model("random:vit_smal_patch16_224")


# ----------------------------------------------------------------------------- safety
class CodeOnLoad:
    """Unpickling this creates ``marker`` (a directory): any code run at load time would show."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    path = tmp_path / "mae_pretrain_vit_base.pth"
    torch.save({"model": tiny_vit().state_dict(), "payload": CodeOnLoad(marker)}, path)
    for spec in (f"mae:{path}", f"file:{path}?arch=vit_tiny_patch16_224"):
        with pytest.raises(
            UnsafeCheckpointError,
            match=r"mae_pretrain_vit_base\.pth.*posix\.mkdir|"
            r"mae_pretrain_vit_base\.pth.*os\.mkdir",
        ):
            load_model(spec)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: free unpickling runs it
    assert marker.exists()


def test_legacy_format_pickle_with_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    path = tmp_path / "old.pth"
    torch.save({"w": torch.ones(2), "payload": CodeOnLoad(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match=r"old\.pth.*mkdir"):
        read_checkpoint(path)
    assert not marker.exists()


def test_unlisted_metadata_class_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pth"
    args = argparse.Namespace(output_dir=pathlib.PurePosixPath("/out"))  # a Path inside args: not allowlisted
    torch.save({"model": tiny_vit().state_dict(), "args": args}, path)
    with pytest.raises(UnsafeCheckpointError, match="PurePosixPath"):
        read_checkpoint(path)


def test_argparse_namespace_metadata_is_read_as_data(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(model="mae_vit_base_patch16", lr=None)}, path)
    loaded = read_checkpoint(path)
    assert isinstance(loaded["args"], argparse.Namespace) and loaded["args"].model == "mae_vit_base_patch16"


def test_missing_file_names_its_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "vit-b-300ep.pth.tar"
    for spec in (f"moco-v3:{missing}", f"file:{missing}?arch=vit_tiny_patch16_224"):
        with pytest.raises(FileNotFoundError, match="nowhere/vit-b-300ep.pth.tar"):
            load_model(spec)
    with pytest.raises(FileNotFoundError, match="nowhere/vit-b-300ep.pth.tar"):
        load_model("timm:test_vit", weights=missing)


def test_not_a_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(vitscope.models.CheckpointError, match="notes.pth"):
        load_model(f"mae:{path}")


# ----------------------------------------------------------------------------- strictness and reports
def test_wrong_architecture_names_keys_and_shapes(tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    save_file(tiny_vit().state_dict(), str(path))
    with pytest.raises(CheckpointMismatchError) as err:
        load_model(f"file:{path}", arch="vit_tiny_patch16_224")
    message = str(err.value)
    assert "tiny.safetensors" in message
    assert "blocks.0.attn.qkv.weight: checkpoint (192, 64) vs model (576, 192)" in message
    # the checkpoint has 2 blocks, the model 12: 10 blocks x 12 tensors would stay random
    assert "missing from the checkpoint, would stay random (120): blocks.2.norm1.weight" in message


def test_official_checkpoint_with_wrong_arch_override(tmp_path: Path) -> None:
    state = tiny_vit(embed_dim=384, num_heads=6, depth=1).state_dict()
    torch.save(state, tmp_path / "dino_deitsmall16_pretrain.pth")
    with pytest.raises(CheckpointMismatchError, match=r"cls_token: checkpoint \(1, 1, 384\) vs model \(1, 1, 192\)"):
        load_model(f"dino:{tmp_path / 'dino_deitsmall16_pretrain.pth'}", arch="vit_tiny_patch16_224")


def test_missing_encoder_weight_is_an_error_unless_not_strict(tmp_path: Path, caplog) -> None:
    model = tiny_vit()
    state = dict(model.state_dict())
    del state["blocks.1.mlp.fc2.weight"]
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointMismatchError, match=r"would stay random \(1\): blocks\.1\.mlp\.fc2\.weight"):
        load_model(f"file:{path}", arch="vit_tiny_patch16_224", **TINY)
    with caplog.at_level(logging.WARNING, logger="vitscope.models"):
        loose = load_model(f"file:{path}", arch="vit_tiny_patch16_224", strict=False, **TINY)
    report = loose.vitscope_load_report
    assert report.missing == ["blocks.1.mlp.fc2.weight"] and report.unexpected == ["extra.weight"]
    assert report.loaded == len(state) - 1
    assert torch.equal(loose.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    assert "blocks.1.mlp.fc2.weight" in caplog.text


# ----------------------------------------------------------------------------- plain files
@pytest.mark.parametrize("layout", ["safetensors", "bare", "model", "state_dict_module"])
def test_file_layouts_round_trip(tmp_path: Path, layout: str) -> None:
    model = tiny_vit()
    state = model.state_dict()
    if layout == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "w.pth"
        wrapped = {
            "bare": state,
            "model": {"model": state, "epoch": 3},
            "state_dict_module": {"state_dict": {f"module.{k}": v for k, v in state.items()}},
        }[layout]
        torch.save(wrapped, path)
    # img_size (32) and num_classes (0, no head) are read off the weights; the rest is the user's arch
    loaded = load_model(f"file:{path}?arch=vit_tiny_patch16_224&patch_size=8&embed_dim=64&depth=2&num_heads=4")
    assert loaded.patch_embed.grid_size == (4, 4) and loaded.num_classes == 0
    assert loaded.vitscope_load_report.complete
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_file_needs_arch(tmp_path: Path) -> None:
    save_file(tiny_vit().state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="arch=NAME"):
        load_model(f"file:{tmp_path / 'w.safetensors'}")


# ----------------------------------------------------------------------------- timm weights, offline
@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty caches and no network: any connection attempt fails the test instead of hanging."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return cache


def test_timm_without_cached_weights_names_the_file(offline: Path) -> None:
    with pytest.raises(WeightsNotFoundError) as err:
        load_model("timm:test_vit")
    message = str(err.value)
    assert "https://huggingface.co/timm/test_vit.r160_in1k/resolve/main/model.safetensors" in message
    assert "weights=PATH" in message and str(offline) in message


def test_timm_weights_from_hf_cache(offline: Path) -> None:
    torch.manual_seed(3)
    reference = timm.create_model("test_vit", pretrained=False).eval()
    snapshot = offline / "models--timm--test_vit.r160_in1k" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (offline / "models--timm--test_vit.r160_in1k" / "refs").mkdir()
    (offline / "models--timm--test_vit.r160_in1k" / "refs" / "main").write_text("0123abcd")
    save_file(reference.state_dict(), str(snapshot / "model.safetensors"))
    model = load_model("timm:test_vit")
    assert model.vitscope_load_report.path == str(snapshot / "model.safetensors")
    images = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        assert torch.equal(model(images), reference(images))
    headless = load_model("timm:test_vit", num_classes=0)  # the classifier is dropped, and listed
    assert headless.vitscope_load_report.dropped == ["head.weight", "head.bias"]


def test_timm_weights_option_with_resized_grid(tmp_path: Path, offline: Path) -> None:
    torch.manual_seed(4)
    reference = timm.create_model("test_vit", pretrained=False)
    path = tmp_path / "test_vit.pth"
    torch.save({"state_dict": reference.state_dict()}, path)
    model = load_model("timm:test_vit", weights=path, img_size=96)
    assert model.pos_embed.shape[1] == 1 + (96 // 16) ** 2
    assert torch.equal(model.blocks[0].attn.qkv.weight, reference.blocks[0].attn.qkv.weight)
    assert torch.equal(model.pos_embed[:, :1], reference.pos_embed[:, :1])


# ----------------------------------------------------------------------------- bundled models
def test_bundled_absent_lists_available(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vitscope.models.cards as bundled

    model = tiny_vit()
    save_file(model.state_dict(), str(tmp_path / "cl-tiny.safetensors"))
    card = {
        "arch": "vit_tiny_patch16_224",
        "arch_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4, "num_classes": 0},
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
    }
    (tmp_path / "cl-tiny.json").write_text(json.dumps(card))
    monkeypatch.setattr(bundled, "BUNDLED_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"bundled:mim-tiny.*available: cl-tiny"):
        load_model("bundled:mim-tiny")
    loaded = load_model("bundled:cl-tiny")
    assert loaded.pretrained_cfg["std"] == (0.25, 0.25, 0.25)
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_bundled_none_shipped_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vitscope.models.cards as bundled

    monkeypatch.setattr(bundled, "BUNDLED_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="available: none"):
        load_model("bundled:cl-tiny")


def test_file_spec_reads_pretrain_encoder_json(tmp_path):
    """`vitscope pretrain` writes encoder.json beside encoder.safetensors: file: needs no arch= then."""
    import json

    import timm
    import torch
    from safetensors.torch import save_file

    from vitscope.models import load_model

    kwargs = {"img_size": 28, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 4, "num_classes": 0}
    torch.manual_seed(3)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()
    save_file(model.state_dict(), str(tmp_path / "encoder.safetensors"))
    (tmp_path / "encoder.json").write_text(
        json.dumps(
            {"arch": "vit_tiny_patch16_224", "arch_kwargs": kwargs, "mean": [0.2, 0.2, 0.2], "std": [0.3, 0.3, 0.3]}
        )
    )
    loaded = load_model(f"file:{tmp_path / 'encoder.safetensors'}")
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images))
    assert tuple(loaded.pretrained_cfg["mean"]) == (0.2, 0.2, 0.2)
