"""The pretraining loop: AdamW + warm-up + cosine, clipping, autocast, checkpoints, resume, DDP.

Reproducibility contract: the images of step s on rank r, their augmentation and masks are a function
of (seed, s, r) alone — epoch e's order is a permutation seeded by (seed, e), step s takes the s-th
global batch of it and rank r the r-th slice; augmentation draws from a generator seeded by
(seed, s, r). A run resumed from any checkpoint therefore ends bit-identical to an uninterrupted one
(on CPU), provided model, optimizer, schedule and global RNG states are restored — all of which
``train_state.pt`` holds (plain tensors and Python values, readable with ``torch.load(weights_only=True)``).

Files under ``--out`` (written by rank 0 only, each atomically):
- ``encoder.safetensors`` — the encoder under timm's key names;
- ``encoder.json`` — arch, arch_kwargs (``timm.create_model(arch, **arch_kwargs)`` rebuilds it), method, step;
- ``train_state.pt`` — everything needed by ``--resume``;
- ``log.jsonl`` — one line per step (appended; truncated to the resumed step on resume);
- ``snapshots/step-NNNNNNN/`` — with ``keep_every``: the encoder (and its ``encoder.json``) every N steps.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from vitscope.bundled import read_card
from vitscope.io import atomic_path, write_json_atomic, write_text_atomic
from vitscope.pretrain.objectives import ObjectiveConfig, build_objective, encoder_geometry, encoder_norm_stats

__all__ = [
    "TrainConfig", "TrainingDiverged", "DistEnv", "init_distributed", "load_images", "load_train_images", "BatchPlan",
    "warmup_cosine_lr", "step_seed", "param_groups", "export_encoder", "read_encoder_json", "check_run_dir", "pretrain",
    "PretrainResult", "capture_rng_state", "restore_rng_state",
]

ENCODER_FILE, ENCODER_JSON, STATE_FILE, LOG_FILE = "encoder.safetensors", "encoder.json", "train_state.pt", "log.jsonl"
SNAPSHOT_DIR = "snapshots"  # encoders kept along the way: snapshots/step-NNNNNNN/encoder.{safetensors,json}
# config fields that may change between a run and its resumption
RESUMABLE_CHANGES = {"resume", "progress", "save_every", "out", "device", "log_every", "keep_every"}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint was kept."""


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
    lr: float | None = None            # None: blr × global batch / 256
    blr: float = 1.5e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int | None = None    # None: 10 % of the steps
    clip_grad: float | None = 3.0
    seed: int = 0
    precision: str = "auto"            # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    device: str = "auto"
    out: str = "runs/pretrain"
    save_every: int = 500
    keep_every: int | None = None      # also keep the encoder every N steps under snapshots/step-NNNNNNN/
    resume: bool = False
    progress: bool = True
    log_every: int = 1
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


# ------------------------------------------------------------------------------------- distributed
@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group torchrun describes (WORLD_SIZE/RANK/LOCAL_RANK): NCCL on GPUs, gloo on CPU."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        dev = torch.device("cuda", local_rank if world > 1 else (torch.device(device).index or 0) if device != "auto" else 0)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistEnv(rank, world, local_rank, dev)


def _all_mean(value: Tensor, env: DistEnv) -> Tensor:
    if env.world > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= env.world
    return value


