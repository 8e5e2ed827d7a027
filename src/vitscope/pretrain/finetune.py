"""End-to-end fine-tuning of a pretrained encoder for classification (MAE's recipe, scaled down).

Recipe: random resized crop + flip, label smoothing, AdamW with layer-wise learning-rate decay
(MAE's ``param_groups_lrd``: scale = decay^(L + 1 − layer), patch/position embedding = layer 0,
block i = layer i + 1, head and final norms = layer L + 1), linear warm-up then cosine, gradient
clipping; top-1 on the test split after every epoch. Mixup/CutMix/RandAugment of the full MAE recipe
are not applied (they matter at ImageNet scale, not for 28 px images).

Same determinism, checkpoint, resume and DDP rules as :mod:`vitscope.pretrain.trainer`; files under
``--out``: ``model.safetensors`` + ``model.json`` (classifier with head), ``train_state.pt``,
``log.jsonl`` (step lines and ``{"epoch", "top1"}`` lines), ``metrics.json`` (top-1 per epoch).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from vitscope.io import atomic_path, write_json_atomic
from vitscope.pretrain import augment
from vitscope.pretrain.trainer import (
    ENCODER_JSON, LOG_FILE, STATE_FILE, BatchPlan, DistEnv, TrainingDiverged, _autocast_dtype,
    _backward_and_step, _progress, _truncate_log, _warn_threads, capture_rng_state, init_distributed, load_images,
    check_run_dir, read_encoder_json, restore_rng_state, step_seed, warmup_cosine_lr,
)

__all__ = ["FinetuneConfig", "FinetuneResult", "load_encoder", "layer_decay_groups", "finetune", "evaluate_top1"]

RESUMABLE_CHANGES = {"resume", "progress", "save_every", "out", "device"}


@dataclass
class FinetuneConfig:
    model: str = "file:runs/moco/encoder.safetensors"
    model_kwargs: dict = field(default_factory=dict)
    data: str = "fashion-mnist"
    test_data: str | None = None       # None: the test split of ``data``
    num_images: int | None = None
    num_test_images: int | None = None
    epochs: int = 10
    batch_size: int = 64
    lr: float | None = None            # None: blr × global batch / 256
    blr: float = 1e-3
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    warmup_epochs: float = 1.0
    min_lr: float = 1e-6
    clip_grad: float | None = 3.0
    drop_path: float = 0.1
    crop_min_scale: float = 0.35
    seed: int = 0
    precision: str = "auto"
    device: str = "auto"
    out: str = "runs/finetune"
    save_every: int = 500
    resume: bool = False
    progress: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class FinetuneResult:
    model: nn.Module
    top1: list[float]
    step: int
    out: Path
    plan: BatchPlan
    env: DistEnv


# --------------------------------------------------------------------------------------------- model
def load_encoder(spec: str, **options) -> tuple[nn.Module, dict]:
    """A pretrained encoder and its description {arch, arch_kwargs, ...}.

    ``file:PATH`` where PATH is a vitscope ``encoder.safetensors`` (or its run directory) is read
    here through the ``encoder.json`` beside it (timm model rebuilt, weights loaded strictly); any
    other spec goes to :func:`vitscope.models.load_model` with ``options``.
    """
    kind, _, target = spec.partition(":")
    path = Path(target) if kind == "file" else None
    if path is not None and path.is_dir():
        path = path / "encoder.safetensors"
    if path is not None and (path.with_name(ENCODER_JSON)).exists():
        import timm
        from safetensors.torch import load_file

        meta = read_encoder_json(path)
        kwargs = {**meta["arch_kwargs"], **options}
        model = timm.create_model(meta["arch"], pretrained=False, **kwargs)
        missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
        missing = [k for k in missing if not k.startswith("head.")]
        if missing or unexpected:
            raise KeyError(f"{path}: weights do not fit {meta['arch']} {kwargs}: missing {missing}, unexpected {unexpected}")
        return model, {**meta, "arch_kwargs": kwargs}
    from vitscope.models import load_model

    model = load_model(spec, **options)
    report = getattr(model, "vitscope_load_report", None)
    arch = getattr(report, "arch", None) or getattr(model, "default_cfg", {}).get("architecture", "unknown")
    return model, {"arch": arch, "arch_kwargs": dict(getattr(report, "arch_kwargs", {}) or {})}


def _layer_id(name: str, num_layers: int) -> int:
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "reg_token", "dist_token", "mask_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups with MAE's layer-wise lr scale decay^(L − layer_id); no decay on vectors and tokens."""
    num_layers = len(model.blocks) + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim == 1 or name.endswith(("pos_embed", "cls_token", "reg_token", "dist_token"))
        layer = _layer_id(name, num_layers)
        group = groups.setdefault((layer, no_decay), {
            "params": [], "weight_decay": 0.0 if no_decay else weight_decay,
            "lr_scale": layer_decay ** (num_layers - layer), "layer": layer,
        })
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


