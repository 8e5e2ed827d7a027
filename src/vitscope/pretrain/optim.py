"""Optimisation pieces shared by pretraining and fine-tuning: schedules, parameter groups, precision and
one clipped optimizer step."""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor, nn

from vitscope.pretrain.finite import NonFiniteGradient

__all__ = ["warmup_cosine_lr", "param_groups", "layer_decay_groups", "autocast_dtype", "backward_and_step"]

_NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "reg_token", "dist_token")


def warmup_cosine_lr(step: int, total: int, warmup: int, lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up from 0 over ``warmup`` steps, then half-cosine from lr to min_lr (MAE's schedule)."""
    if step < warmup:
        return lr * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


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


def _layer_id(name: str, num_layers: int) -> int:
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "reg_token", "dist_token", "mask_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups with MAE's layer-wise lr scale decay^(L − layer_id); no decay on vectors (ndim 1) and on
    position embeddings and class/register/distillation tokens.

    Layer ids: embeddings 0, block i → i + 1, head and final norms L = blocks + 1.
    """
    num_layers = len(cast("nn.Sequential | nn.ModuleList", model.blocks)) + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim == 1 or name.endswith(("pos_embed", "cls_token", "reg_token", "dist_token"))
        layer = _layer_id(name, num_layers)
        group = groups.setdefault(
            (layer, no_decay),
            {
                "params": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (num_layers - layer),
                "layer": layer,
            },
        )
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (auto = bf16 on CUDA, fp32 on CPU); None means full precision."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "fp32":
        return None
    if precision in ("bf16", "fp16"):
        if precision == "fp16" and device.type != "cuda":
            raise ValueError("precision fp16 needs CUDA (use bf16 or fp32 on CPU)")
        return torch.bfloat16 if precision == "bf16" else torch.float16
    raise ValueError(f"precision must be auto, fp32, bf16 or fp16, not {precision!r}")


def backward_and_step(
    loss: Tensor, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, clip: float | None
) -> float:
    """Backward, optional gradient clipping (by global norm), optimizer step; returns the gradient norm
    (before clipping).

    Raises:
        NonFiniteGradient: without a gradient scaler, the norm is NaN or infinite; the optimizer step
            was not applied, the weights are untouched. (With a scaler, fp16 overflow is routine: the
            scaler skips that step and lowers its scale.)
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if clip is not None and clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)  # a non-finite norm spoils the grads: not applied
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    value = float(norm)
    if scaler is None and not math.isfinite(value):
        raise NonFiniteGradient(f"gradient norm is {value}")
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return value
