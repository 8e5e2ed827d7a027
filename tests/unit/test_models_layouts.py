"""Official checkpoint layouts load back to the same encoder, checked against a plain float64 forward.

Each test writes a checkpoint in the exact layout of the official release (same top-level entries,
prefixes, key names and extra heads) from a small randomly initialised timm model, loads it with
``load_model`` and compares (1) every encoder tensor and (2) the token outputs with an independent
float64 implementation of the official forward pass that uses the official head count.
"""

from __future__ import annotations

import argparse
import math
import sys
import types
from collections import OrderedDict
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from vitscope.models import CheckpointError, load_model, read_checkpoint

IMG, PATCH = 32, 8  # 4 x 4 token grid


# ----------------------------------------------------------------------------- reference forward
def official_rel_pos_index(side: int) -> torch.Tensor:
    """BEiT/SimMIM RelativePositionBias.relative_position_index, written from the papers' code."""
    coords = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (side - 1)
    n_rel = (2 * side - 1) ** 2 + 3
    index = torch.zeros(side * side + 1, side * side + 1, dtype=torch.long)
    index[1:, 1:] = rel[..., 0] * (2 * side - 1) + rel[..., 1]
    index[0, :] = n_rel - 3
    index[:, 0] = n_rel - 2
    index[0, 0] = n_rel - 1
    return index


def reference_tokens(sd: dict[str, torch.Tensor], images: torch.Tensor, heads: int, prefix: str = "") -> torch.Tensor:
    """Token states after the final norm, in float64, from official-named weights (ViT or BEiT)."""
    w = {k[len(prefix) :]: v.double() if v.is_floating_point() else v for k, v in sd.items() if k.startswith(prefix)}
    proj = w["patch_embed.proj.weight"]
    x = F.conv2d(images.double(), proj, w["patch_embed.proj.bias"], stride=proj.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([w["cls_token"].expand(len(x), -1, -1), x], dim=1)
    if "pos_embed" in w:
        x = x + w["pos_embed"]
    batch, tokens, dim = x.shape
    rel_bias = None
    if "rel_pos_bias.relative_position_bias_table" in w:
        table, index = w["rel_pos_bias.relative_position_bias_table"], w["rel_pos_bias.relative_position_index"]
        rel_bias = table[index.view(-1)].view(tokens, tokens, -1).permute(2, 0, 1)
    depth = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("blocks."))
    for i in range(depth):
        b = f"blocks.{i}."
        h = F.layer_norm(x, (dim,), w[b + "norm1.weight"], w[b + "norm1.bias"], eps=1e-6)
        if b + "attn.q_bias" in w:
            qkv_bias = torch.cat([w[b + "attn.q_bias"], torch.zeros_like(w[b + "attn.v_bias"]), w[b + "attn.v_bias"]])
        else:
            qkv_bias = w[b + "attn.qkv.bias"]
        q, k, v = (
            F.linear(h, w[b + "attn.qkv.weight"], qkv_bias).reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
        )
        logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        if rel_bias is not None:
            logits = logits + rel_bias
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, dim)
        out = F.linear(out, w[b + "attn.proj.weight"], w[b + "attn.proj.bias"])
        x = x + (w[b + "gamma_1"] * out if b + "gamma_1" in w else out)
        h = F.layer_norm(x, (dim,), w[b + "norm2.weight"], w[b + "norm2.bias"], eps=1e-6)
        mlp = F.linear(
            F.gelu(F.linear(h, w[b + "mlp.fc1.weight"], w[b + "mlp.fc1.bias"])),
            w[b + "mlp.fc2.weight"],
            w[b + "mlp.fc2.bias"],
        )
        x = x + (w[b + "gamma_2"] * mlp if b + "gamma_2" in w else mlp)
    return F.layer_norm(x, (dim,), w["norm.weight"], w["norm.bias"], eps=1e-6)


