"""Finite-value checks of a training run: the tensors about to be checkpointed (parameters, buffers,
optimizer state), and the numbers (and device) of a run's settings.

A step whose loss and gradient norm are finite can still leave non-finite weights (an update that
overflows); :func:`nonfinite_state` finds them before a checkpoint replaces the last good one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = [
    "NonFiniteGradient",
    "nonfinite_names",
    "nonfinite_state",
    "describe_tensors",
    "check_number",
    "check_training_device",
]


class NonFiniteGradient(ArithmeticError):
    """The gradient norm of a step is NaN or infinite; the optimizer step was not applied."""


def nonfinite_names(named: Iterable[tuple[str, Tensor]]) -> list[str]:
    """The names of the floating-point tensors in ``named`` that hold a NaN or an infinity (in order)."""
    names, flags = [], []
    for name, tensor in named:
        if tensor.is_floating_point() or tensor.is_complex():
            names.append(name)
            flags.append(torch.isfinite(tensor.detach()).all())
    if not names:
        return []
    finite = torch.stack(flags).cpu().tolist()  # one device sync for all tensors
    return [name for name, ok in zip(names, finite) if not ok]


def nonfinite_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    """Labels of the non-finite tensors among ``model``'s parameters and buffers and ``optimizer``'s
    per-parameter state (``"parameter blocks.0.attn.qkv.weight"``, ``"buffer ..."``,
    ``"optimizer exp_avg_sq of blocks.0.attn.qkv.weight"``)."""
    named: list[tuple[str, Tensor]] = [(f"parameter {n}", p) for n, p in model.named_parameters()]
    named += [(f"buffer {n}", b) for n, b in model.named_buffers()]
    if optimizer is not None:
        param_names = {id(p): n for n, p in model.named_parameters()}
        for param, state in optimizer.state.items():
            owner = param_names.get(id(param), "an unnamed parameter")
            named += [(f"optimizer {key} of {owner}", v) for key, v in state.items() if isinstance(v, Tensor)]
    return nonfinite_names(named)


def describe_tensors(labels: list[str], limit: int = 3) -> str:
    """``labels`` for a message: the first ``limit`` and how many more."""
    shown = ", ".join(labels[:limit])
    more = len(labels) - limit
    return f"{shown} and {more} more tensor(s)" if more > 0 else shown


def check_number(
    owner: str,
    name: str,
    value: float | None,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ``ValueError`` naming ``owner.name`` unless ``value`` is None or a finite number in the range
    (``low_open``/``high_open`` exclude the bound)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}.{name} must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(-∞" if low is None else f"{'(' if low_open else '['}{low:g}"
        right = "∞)" if high is None else f"{high:g}{')' if high_open else ']'}"
        raise ValueError(f"{owner}.{name} must be in {left}, {right}, got {value!r}")


def check_training_device(owner: str, device: str) -> None:
    """Raise ``ValueError`` unless ``device`` is one training runs on: ``auto``, ``cpu``, ``cuda``, ``cuda:N``."""
    try:
        kind = torch.device(device).type if device != "auto" else "auto"
    except (RuntimeError, TypeError):
        kind = None
    if kind not in ("auto", "cpu", "cuda"):
        raise ValueError(f"{owner} must be auto, cpu, cuda or cuda:N, got {device!r}")
