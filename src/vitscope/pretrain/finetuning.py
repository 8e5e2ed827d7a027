"""End-to-end fine-tuning of a pretrained encoder for classification (MAE's recipe, scaled down).

Recipe: random resized crop + flip, label smoothing, AdamW with layer-wise learning-rate decay
(MAE's ``param_groups_lrd``: scale = decay^(L + 1 − layer), patch/position embedding = layer 0,
block i = layer i + 1, head and final norms = layer L + 1), linear warm-up then cosine, gradient
clipping; top-1 on the test split after every epoch. Mixup/CutMix/RandAugment of the full MAE recipe
are not applied (they matter at ImageNet scale, not for 28 px images).

The encoder is loaded by :func:`vitscope.models.load_model` (any spec; ``file:RUN_DIR`` for a
``vitscope pretrain`` run), strictly. Same determinism, checkpoint, resume and DDP rules as
:mod:`vitscope.pretrain.trainer`, and the same loop (:mod:`vitscope.pretrain.loop`); files under
``out``: ``model.safetensors`` + ``model.json`` (classifier with head), ``train_state.pt``,
``log.jsonl`` (step lines and ``{"epoch", "top1"}`` lines), ``metrics.json`` (top-1 per epoch); with
``track_every``, measurements as in :mod:`vitscope.pretrain.tracking` (log records and ``tensorboard/``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from vitscope.distributed import DistEnv, all_mean, init_distributed
from vitscope.io import write_json_atomic
from vitscope.pretrain import augment
from vitscope.pretrain.batches import BatchPlan, load_images, step_seed
from vitscope.pretrain.checkpoint import (
    LOG_FILE,
    card_step,
    check_run_dir,
    export_model,
    read_train_state,
    restore_train_state,
    run_lock,
    save_train_state,
    truncate_log,
)
from vitscope.pretrain.finite import check_number, check_training_device, nonfinite_state
from vitscope.pretrain.loop import Checkpointing, run_loop
from vitscope.pretrain.optim import autocast_dtype, backward_and_step, layer_decay_groups, warmup_cosine_lr
from vitscope.pretrain.tracking import Tracker

if TYPE_CHECKING:
    from timm.models import VisionTransformer

    from vitscope.models.load_report import LoadReport

__all__ = ["FinetuneConfig", "FinetuneResult", "load_encoder", "finetune", "evaluate_top1"]

RESUMABLE_CHANGES = {"resume", "progress", "save_every", "out", "device", "track_every", "track_images", "epochs"}
MODEL_FILE, MODEL_CARD = "model.safetensors", "model.json"
STATE_FORMAT = "vitscope-finetune-state-v1"


@dataclass
class FinetuneConfig:
    model: str = "file:runs/moco/encoder.safetensors"
    model_kwargs: dict = field(default_factory=dict)
    data: str = "fashion-mnist"
    test_data: str | None = None  # None: the test split of ``data``
    num_images: int | None = None
    num_test_images: int | None = None
    epochs: int = 10
    batch_size: int = 64
    lr: float | None = None  # None: blr × global batch / 256
    blr: float = 1e-3
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    warmup_epochs: float = 1.0
    warmup_steps: int | None = None  # when set, the warmup in optimizer steps (warmup_epochs ignored)
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
    track_every: int | None = None  # measure the model on held-out images every N steps (and at step 0)
    track_images: int = 64

    def __post_init__(self) -> None:
        for name in (
            "epochs",
            "batch_size",
            "save_every",
            "num_images",
            "num_test_images",
            "track_every",
            "track_images",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"FinetuneConfig.{name} must be positive, got {value}")
        for name in ("lr", "blr"):
            check_number("FinetuneConfig", name, getattr(self, name), 0.0, low_open=True)
        for name in ("weight_decay", "warmup_epochs", "min_lr", "clip_grad"):
            check_number("FinetuneConfig", name, getattr(self, name), 0.0)
        check_number("FinetuneConfig", "layer_decay", self.layer_decay, 0.0, 1.0, low_open=True)
        check_number("FinetuneConfig", "label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        check_number("FinetuneConfig", "drop_path", self.drop_path, 0.0, 1.0, high_open=True)
        check_number("FinetuneConfig", "crop_min_scale", self.crop_min_scale, 0.0, 1.0, low_open=True)
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"FinetuneConfig.warmup_steps must be ≥ 0, got {self.warmup_steps}")
        if self.seed < 0:
            raise ValueError(f"FinetuneConfig.seed must be ≥ 0, got {self.seed}")
        check_training_device("FinetuneConfig.device", self.device)

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
def load_encoder(spec: str, **options: object) -> tuple[nn.Module, dict]:
    """A pretrained encoder (loaded strictly by :func:`vitscope.models.load_model`) and its card
    {arch, arch_kwargs, mean, std}."""
    from vitscope.models import load_model

    model = load_model(spec, **options)
    report = cast("LoadReport", model.vitscope_load_report)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return model, {
        "arch": report.arch,
        "arch_kwargs": dict(report.arch_kwargs),
        "mean": list(cfg.get("mean", (0.5, 0.5, 0.5))),
        "std": list(cfg.get("std", (0.5, 0.5, 0.5))),
    }


# ----------------------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate_top1(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    size: int,
    mean: tuple,
    std: tuple,
    batch_size: int,
    env: DistEnv,
    amp_dtype: torch.dtype | None,
) -> float:
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


# ------------------------------------------------------------------------------------------- step
class FinetuneStep:
    """One optimizer step of fine-tuning: schedule, batch, augmentation, forward, backward."""

    def __init__(
        self,
        cfg: FinetuneConfig,
        model: nn.Module,
        net: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None,
        data: tuple[Tensor, Tensor],
        plan: BatchPlan,
        env: DistEnv,
        schedule: tuple[int, int, float],
        view: tuple[int, tuple, tuple],
        amp_dtype: torch.dtype | None,
    ) -> None:
        self.cfg, self.model, self.net, self.optimizer, self.scaler = cfg, model, net, optimizer, scaler
        (self.images, self.labels), self.plan, self.env, self.amp_dtype = data, plan, env, amp_dtype
        self.total, self.warmup, self.lr = schedule
        self.size, self.mean, self.std = view
        self.spec = augment.ViewSpec(crop=augment.CropSpec(scale=(cfg.crop_min_scale, 1.0)))

    def __call__(self, step: int) -> dict[str, float]:
        cfg, env = self.cfg, self.env
        lr = warmup_cosine_lr(step, self.total, self.warmup, self.lr, cfg.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        generator = torch.Generator().manual_seed(step_seed(cfg.seed, step, env.rank))
        index = torch.from_numpy(self.plan.indices(step, env.rank)).to(env.device)
        x = augment.make_view(
            augment.to_float_rgb(self.images[index]), self.size, self.spec, generator, self.mean, self.std
        )
        with torch.autocast(env.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            loss = F.cross_entropy(self.net(x).float(), self.labels[index], label_smoothing=cfg.label_smoothing)
        reported = float(all_mean(loss.detach().clone(), env))
        if not torch.isfinite(torch.tensor(reported)):  # stop before a non-finite step touches the weights
            return {"loss": reported}
        self.optimizer.zero_grad(set_to_none=True)
        grad_norm = backward_and_step(loss, self.model, self.optimizer, self.scaler, cfg.clip_grad)
        return {"lr": lr, "loss": reported, "grad_norm": grad_norm}


# ------------------------------------------------------------------------------------------- run
def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Fine-tune ``cfg.model`` on ``cfg.data`` (train split), reporting test top-1 after each epoch."""
    env = init_distributed(cfg.device)
    with run_lock(cfg.out, env):
        return _finetune(cfg, env)