# ------------------------------------------------------------------------------------------- data
def load_images(spec: str, split: str, num_images: int | None, seed: int, image_size: int) -> tuple[Tensor, Tensor]:
    """A split of the images a data spec names: (uint8 [N, H, W] or [N, H, W, 3], int64 labels [N]).

    Array datasets (Fashion-MNIST) are used as they are; image folders are read once, resized to the
    model's input size (unreadable files skipped). ``num_images`` takes a stratified subset.
    """
    from vitscope.data import dataset_labels, open_dataset, stratified_subset

    dataset = open_dataset(spec, split)
    indices = np.arange(len(dataset))
    if num_images is not None:
        if num_images < 1:
            raise ValueError(f"--num-images must be positive, got {num_images}")
        indices = stratified_subset(dataset_labels(dataset), num_images, seed, total=len(dataset))
    array = getattr(dataset, "images", None)
    if isinstance(array, np.ndarray) and array.dtype == np.uint8:
        labels = np.asarray(dataset.labels)[indices]
        return torch.from_numpy(np.ascontiguousarray(array[indices])), torch.from_numpy(labels.astype(np.int64))
    from torchvision.transforms import functional as TF

    images, labels = [], []
    for i in indices.tolist():
        item = dataset[i]
        if not isinstance(item, tuple):  # an unreadable file, skipped
            continue
        tensor = TF.resize(item[0], [image_size, image_size], antialias=True)
        images.append((tensor.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0))
        labels.append(int(item[1]))
    if not images:
        raise ValueError(f"--data {spec!r}: no readable images")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def load_train_images(spec: str, num_images: int | None, seed: int, image_size: int) -> Tensor:
    """The train split's images (see :func:`load_images`)."""
    return load_images(spec, "train", num_images, seed, image_size)[0]


def step_seed(seed: int, step: int, rank: int = 0, stream: int = 0) -> int:
    """A 63-bit seed that is a function of (seed, step, rank, stream) only."""
    return int(np.random.SeedSequence([seed, step, rank, stream, 0x5EED]).generate_state(2, dtype=np.uint32)
               .astype(np.uint64).dot([1 << 31, 1]))


@dataclass
class BatchPlan:
    """Which images step s gives each rank: epoch order seeded by (seed, epoch), disjoint rank slices."""

    num_images: int
    batch_size: int
    world: int
    seed: int
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    @property
    def steps_per_epoch(self) -> int:
        return self.num_images // self.global_batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            self._cache.clear()
            self._cache[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_images)
        return self._cache[epoch]

    def position(self, step: int) -> tuple[int, int]:
        return divmod(step, self.steps_per_epoch)

    def indices(self, step: int, rank: int) -> np.ndarray:
        epoch, within = self.position(step)
        start = within * self.global_batch + rank * self.batch_size
        return self.epoch_order(epoch)[start : start + self.batch_size]


# --------------------------------------------------------------------------------------- optimiser
def warmup_cosine_lr(step: int, total: int, warmup: int, lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up from 0 over ``warmup`` steps, then half-cosine from lr to min_lr (MAE's schedule)."""
    if step < warmup:
        return lr * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


_NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "reg_token", "dist_token")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases, norms, tokens and position embeddings get none."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(_NO_DECAY_NAMES):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


# ------------------------------------------------------------------------------------- checkpoints
def capture_rng_state() -> dict:
    """Global RNG states of torch (CPU, CUDA), numpy and Python as tensors and plain Python values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def export_encoder(out: Path, encoder: nn.Module, cfg: TrainConfig, step: int) -> None:
    """``encoder.safetensors`` (timm key names) and ``encoder.json`` beside it, each written atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in encoder.state_dict().items()}
    with atomic_path(out / ENCODER_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "arch": _timm_name(cfg.arch), "step": str(step)})
    image_size, patch, _ = encoder_geometry(encoder)
    mean, std = encoder_norm_stats(encoder)
    write_json_atomic(out / ENCODER_JSON, {
        "format": "vitscope-encoder-v1",
        "arch": _timm_name(cfg.arch),
        "arch_kwargs": {**cfg.model_kwargs, "num_classes": 0},
        "method": cfg.objective.method,
        "mim": cfg.objective.mim if cfg.objective.method == "hybrid" else None,
        "cl_weight": cfg.objective.cl_weight if cfg.objective.method == "hybrid" else None,
        "step": step,
        "image_size": image_size,
        "patch_size": patch,
        "mean": list(mean),
        "std": list(std),
        "data": cfg.data,
        "seed": cfg.seed,
    })


def read_encoder_json(path: str | os.PathLike) -> dict:
    """The ``encoder.json`` beside an ``encoder.safetensors`` (or the JSON path itself), checked."""
    path = Path(path)
    meta_path = path if path.suffix == ".json" else path.with_name(ENCODER_JSON)
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path}: no encoder.json beside {path}")
    return read_card(meta_path)