def assert_same_model(model, sd: dict[str, torch.Tensor], heads: int, prefix: str = "") -> None:
    """Every encoder tensor identical, and the forward pass equal to the float64 reference."""
    state = model.state_dict()
    official = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    compared = 0
    for key, value in official.items():
        if key in state:
            assert torch.equal(state[key], value), key
            compared += 1
    assert compared == len(state), f"only {compared} of {len(state)} model tensors came from the checkpoint"
    images = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model.forward_features(images).double()
    want = reference_tokens(sd, images, heads, prefix)
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-4), (got - want).abs().max()
    assert model.blocks[0].attn.num_heads == heads


# ----------------------------------------------------------------------------- official-layout builders
def sincos_pos_embed(side: int, dim: int) -> torch.Tensor:
    """MoCo v3 / MAE fixed 2-D sin-cos position embedding with a zero CLS row: [1, 1 + side², dim]."""
    grid_w, grid_h = torch.meshgrid(
        torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32), indexing="ij"
    )
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_w, out_h = grid_w.flatten()[:, None] * omega, grid_h.flatten()[:, None] * omega
    pe = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), pe])[None]


def random_vit(embed_dim: int, heads: int, depth: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=IMG,
        patch_size=PATCH,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=heads,
        global_pool="token",
    )
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for key in sd:  # non-trivial norms and biases so that a wrong mapping shows
        if key.endswith("bias") or "norm" in key:
            sd[key] = sd[key] + 0.1 * torch.randn_like(sd[key])
    sd["cls_token"] = torch.randn_like(sd["cls_token"])
    return sd


