"""Objectives, losses, augmentations and the data plan of vitscope.pretrain, on tiny ViTs (CPU)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import Block

from vitscope.pretrain import TrainConfig, TrainingDiverged, augment, pretrain
from vitscope.pretrain.batches import BatchPlan
from vitscope.pretrain.objectives import (
    MAE,
    MoCoV3,
    ObjectiveConfig,
    SimMIM,
    build_objective,
    mae_loss,
    mae_pixel_targets,
    moco_contrastive_loss,
    moco_momentum,
    patchify,
    random_masking,
    simmim_loss,
    simmim_mask,
    sincos_pos_embed_2d,
    unpatchify,
)
from vitscope.pretrain.optim import warmup_cosine_lr

TINY = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
HEADS = dict(moco_dim=32, moco_mlp_dim=64, decoder_dim=32, decoder_depth=1, decoder_heads=2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread, above all on a busy shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(n: int = 8, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, size=(n, 16, 16), dtype=np.uint8))


def _objective(method: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_objective("vit_tiny_patch16_224", TINY, ObjectiveConfig(method=method, **HEADS, **kw))


# ---------------------------------------------------------------------------------------- losses
def _np_infonce(q: np.ndarray, k: np.ndarray, tau: float, rank: int) -> float:
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    logits = q @ k.T / tau
    labels = np.arange(len(q)) + len(q) * rank
    m = logits.max(axis=1, keepdims=True)
    log_z = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
    return float(np.mean(log_z - logits[np.arange(len(q)), labels]) * 2 * tau)


@pytest.mark.parametrize("rank", [0, 1])
def test_moco_loss_equals_numpy_hand_computation(rank: int) -> None:
    rng = np.random.default_rng(3)
    q, k = rng.normal(size=(4, 6)), rng.normal(size=(8, 6))  # 4 local queries, 8 global keys
    loss, logits = moco_contrastive_loss(torch.tensor(q), torch.tensor(k), tau=0.2, rank=rank)
    assert logits.shape == (4, 8)
    assert loss.item() == pytest.approx(_np_infonce(q, k, 0.2, rank), rel=1e-5)


def _np_masked_losses(pred, target, mask):
    l1 = (np.abs(pred - target).mean(-1) * mask).sum() / mask.sum()
    t = target
    norm = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, ddof=1, keepdims=True) + 1e-6)
    l2 = (((pred - norm) ** 2).mean(-1) * mask).sum() / mask.sum()
    return l1, l2


def test_mim_losses_match_numpy_and_touch_only_masked_patches() -> None:
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(2, 9, 12))
    target = rng.normal(size=(2, 9, 12))
    mask = (rng.random((2, 9)) < 0.5).astype(np.float64)
    mask[:, 0], mask[:, 1] = 1, 0
    want_l1, want_mse = _np_masked_losses(pred, target, mask)

    for loss_fn, want, norm_pix in ((simmim_loss, want_l1, False), (mae_loss, want_mse, True)):
        p = torch.tensor(pred, requires_grad=True)
        t = mae_pixel_targets(torch.tensor(target), norm_pix)
        loss = loss_fn(p, t, torch.tensor(mask))
        assert loss.item() == pytest.approx(want, rel=1e-6)
        loss.backward()
        grad = p.grad.abs().sum(-1).numpy()
        assert (grad[mask == 0] == 0).all() and (grad[mask == 1] > 0).all()
        changed = target.copy()
        changed[mask == 0] += rng.normal(size=changed[mask == 0].shape) * 5  # alter unmasked targets only
        again = loss_fn(torch.tensor(pred), mae_pixel_targets(torch.tensor(changed), norm_pix), torch.tensor(mask))
        assert again.item() == loss.item()


def test_mae_objective_loss_ignores_predictions_of_visible_patches() -> None:
    mae = _objective("mae")
    inputs = mae.prepare(_images(), torch.Generator().manual_seed(1))
    latent, mask, ids_restore = mae.encode_visible(inputs["mim_view"], inputs["noise"])
    pred = mae.decode(latent, ids_restore).detach().requires_grad_(True)
    target = mae_pixel_targets(patchify(inputs["mim_view"], 4))
    mae_loss(pred, target, mask).backward()
    assert int(mask.sum(1)[0]) == 12  # 16 patches, ratio 0.75
    assert (pred.grad.abs().sum(-1)[mask == 0] == 0).all()
    assert (pred.grad.abs().sum(-1)[mask == 1] > 0).all()


def test_random_masking_keeps_lowest_noise_tokens() -> None:
    x = torch.arange(2 * 8, dtype=torch.float32).view(2, 8, 1)
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.8, 0.2, 0.7, 0.4], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]])
    kept, mask, restore = random_masking(x, noise, 0.75)
    assert kept[0, :, 0].tolist() == [1.0, 5.0]  # the two lowest-noise tokens, in noise order
    assert kept[1, :, 0].tolist() == [8.0, 9.0]
    assert mask[0].tolist() == [1, 0, 1, 1, 1, 0, 1, 1]
    assert torch.equal(noise.argsort(1).gather(1, restore), torch.arange(8).expand(2, 8))


def test_simmim_mask_count_and_coarse_cells() -> None:
    mask = simmim_mask(5, (4, 4), 0.6, 2, torch.Generator().manual_seed(0))
    assert mask.shape == (5, 16)
    assert (mask.sum(1) == 4 * math.ceil(4 * 0.6)).all()  # 3 of 4 cells of 2×2 patches
    grid = mask.view(5, 2, 2, 2, 2)  # cells are constant over their 2×2 patches
    assert (grid.amin(dim=(2, 4)) == grid.amax(dim=(2, 4))).all()


def test_patchify_roundtrip_and_order() -> None:
    images = torch.randn(2, 3, 8, 12)
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 48)
    assert torch.equal(patches[1, 4].view(4, 4, 3), images[1, :, 4:8, 4:8].permute(1, 2, 0))
    assert torch.equal(unpatchify(patches, 4, (2, 3)), images)


# ------------------------------------------------------------------------------------- objectives
@pytest.mark.parametrize(
    ("method", "options"),
    [("moco", {}), ("simmim", {}), ("simmim", {"simmim_head_depth": 2}), ("mae", {}), ("hybrid", {})],
    ids=["moco", "simmim", "simmim-block-head", "mae", "hybrid"],
)
def test_loss_decreases_on_a_fixed_batch(method: str, options: dict) -> None:
    objective = _objective(method, **options)
    inputs = objective.prepare(_images(16), torch.Generator().manual_seed(0), momentum=0.99)
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(12):
        loss = objective(inputs)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.8 * losses[0], losses


def test_simmim_linear_head_predicts_each_patch_from_its_own_token_and_a_block_head_mixes_them() -> None:
    """The official head (depth 0) is one linear layer under the key names old runs saved; a head
    of blocks (SimMIM's head ablation) lets one token's output change another patch's prediction."""
    linear = _objective("simmim")
    assert isinstance(linear.pixel_head, torch.nn.Linear)
    assert [k for k in linear.state_dict() if k.startswith("pixel_head")] == ["pixel_head.weight", "pixel_head.bias"]
    blocks = _objective("simmim", simmim_head_depth=2)
    assert sum(isinstance(m, Block) for m in blocks.pixel_head.modules()) == 2
    tokens = torch.randn(1, 16, TINY["embed_dim"])
    moved = tokens.clone()
    moved[0, 5] += 1.0
    for objective, mixes in ((linear, False), (blocks, True)):
        with torch.no_grad():
            before, after = objective.pixel_head(tokens), objective.pixel_head(moved)
        others = torch.arange(16) != 5
        assert not torch.equal(before[0, 5], after[0, 5])
        assert torch.equal(before[0, others], after[0, others]) is not mixes
    with pytest.raises(ValueError, match="simmim_head_depth"):
        ObjectiveConfig(method="simmim", simmim_head_depth=-1)


@pytest.mark.parametrize("mim", ["simmim", "mae"])
def test_hybrid_extremes_equal_pure_losses(mim: str) -> None:
    for lam in (0.0, 1.0):
        hybrid = _objective("hybrid", mim=mim, cl_weight=lam)
        cfg = hybrid.cfg
        alone_mim = (SimMIM if mim == "simmim" else MAE)(copy.deepcopy(hybrid.encoder), cfg)
        alone_mim.load_state_dict(hybrid.mim.state_dict())
        alone_cl = MoCoV3(copy.deepcopy(hybrid.encoder), cfg)
        alone_cl.load_state_dict(hybrid.cl.state_dict())
        inputs = hybrid.prepare(_images(), torch.Generator().manual_seed(2), momentum=0.99)
        got = hybrid(inputs)
        want_mim = alone_mim(inputs)["loss"]
        want_cl = alone_cl(inputs)["loss"]
        assert torch.equal(got["loss"], want_mim if lam == 0.0 else want_cl)
        assert torch.equal(got["loss_mim"], want_mim.detach()) and torch.equal(got["loss_cl"], want_cl.detach())
        assert want_mim.item() != want_cl.item()


def test_moco_encoder_has_fixed_sincos_positions_and_optional_frozen_patch_projection() -> None:
    moco = _objective("moco", freeze_patch_embed=True)
    enc = moco.encoder
    assert not enc.pos_embed.requires_grad and not enc.patch_embed.proj.weight.requires_grad
    # token 1 + r·4 + c holds [sin(c ω), cos(c ω), sin(r ω), cos(r ω)], ω_k = 10000^(−k/8)
    r, c = 2, 3
    omega = 1.0 / 10000 ** (np.arange(8) / 8)
    want = np.concatenate([np.sin(c * omega), np.cos(c * omega), np.sin(r * omega), np.cos(r * omega)])
    np.testing.assert_allclose(enc.pos_embed[0, 1 + r * 4 + c].numpy(), want, rtol=1e-6, atol=1e-7)
    assert torch.equal(enc.pos_embed[0, 0], torch.zeros(32))
    inputs = moco.prepare(_images(), torch.Generator().manual_seed(0), momentum=0.99)
    moco(inputs)["loss"].backward()
    assert enc.patch_embed.proj.weight.grad is None and enc.blocks[0].attn.qkv.weight.grad is not None
    assert sincos_pos_embed_2d((4, 4), 32).shape == (1, 17, 32)
    assert all(block.attn.fused_attn for block in enc.blocks)  # training uses fused attention


def test_momentum_update_is_ema() -> None:
    moco = _objective("moco")
    online = moco.encoder.blocks[0].mlp.fc1.weight
    with torch.no_grad():
        online.add_(1.0)
    before = moco.momentum_encoder.blocks[0].mlp.fc1.weight.clone()
    moco.update_momentum(0.9)
    torch.testing.assert_close(moco.momentum_encoder.blocks[0].mlp.fc1.weight, 0.9 * before + 0.1 * online.detach())


def test_schedules() -> None:
    assert moco_momentum(0.0) == pytest.approx(0.99)
    assert moco_momentum(0.5) == pytest.approx(0.995)
    assert moco_momentum(1.0) == pytest.approx(1.0)
    assert warmup_cosine_lr(0, 100, 10, 1.0) == 0.0
    assert warmup_cosine_lr(5, 100, 10, 1.0) == pytest.approx(0.5)
    assert warmup_cosine_lr(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert warmup_cosine_lr(55, 100, 10, 1.0, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)


# ---------------------------------------------------------------------------------- augmentation
def test_identity_crop_reproduces_the_image_and_views_are_seeded() -> None:
    x = augment.to_float_rgb(_images(4))
    identity = augment.CropSpec(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)
    out = augment.random_resized_crop(x, 16, identity, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)
    flipped = augment.random_resized_crop(x, 16, augment.CropSpec((1.0, 1.0), (1.0, 1.0), 1.0), torch.Generator())
    torch.testing.assert_close(flipped, x.flip(-1), atol=1e-5, rtol=0)
    spec = augment.moco_view_specs(16)[1]
    a = augment.make_view(x, 16, spec, torch.Generator().manual_seed(5), (0.5,) * 3, (0.5,) * 3)
    b = augment.make_view(x, 16, spec, torch.Generator().manual_seed(5), (0.5,) * 3, (0.5,) * 3)
    c = augment.make_view(x, 16, spec, torch.Generator().manual_seed(6), (0.5,) * 3, (0.5,) * 3)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (4, 3, 16, 16) and a.min() >= -1 - 1e-6 and a.max() <= 1 + 1e-6


def test_solarize_and_blur() -> None:
    x = torch.linspace(0, 1, 16).view(1, 1, 4, 4).expand(2, 3, 4, 4).contiguous()
    out = augment.solarize(x, 1.0, torch.Generator())
    torch.testing.assert_close(out, torch.where(x >= 0.5, 1 - x, x))
    flat = torch.full((2, 3, 8, 8), 0.3)
    torch.testing.assert_close(augment.gaussian_blur(flat, 1.0, (0.5, 1.0), torch.Generator()), flat)


def test_batch_plan_shards_are_disjoint_and_cover_each_global_batch() -> None:
    plan = BatchPlan(num_images=50, batch_size=4, world=3, seed=7)
    assert plan.steps_per_epoch == 4
    seen = []
    for step in range(8):
        shards = [set(plan.indices(step, r).tolist()) for r in range(3)]
        assert all(len(s) == 4 for s in shards) and len(set.union(*shards)) == 12
        seen.append(set.union(*shards))
    assert len(set.union(*seen[:4])) == 48  # one epoch: no image twice
    again = BatchPlan(num_images=50, batch_size=4, world=3, seed=7)
    assert np.array_equal(again.indices(6, 2), plan.indices(6, 2))


# ------------------------------------------------------------------------------------ the trainer
def _config(tmp_path, method: str = "simmim", **kw) -> TrainConfig:
    base = dict(
        arch="vit_tiny_patch16_224",
        model_kwargs=TINY,
        data="fashion-mnist-subset",
        num_images=64,
        steps=4,
        batch_size=8,
        lr=1e-3,
        save_every=2,
        out=str(tmp_path / "run"),
        progress=False,
        objective=ObjectiveConfig(method=method, **HEADS),
    )
    base.update(kw)
    return TrainConfig(**base)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch) -> None:
    import vitscope.pretrain.objectives as objectives

    calls = {"n": 0}
    real = objectives.simmim_loss

    def flaky(pred, target, mask):
        calls["n"] += 1
        loss = real(pred, target, mask)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(objectives, "simmim_loss", flaky)
    with pytest.raises(TrainingDiverged, match="step 3.*step 2"):
        pretrain(_config(tmp_path, steps=6))
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    assert state["step"] == 2


def test_resume_refuses_other_settings_and_out_dir_reuse(tmp_path) -> None:
    pretrain(_config(tmp_path, steps=2))
    with pytest.raises(ValueError, match="already holds a run"):
        pretrain(_config(tmp_path, steps=2))
    with pytest.raises(ValueError, match="batch_size"):
        pretrain(_config(tmp_path, steps=2, batch_size=4, resume=True))
    other_head = ObjectiveConfig(method="simmim", **HEADS, simmim_head_depth=1)
    with pytest.raises(ValueError, match=r"objective\.simmim_head_depth: 0 → 1"):
        pretrain(_config(tmp_path, steps=2, objective=other_head, resume=True))


def test_a_setting_the_train_state_predates_resumes_at_its_default_only(tmp_path) -> None:
    """A train state written before an objective field existed resumes when the field holds its
    default (what the code did then), and is refused when it is set to anything else."""
    pretrain(_config(tmp_path, steps=2))
    path = tmp_path / "run" / "train_state.pt"
    state = torch.load(path, weights_only=True)
    del state["config"]["objective"]["simmim_head_depth"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"objective\.simmim_head_depth: None → 2"):
        block_head = ObjectiveConfig(method="simmim", **HEADS, simmim_head_depth=2)
        pretrain(_config(tmp_path, steps=3, objective=block_head, resume=True))
    assert pretrain(_config(tmp_path, steps=3, resume=True)).step == 3