def _timm_name(arch: str) -> str:
    return arch.split(":", 1)[1] if arch.startswith("timm:") else arch


def _save_train_state(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any,
                      step: int, plan: BatchPlan, schedule: dict, cfg: TrainConfig) -> None:
    epoch, within = plan.position(step)
    state = {
        "format": "vitscope-train-state-v1",
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": schedule,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": capture_rng_state(),
        "data_position": {"epoch": epoch, "batch_in_epoch": within, "steps_per_epoch": plan.steps_per_epoch},
        "config": cfg.to_dict(),
        "num_threads": torch.get_num_threads(),
    }
    with atomic_path(out / STATE_FILE) as tmp:
        torch.save(state, tmp)


def _check_resumable(saved: dict, cfg: TrainConfig, path: Path) -> None:
    current = cfg.to_dict()
    changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k])
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} → {current[k]!r}" for k in changed)
        raise ValueError(f"{path}: cannot resume with different settings ({details})")


def _warn_threads(saved: int | None, path: Path) -> None:
    if saved is not None and saved != torch.get_num_threads():
        import warnings

        warnings.warn(f"{path} was written with {saved} CPU threads, resuming with {torch.get_num_threads()}: "
                      "the result will not be bit-identical to an uninterrupted run on CPU", stacklevel=3)


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of steps < ``step`` (the resumed run rewrites the rest)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] < step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # a torn last line from a killed run
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))


# ------------------------------------------------------------------------------------------- loop
@dataclass
class PretrainResult:
    objective: nn.Module
    step: int
    losses: list[float]
    out: Path
    plan: BatchPlan
    env: DistEnv


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "fp32":
        return None
    if precision in ("bf16", "fp16"):
        if precision == "fp16" and device.type != "cuda":
            raise ValueError("--precision fp16 needs CUDA (use bf16 or fp32 on CPU)")
        return torch.bfloat16 if precision == "bf16" else torch.float16
    raise ValueError(f"--precision must be auto, fp32, bf16 or fp16, not {precision!r}")


def _total_steps(cfg: TrainConfig, plan: BatchPlan) -> int:
    if plan.steps_per_epoch == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} × {plan.world} process(es) exceeds the {plan.num_images} training images")
    if cfg.steps is not None:
        total = cfg.steps
    elif cfg.epochs is not None:
        total = int(round(cfg.epochs * plan.steps_per_epoch))
    else:
        raise ValueError("give --epochs or --steps")
    if total < 1:
        raise ValueError(f"the run has no steps (--steps {cfg.steps}, --epochs {cfg.epochs})")
    return total


def check_run_dir(out_dir: str | os.PathLike, resume: bool) -> tuple[Path, Path]:
    """The run directory and its state file; refuses to resume nothing or to overwrite a run."""
    out = Path(out_dir)
    state_path = out / STATE_FILE
    if resume and not state_path.exists():
        raise FileNotFoundError(f"--resume: no {state_path} to resume from")
    if not resume and state_path.exists():
        raise ValueError(f"--out {out} already holds a run ({STATE_FILE}); pass --resume or choose another --out")
    return out, state_path