def random_beit(embed_dim: int, heads: int, depth: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Official BEiT/SimMIM encoder names (shared relative bias with its stored index buffer)."""
    torch.manual_seed(seed)
    model = timm.create_model(
        "beit_base_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=IMG,
        patch_size=PATCH,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=heads,
        use_abs_pos_emb=False,
        use_rel_pos_bias=False,
        use_shared_rel_pos_bias=True,
        init_values=0.1,
        global_pool="token",
    )
    sd = {k: v.clone() + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()}  # zero-init tables too
    sd["rel_pos_bias.relative_position_index"] = official_rel_pos_index(IMG // PATCH)
    sd["mask_token"] = torch.randn(1, 1, embed_dim)
    return sd


def mlp_keys(prefix: str, layers: int, in_dim: int, hidden: int, out: int) -> dict[str, torch.Tensor]:
    """MoCo v3 _build_mlp: Linear(bias=False), BatchNorm1d, ReLU, ..., last BatchNorm1d(affine=False)."""
    sd, index, dim = {}, 0, in_dim
    for layer in range(layers):
        width = out if layer == layers - 1 else hidden
        sd[f"{prefix}{index}.weight"] = torch.randn(width, dim)
        bn = f"{prefix}{index + 1}."
        if layer < layers - 1:
            sd[bn + "weight"], sd[bn + "bias"] = torch.ones(width), torch.zeros(width)
        sd[bn + "running_mean"], sd[bn + "running_var"] = torch.zeros(width), torch.ones(width)
        sd[bn + "num_batches_tracked"] = torch.tensor(100)
        index, dim = index + 3, width
    return sd


def optimizer_state() -> dict:
    return {
        "state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(3)}},
        "param_groups": [{"lr": 1.5e-4, "weight_decay": 0.1, "params": [0]}],
    }


def scaler_state() -> dict:
    return {
        "scale": 65536.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 2000,
        "_growth_tracker": 7,
    }


# ----------------------------------------------------------------------------- MoCo v3
def moco_checkpoint(dim: int = 384, heads: int = 12) -> tuple[dict, dict]:
    base, momentum = random_vit(dim, heads, depth=1, seed=0), random_vit(dim, heads, depth=1, seed=1)
    base["pos_embed"] = momentum["pos_embed"] = sincos_pos_embed(IMG // PATCH, dim)
    state = {f"module.base_encoder.{k}": v for k, v in base.items()}
    state |= mlp_keys("module.base_encoder.head.", 3, dim, 64, 16)
    state |= {f"module.momentum_encoder.{k}": v for k, v in momentum.items()}
    state |= mlp_keys("module.momentum_encoder.head.", 3, dim, 64, 16)
    state |= mlp_keys("module.predictor.", 2, 16, 64, 16)
    checkpoint = {
        "epoch": 300,
        "arch": "vit_small",
        "state_dict": state,
        "optimizer": optimizer_state(),
        "scaler": scaler_state(),
    }
    return checkpoint, state


def test_moco_v3_vit_small_loads_with_12_heads(tmp_path: Path) -> None:
    checkpoint, state = moco_checkpoint()
    path = tmp_path / "vit-s-300ep.pth.tar"
    torch.save(checkpoint, path)
    model = load_model(f"moco-v3:{path}")
    assert_same_model(model, state, heads=12, prefix="module.base_encoder.")
    report = model.vitscope_load_report
    assert report.complete and report.missing == [] and report.unexpected == []
    assert "module.momentum_encoder.cls_token" in report.dropped
    assert "module.predictor.0.weight" in report.dropped
    assert "module.base_encoder.head.6.weight" in report.dropped  # the projector
    assert report.arch_kwargs["num_heads"] == 12 and report.arch_kwargs["embed_dim"] == 384
    assert report.arch_kwargs["depth"] == 1 and report.arch_kwargs["img_size"] == IMG
    assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)
    # the same weights split into timm's 6 heads give other attention: the head count matters
    six = timm.create_model(
        "vit_small_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=IMG,
        patch_size=PATCH,
        depth=1,
        global_pool="token",
    ).eval()
    six.load_state_dict(model.state_dict())
    images = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        assert not torch.allclose(six.forward_features(images), model.forward_features(images), atol=1e-3)


def test_moco_v3_momentum_encoder_on_request(tmp_path: Path) -> None:
    checkpoint, state = moco_checkpoint()
    torch.save(checkpoint, tmp_path / "m.pth.tar")
    model = load_model(f"moco-v3:{tmp_path / 'm.pth.tar'}", part="momentum")
    assert_same_model(model, state, heads=12, prefix="module.momentum_encoder.")
    assert "module.base_encoder.cls_token" in model.vitscope_load_report.dropped


# ----------------------------------------------------------------------------- MAE
def mae_decoder(dim: int, dec_dim: int = 32) -> dict[str, torch.Tensor]:
    tokens = (IMG // PATCH) ** 2 + 1
    sd = {
        "mask_token": torch.randn(1, 1, dec_dim),
        "decoder_embed.weight": torch.randn(dec_dim, dim),
        "decoder_embed.bias": torch.randn(dec_dim),
        "decoder_pos_embed": sincos_pos_embed(IMG // PATCH, dec_dim),
        "decoder_norm.weight": torch.ones(dec_dim),
        "decoder_norm.bias": torch.zeros(dec_dim),
        "decoder_pred.weight": torch.randn(PATCH * PATCH * 3, dec_dim),
        "decoder_pred.bias": torch.zeros(PATCH * PATCH * 3),
    }
    block = random_vit(dec_dim, 4, depth=1, seed=5)
    sd |= {f"decoder_{k}": v for k, v in block.items() if k.startswith("blocks.")}
    assert sd["decoder_pos_embed"].shape[1] == tokens
    return sd


@pytest.mark.parametrize("layout", ["pretrain", "full", "training"])
def test_mae_layouts(tmp_path: Path, layout: str) -> None:
    encoder = random_vit(64, 4)
    encoder["pos_embed"] = sincos_pos_embed(IMG // PATCH, 64)
    if layout == "pretrain":
        checkpoint = {"model": encoder}
    elif layout == "full":
        checkpoint = {"model": encoder | mae_decoder(64)}
    else:
        args = argparse.Namespace(
            model="mae_vit_small_custom",
            mask_ratio=0.75,
            norm_pix_loss=True,
            lr=None,
            input_size=IMG,
            output_dir="./out",
            device="cuda",
        )
        checkpoint = {
            "model": encoder | mae_decoder(64),
            "optimizer": optimizer_state(),
            "epoch": 799,
            "scaler": scaler_state(),
            "args": args,
        }
    path = tmp_path / f"mae_{layout}.pth"
    torch.save(checkpoint, path)
    model = load_model(f"mae:{path}", num_heads=4)  # 64 wide: no official MAE config, heads given
    assert_same_model(model, encoder, heads=4)
    report = model.vitscope_load_report
    if layout != "pretrain":
        assert {"mask_token", "decoder_pred.weight", "decoder_blocks.0.attn.qkv.weight"} <= set(report.dropped)
    if layout == "training":
        assert any("args" in note and "optimizer" in note for note in report.notes)


def test_mae_unknown_width_asks_for_num_heads(tmp_path: Path) -> None:
    torch.save({"model": random_vit(64, 4)}, tmp_path / "mae.pth")
    with pytest.raises(CheckpointError, match=r"embed dim 64.*num_heads="):
        load_model(f"mae:{tmp_path / 'mae.pth'}")


def test_mae_base_width_uses_official_12_heads(tmp_path: Path) -> None:
    encoder = random_vit(768, 12, depth=1)
    torch.save({"model": encoder | mae_decoder(768)}, tmp_path / "mae_visualize_vit_base.pth")
    model = load_model(f"mae:{tmp_path / 'mae_visualize_vit_base.pth'}")
    assert_same_model(model, encoder, heads=12)


# ----------------------------------------------------------------------------- DINO
def dino_head(prefix: str, dim: int) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}mlp.0.weight": torch.randn(32, dim),
        f"{prefix}mlp.0.bias": torch.zeros(32),
        f"{prefix}mlp.2.weight": torch.randn(32, 32),
        f"{prefix}mlp.2.bias": torch.zeros(32),
        f"{prefix}mlp.4.weight": torch.randn(16, 32),
        f"{prefix}mlp.4.bias": torch.zeros(16),
        f"{prefix}last_layer.weight_g": torch.ones(64, 1),
        f"{prefix}last_layer.weight_v": torch.randn(64, 16),
    }


def test_dino_pretrain_bare_dict_vit_small_has_6_heads(tmp_path: Path) -> None:
    backbone = random_vit(384, 6, depth=1)
    torch.save(backbone, tmp_path / "dino_deitsmall8_pretrain.pth")
    model = load_model(f"dino:{tmp_path / 'dino_deitsmall8_pretrain.pth'}")
    assert_same_model(model, backbone, heads=6)
    assert model.vitscope_load_report.dropped == []


@pytest.mark.parametrize("part", ["teacher", "student"])
def test_dino_full_checkpoint(tmp_path: Path, part: str) -> None:
    teacher, student = random_vit(384, 6, depth=1, seed=0), random_vit(384, 6, depth=1, seed=1)
    checkpoint = {
        "student": {f"module.backbone.{k}": v for k, v in student.items()} | dino_head("module.head.", 384),
        "teacher": {f"backbone.{k}": v for k, v in teacher.items()} | dino_head("head.", 384),
        "optimizer": optimizer_state(),
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", patch_size=PATCH, out_dim=65536, local_crops_number=10),
        "dino_loss": {"center": torch.randn(1, 64)},
        "fp16_scaler": scaler_state(),
    }
    path = tmp_path / "dino_deitsmall16_pretrain_full_checkpoint.pth"
    torch.save(checkpoint, path)
    model = load_model(f"dino:{path}", part=part) if part == "student" else load_model(f"dino:{path}")
    expected = teacher if part == "teacher" else student
    assert_same_model(model, expected, heads=6)
    dropped = model.vitscope_load_report.dropped
    if part == "teacher":
        assert "teacher/head.mlp.0.weight" in dropped and "student/module.backbone.cls_token" in dropped
    else:
        assert "student/module.head.last_layer.weight_v" in dropped and "teacher/backbone.cls_token" in dropped


# ----------------------------------------------------------------------------- SimMIM
class _FakeCfgNode(dict):
    """Pickles like yacs.config.CfgNode: a dict subclass whose __dict__ holds yacs' bookkeeping."""

    def __init__(self, init: dict | None = None) -> None:
        super().__init__({k: _FakeCfgNode(v) if isinstance(v, dict) else v for k, v in (init or {}).items()})
        self.__dict__["__immutable__"] = True
        self.__dict__["__deprecated_keys__"] = set()
        self.__dict__["__renamed_keys__"] = {}
        self.__dict__["__new_allowed__"] = False


def save_with_fake_yacs(obj: dict, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save with the config pickled as ``yacs.config.CfgNode``; yacs is gone again before loading."""
    package, module = types.ModuleType("yacs"), types.ModuleType("yacs.config")
    _FakeCfgNode.__module__, _FakeCfgNode.__qualname__, _FakeCfgNode.__name__ = "yacs.config", "CfgNode", "CfgNode"
    module.CfgNode = _FakeCfgNode
    package.config = module
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "yacs", package)
        patch.setitem(sys.modules, "yacs.config", module)
        torch.save(obj, path)
    # from here on any attempt to import yacs raises ImportError: loading must not need it
    monkeypatch.setitem(sys.modules, "yacs", None)
    monkeypatch.setitem(sys.modules, "yacs.config", None)


def simmim_checkpoint(encoder: dict[str, torch.Tensor], heads: int) -> dict:
    dim = encoder["cls_token"].shape[-1]
    model = {f"encoder.{k}": v for k, v in encoder.items()}
    model["decoder.0.weight"] = torch.randn(PATCH * PATCH * 3, dim, 1, 1)
    model["decoder.0.bias"] = torch.zeros(PATCH * PATCH * 3)
    config = _FakeCfgNode(
        {
            "MODEL": {
                "TYPE": "vit",
                "NAME": "simmim_pretrain",
                "VIT": {
                    "PATCH_SIZE": PATCH,
                    "EMBED_DIM": dim,
                    "DEPTH": 2,
                    "NUM_HEADS": heads,
                    "USE_APE": False,
                    "USE_RPB": False,
                    "USE_SHARED_RPB": True,
                    "USE_MEAN_POOLING": False,
                    "INIT_VALUES": 0.1,
                    "QKV_BIAS": True,
                },
            },
            "DATA": {"IMG_SIZE": IMG, "MASK_RATIO": 0.6},
            "AMP_OPT_LEVEL": "O1",
        }
    )
    return {
        "model": model,
        "optimizer": optimizer_state(),
        "lr_scheduler": {"t_initial": 100, "base_values": [8e-4], "warmup_t": 10, "noise_range_t": None},
        "max_accuracy": 0.0,
        "epoch": 99,
        "config": config,
        "amp": {"loss_scaler0": {"loss_scale": 1024.0, "unskipped": 17}},
    }


def test_simmim_vit_maps_onto_timm_beit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = random_beit(64, 4)
    path = tmp_path / "simmim_pretrain__vit_base__img224__800ep.pth"
    save_with_fake_yacs(simmim_checkpoint(encoder, heads=4), path, monkeypatch)
    model = load_model(f"simmim:{path}")  # heads read off the relative position bias table
    assert type(model).__name__ == "Beit"
    assert_same_model(model, encoder, heads=4)
    report = model.vitscope_load_report
    assert {"decoder.0.weight", "encoder.mask_token", "encoder.rel_pos_bias.relative_position_index"} <= set(
        report.dropped
    )
    assert report.arch_kwargs["use_shared_rel_pos_bias"] and not report.arch_kwargs["use_abs_pos_emb"]
    assert any("NUM_HEADS = 4" in note for note in report.notes)


def test_simmim_config_is_read_as_plain_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt_epoch_99.pth"
    save_with_fake_yacs(simmim_checkpoint(random_beit(64, 4, depth=1), heads=4), path, monkeypatch)
    config = read_checkpoint(path)["config"]
    assert type(config) is OrderedDict and type(config["MODEL"]["VIT"]) is OrderedDict
    assert config["MODEL"]["VIT"]["NUM_HEADS"] == 4 and config["DATA"]["IMG_SIZE"] == IMG


def test_simmim_shared_bias_spread_to_per_block_arch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """arch= a Beit with per-block tables (SimMIM's own fine-tuning layout): the shared table is copied."""
    encoder = random_beit(64, 4)
    path = tmp_path / "simmim.pth"
    save_with_fake_yacs(simmim_checkpoint(encoder, heads=4), path, monkeypatch)
    model = load_model(
        f"simmim:{path}",
        arch="beit_base_patch16_224",
        img_size=IMG,
        patch_size=PATCH,
        embed_dim=64,
        depth=2,
        use_shared_rel_pos_bias=False,
        use_rel_pos_bias=True,
    )
    assert model.blocks[0].attn.num_heads == 4
    for block in model.blocks:
        assert torch.equal(
            block.attn.relative_position_bias_table, encoder["rel_pos_bias.relative_position_bias_table"]
        )
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        got = model.forward_features(images).double()
    assert torch.allclose(got, reference_tokens(encoder, images, heads=4), atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- BEiT
@pytest.mark.parametrize("wrapper", ["model", "module", "training"])
def test_beit_layouts(tmp_path: Path, wrapper: str) -> None:
    encoder = random_beit(64, 4)
    state = encoder | {"lm_head.weight": torch.randn(8192, 64), "lm_head.bias": torch.zeros(8192)}
    if wrapper == "training":
        checkpoint = {
            "model": state,
            "optimizer": optimizer_state(),
            "epoch": 799,
            "scaler": scaler_state(),
            "args": argparse.Namespace(model="beit_base_patch16_224_8k_vocab", layer_scale_init_value=0.1),
        }
    else:
        checkpoint = {wrapper: state}
    path = tmp_path / "beit_base_patch16_224_pt22k.pth"
    torch.save(checkpoint, path)
    model = load_model(f"beit:{path}")
    assert_same_model(model, encoder, heads=4)
    assert {"lm_head.weight", "mask_token", "rel_pos_bias.relative_position_index"} <= set(
        model.vitscope_load_report.dropped
    )
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)


def test_beit_resized_grid_interpolates_bias_table(tmp_path: Path) -> None:
    encoder = random_beit(64, 4)
    torch.save({"model": encoder}, tmp_path / "beit.pth")
    model = load_model(f"beit:{tmp_path / 'beit.pth'}", img_size=48)  # 4x4 -> 6x6 grid
    table = model.rel_pos_bias.relative_position_bias_table
    assert table.shape == ((2 * 6 - 1) ** 2 + 3, 4)
    # the three CLS entries are carried over unchanged; the spatial part is resampled
    assert torch.equal(table[-3:], encoder["rel_pos_bias.relative_position_bias_table"][-3:])
    assert any("relative_position_bias_table" in item for item in model.vitscope_load_report.resized)
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 48, 48)).shape == (1, 37, 64)


def test_position_embedding_resampled_to_new_grid(tmp_path: Path) -> None:
    encoder = random_vit(384, 6, depth=1)
    torch.save(encoder, tmp_path / "dino_pretrain.pth")
    model = load_model(f"dino:{tmp_path / 'dino_pretrain.pth'}", img_size=48)  # 4x4 -> 6x6
    pos = model.pos_embed.detach()
    assert pos.shape == (1, 37, 384)
    assert torch.equal(pos[:, :1], encoder["pos_embed"][:, :1])
    grid = encoder["pos_embed"][:, 1:].reshape(1, 4, 4, 384).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False, antialias=True)
    assert torch.allclose(pos[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 36, 384), atol=1e-6)
    assert model.vitscope_load_report.resized


def test_sincos_reference_matches_known_values() -> None:
    """The test's own sin-cos builder: the CLS row is zero, row 1 is cell (0, 0) -> sin 0 = 0, cos 0 = 1."""
    pe = sincos_pos_embed(4, 8)
    assert pe.shape == (1, 17, 8)
    assert torch.equal(pe[0, 0], torch.zeros(8))
    assert torch.allclose(pe[0, 1], torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]))
    # cell index 1 = (w=0, h=1) in MoCo's meshgrid(w, h) order: out_h = 1 * omega
    assert math.isclose(float(pe[0, 2, 4]), math.sin(1.0), rel_tol=1e-6)
