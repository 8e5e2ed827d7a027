"""A pretraining run: the set-up, one step, and the shared loop (:mod:`vitscope.pretrain.loop`).

Reproducibility contract: the images of step s on rank r, their augmentation and masks are a function
of (seed, s, r) alone (:mod:`vitscope.pretrain.batches`). A run resumed from any checkpoint therefore
ends bit-identical to an uninterrupted one (on CPU), provided model, optimizer and global RNG states
are restored — all of which ``train_state.pt`` holds (:mod:`vitscope.pretrain.checkpoint`); the
schedule is recomputed from the config and the step.

Files under ``out`` (written by rank 0 only, each atomically):
- ``encoder.safetensors`` — the encoder under timm's key names;
- ``encoder.json`` — its model card: arch, arch_kwargs (``timm.create_model(arch, **arch_kwargs)``
  rebuilds it), method, step, normalisation;
- ``train_state.pt`` — everything needed to resume;
- ``log.jsonl`` — one line every ``log_every`` steps (appended; truncated to the resumed step on resume);
- ``snapshots/step-NNNNNNN/`` — with ``keep_every``: the encoder (and its card) every N steps;
- ``tensorboard/`` — with ``track_every``: TensorBoard event files (:mod:`vitscope.pretrain.tracking`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
from timm.models import VisionTransformer
from torch import nn

from vitscope.distributed import DistEnv, all_mean, init_distributed
from vitscope.models.cards import ENCODER_CARD
from vitscope.models.load import ENCODER_FILE
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
from vitscope.pretrain.loop import Checkpointing, TrainingDiverged, run_loop
from vitscope.pretrain.objectives import (
    Objective,
    ObjectiveConfig,
    build_objective,
    encoder_geometry,
    encoder_norm_stats,
    moco_momentum,
)
from vitscope.pretrain.optim import autocast_dtype, backward_and_step, param_groups, warmup_cosine_lr
from vitscope.pretrain.tracking import Tracker

__all__ = ["TrainConfig", "PretrainResult", "pretrain", "TrainingDiverged", "SNAPSHOT_DIR", "RESUMABLE_CHANGES"]

SNAPSHOT_DIR = "snapshots"  # encoders kept along the way: snapshots/step-NNNNNNN/encoder.{safetensors,json}
STATE_FORMAT = "vitscope-train-state-v1"
# config fields that may change between a run and its resumption
RESUMABLE_CHANGES = {
    "resume",
    "progress",
    "save_every",
    "out",
    "device",
    "log_every",
    "keep_every",
    "track_every",
    "track_images",
    "epochs",  # more epochs or steps: a finished run continues to the longer schedule (see _warmup_steps)
    "steps",
}


@dataclass
class TrainConfig:
    """One pretraining run. ``batch_size`` is per process; the global batch is batch_size × world size."""

    arch: str = "vit_tiny_patch16_224"
    model_kwargs: dict = field(default_factory=dict)
    data: str = "fashion-mnist"
    num_images: int | None = None
    epochs: float | None = None
    steps: int | None = None
    batch_size: int = 64
    lr: float | None = None  # None: blr × global batch / 256
    blr: float = 1.5e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int | None = None  # None: warmup_epochs, else 10 % of the steps
    warmup_epochs: float | None = None  # warmup in epochs (rounded to steps); give this or warmup_steps
    clip_grad: float | None = 3.0
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    device: str = "auto"
    out: str = "runs/pretrain"
    save_every: int = 500
    keep_every: int | None = None  # also keep the encoder every N steps under snapshots/step-NNNNNNN/
    resume: bool = False
    progress: bool = True
    log_every: int = 1
    track_every: int | None = None  # measure the encoder on held-out images every N steps (and at step 0)
    track_images: int = 64  # held-out images of the per-token suite (the kNN probe uses 512)
    track_data: str | None = None  # the held-out images' data spec (default: ``data``'s test split)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    def __post_init__(self) -> None:
        for name in (
            "batch_size",
            "save_every",
            "log_every",
            "keep_every",
            "num_images",
            "steps",
            "track_every",
            "track_images",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"TrainConfig.{name} must be positive, got {value}")
        for name in ("lr", "blr", "epochs"):
            check_number("TrainConfig", name, getattr(self, name), 0.0, low_open=True)
        for name in ("min_lr", "weight_decay", "clip_grad"):
            check_number("TrainConfig", name, getattr(self, name), 0.0)
        for i, beta in enumerate(self.betas):
            check_number("TrainConfig", f"betas[{i}]", beta, 0.0, 1.0, high_open=True)
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be ≥ 0, got {self.warmup_steps}")
        check_number("TrainConfig", "warmup_epochs", self.warmup_epochs, 0.0)
        if self.warmup_steps is not None and self.warmup_epochs is not None:
            raise ValueError("TrainConfig: give warmup_steps or warmup_epochs, not both")
        if self.seed < 0:
            raise ValueError(f"TrainConfig.seed must be ≥ 0, got {self.seed}")
        check_training_device("TrainConfig.device", self.device)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


@dataclass
class PretrainResult:
    objective: nn.Module
    step: int
    losses: list[float]
    out: Path
    plan: BatchPlan
    env: DistEnv


def _total_steps(cfg: TrainConfig, plan: BatchPlan) -> int:
    if plan.steps_per_epoch == 0:
        raise ValueError(
            f"batch_size {cfg.batch_size} × {plan.world} process(es) exceeds the {plan.num_images} training images"
        )
    if cfg.steps is not None:
        total = cfg.steps
    elif cfg.epochs is not None:
        total = round(cfg.epochs * plan.steps_per_epoch)
    else:
        raise ValueError("give epochs or steps")
    if total < 1:
        raise ValueError(f"the run has no steps (steps {cfg.steps}, epochs {cfg.epochs})")
    return total


def _warmup_steps(cfg: TrainConfig, plan: BatchPlan, total: int, saved: dict | None) -> int:
    """Warmup steps: as given (steps, or epochs rounded to steps), else 10 % of the run. A resumed run keeps the
    warmup it was started with, so a schedule extended on resume (more --epochs/--steps) only stretches the
    cosine; resuming below the steps already done is refused."""
    if saved is not None and int(saved["step"]) > total:
        raise ValueError(
            f"{cfg.out}: the run is at step {saved['step']}, past the {total} steps asked for; "
            "resume with at least as many --steps/--epochs as before"
        )
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    if cfg.warmup_epochs is not None:
        return round(cfg.warmup_epochs * plan.steps_per_epoch)
    saved_schedule = (saved or {}).get("scheduler") or {}
    if "warmup_steps" in saved_schedule:
        return int(saved_schedule["warmup_steps"])
    return total // 10


def _timm_name(arch: str) -> str:
    return arch.split(":", 1)[1] if arch.startswith("timm:") else arch


def encoder_card(encoder: VisionTransformer, cfg: TrainConfig, step: int) -> dict:
    """The ``encoder.json`` model card of a pretrained encoder at ``step``."""
    image_size, patch, _ = encoder_geometry(encoder)
    mean, std = encoder_norm_stats(encoder)
    hybrid = cfg.objective.method == "hybrid"
    return {
        "format": "vitscope-encoder-v1",
        "arch": _timm_name(cfg.arch),
        "arch_kwargs": {**cfg.model_kwargs, "num_classes": 0},
        "method": cfg.objective.method,
        "mim": cfg.objective.mim if hybrid else None,
        "cl_weight": cfg.objective.cl_weight if hybrid else None,
        "step": step,
        "image_size": image_size,
        "patch_size": patch,
        "mean": list(mean),
        "std": list(std),
        "data": cfg.data,
        "seed": cfg.seed,
    }


def export_encoder(out: Path, encoder: VisionTransformer, cfg: TrainConfig, step: int) -> None:
    """``encoder.safetensors`` (timm key names) and its ``encoder.json`` card, each written atomically."""
    export_model(out, ENCODER_FILE, ENCODER_CARD, encoder, encoder_card(encoder, cfg, step))


class PretrainStep:
    """One optimizer step of pretraining: schedule, batch, augmentation, forward, backward."""

    def __init__(
        self,
        cfg: TrainConfig,
        objective: Objective,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None,
        images: torch.Tensor,
        plan: BatchPlan,
        env: DistEnv,
        schedule: dict,
        amp_dtype: torch.dtype | None,
    ) -> None:
        self.cfg, self.objective, self.model, self.optimizer, self.scaler = cfg, objective, model, optimizer, scaler
        self.images, self.plan, self.env, self.schedule, self.amp_dtype = images, plan, env, schedule, amp_dtype
        self.uses_momentum = cfg.objective.method in ("moco", "hybrid")

    def __call__(self, step: int) -> dict[str, float]:
        cfg, env, schedule = self.cfg, self.env, self.schedule
        lr = warmup_cosine_lr(step, schedule["total_steps"], schedule["warmup_steps"], schedule["lr"], cfg.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        momentum = moco_momentum(step / schedule["total_steps"], cfg.objective.moco_m) if self.uses_momentum else None
        generator = torch.Generator().manual_seed(step_seed(cfg.seed, step, env.rank))
        index = torch.from_numpy(self.plan.indices(step, env.rank)).to(env.device)
        inputs = self.objective.prepare(self.images[index], generator, momentum if momentum is not None else 0.0)
        with torch.autocast(env.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            parts = self.model(inputs)
        reported = all_mean(torch.stack([p.detach().float() for p in parts.values()]), env)
        if not torch.isfinite(reported[0]):  # stop before a non-finite step touches the weights
            return {"loss": float(reported[0])}
        self.optimizer.zero_grad(set_to_none=True)
        grad_norm = backward_and_step(parts["loss"], self.objective, self.optimizer, self.scaler, cfg.clip_grad)
        record = {
            "epoch": step / self.plan.steps_per_epoch,
            "lr": lr,
            **{k: float(v) for k, v in zip(parts.keys(), reported)},
            "grad_norm": grad_norm,
        }
        if momentum is not None:
            record["momentum"] = momentum
        return record


def pretrain(cfg: TrainConfig) -> PretrainResult:
    """Run (or resume) a pretraining run as ``cfg`` describes; returns the trained objective."""
    env = init_distributed(cfg.device)
    with run_lock(cfg.out, env):
        return _pretrain(cfg, env)


def _pretrain(cfg: TrainConfig, env: DistEnv) -> PretrainResult:
    out, state_path = check_run_dir(cfg.out, cfg.resume)
    saved = None
    if cfg.resume:
        defaults = {"objective": dataclasses.asdict(ObjectiveConfig())}
        saved = read_train_state(state_path, STATE_FORMAT, cfg.to_dict(), RESUMABLE_CHANGES, defaults=defaults)

    torch.manual_seed(cfg.seed)
    objective = build_objective(cfg.arch, cfg.model_kwargs, cfg.objective)
    image_size, _, _ = encoder_geometry(objective.encoder)
    images = load_images(cfg.data, "train", cfg.num_images, cfg.seed, image_size)[0]
    plan = BatchPlan(len(images), cfg.batch_size, env.world, cfg.seed)
    total = _total_steps(cfg, plan)
    lr = cfg.lr if cfg.lr is not None else cfg.blr * plan.global_batch / 256
    warmup = _warmup_steps(cfg, plan, total, saved)
    schedule = {"name": "warmup_cosine", "lr": lr, "min_lr": cfg.min_lr, "warmup_steps": warmup, "total_steps": total}

    objective.to(env.device)
    betas = cast("tuple[float, float]", tuple(cfg.betas))  # still a pair; mypy sees tuple[float, ...]
    optimizer = torch.optim.AdamW(param_groups(objective, cfg.weight_decay), lr=lr, betas=betas)
    amp_dtype = autocast_dtype(cfg.precision, env.device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    torch.manual_seed(step_seed(cfg.seed, 0, env.rank, stream=1))  # dropout / drop-path stream of this rank

    start = 0
    if saved is not None:
        restore_train_state(state_path, saved, model=objective, optimizer=optimizer, scaler=scaler)
        start = int(saved["step"])
        if env.is_main:
            truncate_log(out / LOG_FILE, start)
            if card_step(out, ENCODER_FILE, ENCODER_CARD) != start:  # a run killed between the two writes
                export_encoder(out, objective.encoder, cfg, start)
        del saved

    model: nn.Module = objective
    if env.world > 1:
        if env.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(objective)
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None
        )
    step_fn = PretrainStep(
        cfg, objective, model, optimizer, scaler, images.to(env.device), plan, env, schedule, amp_dtype
    )

    def write(done: int) -> None:  # the state first: a run killed between the two resumes to both
        save_train_state(
            out,
            format=STATE_FORMAT,
            step=done,
            model=objective,
            optimizer=optimizer,
            scheduler=schedule,
            scaler=scaler,
            plan=plan,
            config=cfg.to_dict(),
        )
        export_encoder(out, objective.encoder, cfg, done)

    def keep(done: int) -> None:
        export_encoder(out / SNAPSHOT_DIR / f"step-{done:07d}", objective.encoder, cfg, done)

    checkpointing = Checkpointing(
        cfg.save_every, write, cfg.keep_every, keep, state_path, nonfinite=lambda: nonfinite_state(objective, optimizer)
    )
    tracker = None
    if cfg.track_every is not None and env.is_main:
        mean, std = encoder_norm_stats(objective.encoder)
        tracker = Tracker(
            objective.encoder,
            out,
            every=cfg.track_every,
            data=cfg.track_data or cfg.data,
            seed=cfg.seed,
            mean=mean,
            std=std,
            steps_per_epoch=plan.steps_per_epoch,
            start=start,
            images=cfg.track_images,
            dtype=amp_dtype,
        )
    losses = run_loop(
        step_fn,
        start=start,
        total=total,
        env=env,
        out=out,
        checkpointing=checkpointing,
        images_per_step=plan.global_batch,
        progress=cfg.progress,
        log_every=cfg.log_every,
        desc="pretrain",
        tracker=tracker,
    )
    return PretrainResult(objective, total, losses, out, plan, env)
