"""Fine-tuning a pretrained encoder: file: specs via encoder.json, layer-wise lr decay, accuracy, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vitscope.pretrain.finetuning as ft
from vitscope.pretrain.finetuning import FinetuneConfig, finetune, load_encoder
from vitscope.pretrain.objectives import create_encoder
from vitscope.pretrain.optim import layer_decay_groups
from vitscope.pretrain.trainer import TrainConfig, export_encoder

TINY = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _stripes(root: Path, per_class: int, seed: int) -> str:
    """Class 0: horizontal stripes, class 1: vertical stripes; random period phase and noise."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(["horizontal", "vertical"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            phase = rng.integers(0, 4)
            wave = ((np.arange(16) + phase) // 2 % 2).astype(np.float64)
            image = np.tile(wave[:, None], (1, 16)) if label == 0 else np.tile(wave[None, :], (16, 1))
            image = np.clip(image * 180 + 40 + rng.normal(0, 20, (16, 16)), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / name / f"{i}.png")
    return f"folder:{root}"


def _encoder_file(tmp_path: Path) -> str:
    torch.manual_seed(0)
    encoder = create_encoder("vit_tiny_patch16_224", TINY, sincos_pos=True)
    run = tmp_path / "pretrained"
    export_encoder(run, encoder, TrainConfig(arch="vit_tiny_patch16_224", model_kwargs=TINY), step=0)
    return f"file:{run / 'encoder.safetensors'}"


def test_load_encoder_reads_encoder_json(tmp_path: Path) -> None:
    spec = _encoder_file(tmp_path)
    model, meta = load_encoder(spec)
    saved = load_file(spec[5:])
    assert meta["arch"] == "vit_tiny_patch16_224" and meta["arch_kwargs"]["embed_dim"] == 32
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert load_encoder(f"file:{tmp_path / 'pretrained'}")[1]["arch"] == "vit_tiny_patch16_224"  # the run directory
    (tmp_path / "pretrained" / "encoder.json").unlink()
    with pytest.raises(ValueError, match="encoder.json"):
        load_encoder(spec)


def test_layer_decay_groups_scale_by_depth() -> None:
    model = create_encoder("vit_tiny_patch16_224", TINY)
    model.reset_classifier(3)
    groups = layer_decay_groups(model, 0.05, 0.5)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    # L = depth + 1 = 3: embeddings 0.5^3, block i 0.5^(2 − i), head 1
    assert scale_of[id(model.patch_embed.proj.weight)] == 0.125 and scale_of[id(model.cls_token)] == 0.125
    assert scale_of[id(model.blocks[0].mlp.fc1.weight)] == 0.25 and scale_of[id(model.blocks[1].attn.qkv.weight)] == 0.5
    assert scale_of[id(model.head.weight)] == 1.0 and scale_of[id(model.norm.weight)] == 1.0
    assert decay_of[id(model.head.weight)] == 0.05 and decay_of[id(model.head.bias)] == 0.0
    assert decay_of[id(model.pos_embed)] == 0.0


def _config(tmp_path: Path, spec: str, train: str, test: str, **kw) -> FinetuneConfig:
    # a random-init encoder pools stripes of either orientation to nearly the same CLS token at first
    # (uniform attention averages the patches), so this needs a brisk learning rate and whole-image crops
    base = dict(
        model=spec,
        data=train,
        test_data=test,
        epochs=12,
        batch_size=8,
        lr=1e-2,
        layer_decay=0.75,
        warmup_epochs=0.5,
        crop_min_scale=1.0,
        drop_path=0.0,
        out=str(tmp_path / "ft"),
        progress=False,
        save_every=100,
    )
    base.update(kw)
    return FinetuneConfig(**base)


def test_finetune_separates_stripes(tmp_path: Path) -> None:
    train = _stripes(tmp_path / "train", 32, 0)
    test = _stripes(tmp_path / "test", 16, 1)
    result = finetune(_config(tmp_path, _encoder_file(tmp_path), train, test))
    assert len(result.top1) == 12
    assert result.top1[-1] >= 0.9, result.top1
    meta = json.loads((tmp_path / "ft" / "model.json").read_text())
    assert meta["arch_kwargs"]["num_classes"] == 2 and meta["top1"] == result.top1
    log = [json.loads(line) for line in (tmp_path / "ft" / "log.jsonl").read_text().splitlines()]
    assert [r["top1"] for r in log if "top1" in r] == result.top1


def test_finetune_resume_is_bit_identical(tmp_path: Path, monkeypatch) -> None:
    train = _stripes(tmp_path / "train", 16, 0)
    test = _stripes(tmp_path / "test", 8, 1)
    spec = _encoder_file(tmp_path)
    reference = finetune(_config(tmp_path, spec, train, test, epochs=2, out=str(tmp_path / "a")))

    real, calls = ft.backward_and_step, {"n": 0}

    def dies_at_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(ft, "backward_and_step", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        finetune(_config(tmp_path, spec, train, test, epochs=2, save_every=2, out=str(tmp_path / "b")))
    assert torch.load(tmp_path / "b" / "train_state.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(ft, "backward_and_step", real)
    resumed = finetune(
        _config(tmp_path, spec, train, test, epochs=2, save_every=2, out=str(tmp_path / "b"), resume=True)
    )
    assert resumed.top1 == reference.top1
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