def _finetune(cfg: FinetuneConfig, env: DistEnv) -> FinetuneResult:
    out, state_path = check_run_dir(cfg.out, cfg.resume)
    saved = (
        read_train_state(state_path, STATE_FORMAT, cfg.to_dict(), RESUMABLE_CHANGES, extra_keys=("top1",))
        if cfg.resume
        else None
    )

    torch.manual_seed(cfg.seed)
    model, meta = load_encoder(cfg.model, **cfg.model_kwargs)
    vit = cast("VisionTransformer", model)  # a timm ViT: patch_embed.img_size, reset_classifier, head
    size = int(vit.patch_embed.img_size[0])
    train_x, train_y = load_images(cfg.data, "train", cfg.num_images, cfg.seed, size)
    test_x, test_y = load_images(cfg.test_data or cfg.data, "test", cfg.num_test_images, cfg.seed, size)
    if int(train_y.min()) < 0:
        raise ValueError(f"data {cfg.data!r}: fine-tuning needs labelled images (class folders)")
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    vit.reset_classifier(num_classes)
    head = cast(nn.Linear, vit.head)  # with num_classes ≥ 1, reset_classifier made it a Linear layer
    nn.init.trunc_normal_(head.weight, std=2e-5)
    nn.init.zeros_(head.bias)
    _set_drop_path(model, cfg.drop_path)
    meta = {**meta, "arch_kwargs": {**meta["arch_kwargs"], "num_classes": num_classes}, "method": "finetune"}
    mean, std = tuple(meta["mean"]), tuple(meta["std"])

    plan = BatchPlan(len(train_x), cfg.batch_size, env.world, cfg.seed)
    if plan.steps_per_epoch == 0:
        raise ValueError(f"batch_size {cfg.batch_size} × {env.world} exceeds the {len(train_x)} training images")
    total = cfg.epochs * plan.steps_per_epoch
    lr = cfg.lr if cfg.lr is not None else cfg.blr * plan.global_batch / 256
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * plan.steps_per_epoch)
    model.to(env.device)
    optimizer = torch.optim.AdamW(
        layer_decay_groups(model, cfg.weight_decay, cfg.layer_decay), lr=lr, betas=(0.9, 0.999)
    )
    amp_dtype = autocast_dtype(cfg.precision, env.device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    torch.manual_seed(step_seed(cfg.seed, 0, env.rank, stream=1))

    start, top1 = 0, []
    if saved is not None:
        restore_train_state(state_path, saved, model=model, optimizer=optimizer, scaler=scaler)
        start, top1 = int(saved["step"]), list(saved["top1"])
        if start > total:
            raise ValueError(
                f"{cfg.out}: the run is at step {start}, past the {total} steps of {cfg.epochs} epoch(s); "
                "resume with at least as many --epochs as before"
            )
        if env.is_main:
            truncate_log(out / LOG_FILE, start)
        del saved

    net: nn.Module = model
    if env.world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None
        )
    test_x, test_y = test_x.to(env.device), test_y.to(env.device)
    step_fn = FinetuneStep(
        cfg,
        model,
        net,
        optimizer,
        scaler,
        (train_x.to(env.device), train_y.to(env.device)),
        plan,
        env,
        (total, warmup, lr),
        (size, mean, std),
        amp_dtype,
    )
    model.train()

    def after_step(done: int) -> tuple[dict, str] | None:
        if done % plan.steps_per_epoch:
            return None
        acc = evaluate_top1(model, test_x, test_y, size, mean, std, 256, env, amp_dtype)
        top1.append(acc)
        epoch = done // plan.steps_per_epoch
        return {"epoch": epoch, "top1": acc}, f"epoch {epoch}/{cfg.epochs}: test top-1 {100 * acc:.2f}%"

    def export(done: int) -> None:
        card = {**meta, "step": done, "top1": top1, "finetuned_from": cfg.model}
        export_model(out, MODEL_FILE, MODEL_CARD, model, card)

    def write(done: int) -> None:  # the state first: a run killed between the two resumes to both
        save_train_state(
            out,
            format=STATE_FORMAT,
            step=done,
            model=model,
            optimizer=optimizer,
            scaler=scaler,
            plan=plan,
            config=cfg.to_dict(),
            top1=top1,
        )
        export(done)
        if done == total:
            write_json_atomic(out / "metrics.json", {"top1_per_epoch": top1, "model": cfg.model, "data": cfg.data})

    if start and env.is_main and card_step(out, MODEL_FILE, MODEL_CARD) != start:  # killed between the writes
        export(start)
    tracker = None
    if cfg.track_every is not None and env.is_main:
        tracker = Tracker(
            model,
            out,
            every=cfg.track_every,
            data=cfg.test_data or cfg.data,
            seed=cfg.seed,
            mean=mean,
            std=std,
            steps_per_epoch=plan.steps_per_epoch,
            start=start,
            images=cfg.track_images,
            dtype=amp_dtype,
        )
    run_loop(
        step_fn,
        start=start,
        total=total,
        env=env,
        out=out,
        checkpointing=Checkpointing(
            cfg.save_every, write, state_path=state_path, nonfinite=lambda: nonfinite_state(model, optimizer)
        ),
        images_per_step=plan.global_batch,
        progress=cfg.progress,
        after_step=after_step,
        desc="finetune",
        tracker=tracker,
    )
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