# ----------------------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate_top1(model: nn.Module, images: Tensor, labels: Tensor, size: int, mean: tuple, std: tuple,
                  batch_size: int, env: DistEnv, amp_dtype: torch.dtype | None) -> float:
    """Top-1 accuracy over (images, labels), each rank scoring its strided share, summed across ranks."""
    was_training = model.training
    model.eval()
    correct = torch.zeros(2, dtype=torch.float64, device=env.device)
    share = torch.arange(env.rank, len(images), env.world)
    for start in range(0, len(share), batch_size):
        index = share[start : start + batch_size].to(images.device)
        x = augment.to_float_rgb(images[index])
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        with torch.autocast(env.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(augment.normalize(x, mean, std))
        correct[0] += (logits.argmax(-1) == labels[index]).sum()
        correct[1] += len(index)
    if env.world > 1:
        dist.all_reduce(correct)
    model.train(was_training)
    return float(correct[0] / correct[1].clamp_min(1))


# ------------------------------------------------------------------------------------------- loop
def _save(out: Path, model: nn.Module, meta: dict, optimizer, scaler, step: int, plan: BatchPlan,
          top1: list[float], cfg: FinetuneConfig) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json_atomic(out / "model.json", {**meta, "step": step, "top1": top1, "finetuned_from": cfg.model})
    epoch, within = plan.position(step)
    state = {
        "format": "vitscope-finetune-state-v1", "step": step, "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": capture_rng_state(), "top1": top1,
        "data_position": {"epoch": epoch, "batch_in_epoch": within, "steps_per_epoch": plan.steps_per_epoch},
        "config": cfg.to_dict(), "num_threads": torch.get_num_threads(),
    }
    with atomic_path(out / STATE_FILE) as tmp:
        torch.save(state, tmp)


def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Fine-tune ``cfg.model`` on ``cfg.data`` (train split), reporting test top-1 after each epoch."""
    env = init_distributed(cfg.device)
    out, state_path = check_run_dir(cfg.out, cfg.resume)

    torch.manual_seed(cfg.seed)
    model, meta = load_encoder(cfg.model, **cfg.model_kwargs)
    size = int(model.patch_embed.img_size[0])
    train_x, train_y = load_images(cfg.data, "train", cfg.num_images, cfg.seed, size)
    test_x, test_y = load_images(cfg.test_data or cfg.data, "test", cfg.num_test_images, cfg.seed, size)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    if int(train_y.min()) < 0:
        raise ValueError(f"--data {cfg.data!r}: fine-tuning needs labelled images (class folders)")
    model.reset_classifier(num_classes)
    nn.init.trunc_normal_(model.head.weight, std=2e-5)
    nn.init.zeros_(model.head.bias)
    _set_drop_path(model, cfg.drop_path)
    meta = {**meta, "arch_kwargs": {**meta["arch_kwargs"], "num_classes": num_classes}, "method": "finetune"}
    mean, std = _norm_stats(model, meta)

    plan = BatchPlan(len(train_x), cfg.batch_size, env.world, cfg.seed)
    if plan.steps_per_epoch == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} × {env.world} exceeds the {len(train_x)} training images")
    total = cfg.epochs * plan.steps_per_epoch
    lr = cfg.lr if cfg.lr is not None else cfg.blr * plan.global_batch / 256
    warmup = int(round(cfg.warmup_epochs * plan.steps_per_epoch))
    model.to(env.device)
    groups = layer_decay_groups(model, cfg.weight_decay, cfg.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    amp_dtype = _autocast_dtype(cfg.precision, env.device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    torch.manual_seed(step_seed(cfg.seed, 0, env.rank, stream=1))

    start, top1 = 0, []
    if cfg.resume:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        changed = sorted(k for k, v in cfg.to_dict().items()
                         if k not in RESUMABLE_CHANGES and state["config"].get(k) != v)
        if changed:
            raise ValueError(f"{state_path}: cannot resume with different settings ({', '.join(changed)})")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        start, top1 = int(state["step"]), list(state["top1"])
        _warn_threads(state.get("num_threads"), state_path)
        if env.is_main:
            _truncate_log(out / LOG_FILE, start)

    net: nn.Module = model
    if env.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    train_x, train_y = train_x.to(env.device), train_y.to(env.device)
    test_x, test_y = test_x.to(env.device), test_y.to(env.device)
    view = augment.ViewSpec(crop=augment.CropSpec(scale=(cfg.crop_min_scale, 1.0)))
    log = None
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        log = open(out / LOG_FILE, "a")
    bar = _progress(start, total, env.is_main and cfg.progress)
    model.train()
    try:
        for step in range(start, total):
            tick = time.perf_counter()
            step_lr = warmup_cosine_lr(step, total, warmup, lr, cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = step_lr * group["lr_scale"]
            generator = torch.Generator().manual_seed(step_seed(cfg.seed, step, env.rank))
            index = torch.from_numpy(plan.indices(step, env.rank)).to(env.device)
            x = augment.make_view(augment.to_float_rgb(train_x[index]), size, view, generator, mean, std)
            with torch.autocast(env.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = F.cross_entropy(net(x).float(), train_y[index], label_smoothing=cfg.label_smoothing)
            reported = loss.detach().clone()
            if env.world > 1:
                dist.all_reduce(reported)
                reported /= env.world
            if not math.isfinite(float(reported)):
                raise TrainingDiverged(f"loss is {float(reported)} at step {step}; stopped, last good checkpoint kept in {out}")
            optimizer.zero_grad(set_to_none=True)
            _backward_and_step(loss, model, optimizer, scaler, cfg.clip_grad)
            done = step + 1
            rate = plan.global_batch / max(time.perf_counter() - tick, 1e-9)
            if log is not None:
                log.write(json.dumps({"step": step, "lr": step_lr, "loss": float(reported), "images_per_s": rate}) + "\n")
            if bar is not None:
                bar.set_postfix(loss=f"{float(reported):.4f}", lr=f"{step_lr:.2e}", img_s=f"{rate:.0f}", refresh=False)
                bar.update(1)
            if done % plan.steps_per_epoch == 0:
                acc = evaluate_top1(model, test_x, test_y, size, mean, std, 256, env, amp_dtype)
                top1.append(acc)
                if log is not None:
                    log.write(json.dumps({"step": step, "epoch": done // plan.steps_per_epoch, "top1": acc}) + "\n")
                if env.is_main:
                    message = f"epoch {done // plan.steps_per_epoch}/{cfg.epochs}: test top-1 {acc:.4f}"
                    (bar.write if bar is not None else print)(message)
            if log is not None:
                log.flush()
            if done % cfg.save_every == 0 or done == total:
                if env.is_main:
                    _save(out, model, meta, optimizer, scaler, done, plan, top1, cfg)
                    if done == total:
                        write_json_atomic(out / "metrics.json", {"top1_per_epoch": top1, "model": cfg.model, "data": cfg.data})
                if env.world > 1:
                    dist.barrier()
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    return FinetuneResult(model, top1, total, out, plan, env)


def _set_drop_path(model: nn.Module, rate: float) -> None:
    """Stochastic depth rising linearly over the blocks to ``rate`` (timm's rule), set after loading."""
    from timm.layers import DropPath

    blocks = list(getattr(model, "blocks", []))
    for i, block in enumerate(blocks):
        p = rate * i / max(1, len(blocks) - 1)
        for attr in ("drop_path1", "drop_path2"):
            if hasattr(block, attr):
                setattr(block, attr, DropPath(p) if p > 0 else nn.Identity())


def _norm_stats(model: nn.Module, meta: dict) -> tuple[tuple, tuple]:
    if "mean" in meta and "std" in meta:
        return tuple(meta["mean"]), tuple(meta["std"])
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", (0.5, 0.5, 0.5))), tuple(cfg.get("std", (0.5, 0.5, 0.5)))