def pretrain(cfg: TrainConfig) -> PretrainResult:
    """Run (or resume) a pretraining run as ``cfg`` describes; returns the trained objective."""
    env = init_distributed(cfg.device)
    out, state_path = check_run_dir(cfg.out, cfg.resume)

    torch.manual_seed(cfg.seed)
    objective = build_objective(cfg.arch, cfg.model_kwargs, cfg.objective)
    image_size, _, _ = encoder_geometry(objective.encoder)
    images = load_train_images(cfg.data, cfg.num_images, cfg.seed, image_size)
    plan = BatchPlan(len(images), cfg.batch_size, env.world, cfg.seed)
    total = _total_steps(cfg, plan)
    lr = cfg.lr if cfg.lr is not None else cfg.blr * plan.global_batch / 256
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else total // 10
    schedule = {"name": "warmup_cosine", "lr": lr, "min_lr": cfg.min_lr, "warmup_steps": warmup, "total_steps": total}

    objective.to(env.device)
    optimizer = torch.optim.AdamW(param_groups(objective, cfg.weight_decay), lr=lr, betas=tuple(cfg.betas))
    amp_dtype = _autocast_dtype(cfg.precision, env.device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    torch.manual_seed(step_seed(cfg.seed, 0, env.rank, stream=1))  # dropout / drop-path stream of this rank

    start = 0
    if cfg.resume:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        _check_resumable(state["config"], cfg, state_path)
        objective.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        start = int(state["step"])
        _warn_threads(state.get("num_threads"), state_path)
        if env.is_main:
            _truncate_log(out / LOG_FILE, start)

    model: nn.Module = objective
    if env.world > 1:
        if env.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(objective)
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    images = images.to(env.device)
    losses: list[float] = []
    last_saved = start
    log = None
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        log = open(out / LOG_FILE, "a")
    bar = _progress(start, total, env.is_main and cfg.progress)
    try:
        for step in range(start, total):
            tick = time.perf_counter()
            step_lr = warmup_cosine_lr(step, total, warmup, lr, cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = step_lr
            momentum = _momentum(cfg, step, total)
            generator = torch.Generator().manual_seed(step_seed(cfg.seed, step, env.rank))
            index = torch.from_numpy(plan.indices(step, env.rank)).to(env.device)
            inputs = objective.prepare(images[index], generator, momentum if momentum is not None else 0.0)
            with torch.autocast(env.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                parts = model(inputs)
            loss = parts["loss"]
            reported = _all_mean(torch.stack([p.detach().float() for p in parts.values()]), env)
            loss_value = float(reported[0])
            if not math.isfinite(loss_value):
                raise TrainingDiverged(
                    f"loss is {loss_value} at step {step}; stopped. The last good checkpoint "
                    f"({state_path if last_saved > 0 else 'none written yet'}, step {last_saved}) was kept.")
            optimizer.zero_grad(set_to_none=True)
            grad_norm = _backward_and_step(loss, objective, optimizer, scaler, cfg.clip_grad)
            losses.append(loss_value)
            done = step + 1
            rate = plan.global_batch / max(time.perf_counter() - tick, 1e-9)
            if log is not None and (done % cfg.log_every == 0 or done == total):
                record = {"step": step, "epoch": step / plan.steps_per_epoch, "lr": step_lr,
                          **{k: float(v) for k, v in zip(parts.keys(), reported)},
                          "grad_norm": grad_norm, "images_per_s": rate}
                if momentum is not None:
                    record["momentum"] = momentum
                log.write(json.dumps(record) + "\n")
                log.flush()
            if bar is not None:
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{step_lr:.2e}", img_s=f"{rate:.0f}", refresh=False)
                bar.update(1)
            if cfg.keep_every and done % cfg.keep_every == 0 and env.is_main:
                export_encoder(out / SNAPSHOT_DIR / f"step-{done:07d}", objective.encoder, cfg, done)
            if done % cfg.save_every == 0 or done == total:
                if env.is_main:
                    export_encoder(out, objective.encoder, cfg, done)
                    _save_train_state(out, objective, optimizer, scaler, done, plan, schedule, cfg)
                last_saved = done
                if env.world > 1:
                    dist.barrier()
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    return PretrainResult(objective, total, losses, out, plan, env)


def _progress(start: int, total: int, enabled: bool):  # noqa: ANN202 - tqdm or None
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="pretrain", unit="step", dynamic_ncols=True)


def _momentum(cfg: TrainConfig, step: int, total: int) -> float | None:
    if cfg.objective.method not in ("moco", "hybrid"):
        return None
    from vitscope.pretrain.objectives import moco_momentum

    return moco_momentum(step / total, cfg.objective.moco_m)


def _backward_and_step(loss: Tensor, objective: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any,
                       clip: float | None) -> float:
    params = [p for p in objective.parameters() if p.requires_grad]
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if clip is not None and clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return float(norm)


def iter_log(path: str | os.PathLike) -> Iterator[dict]:
    """The records of a ``log.jsonl``."""
    with open(path) as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)
