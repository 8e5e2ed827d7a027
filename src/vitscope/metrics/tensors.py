"""Shape checks and the reduction dtype shared by the metric functions."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["TINY", "reduction_dtype", "as_reduction", "check_attention", "check_grid"]

TINY = 1e-38  # below float32's smallest normal: x·log x there is < 1e-36, i.e. 0 for our sums


def reduction_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 input, else float32 (bf16/fp16/float32 are all reduced in float32)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def as_reduction(x: Tensor) -> Tensor:
    return x.to(reduction_dtype(x))


def check_attention(attn: Tensor, name: str = "attn") -> None:
    if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"{name} must be [B, H, N, N], got shape {tuple(attn.shape)}")
    if not attn.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got {attn.dtype}")


def check_grid(grid: tuple[int, int], num_tokens: int, name: str) -> tuple[int, int]:
    h, w = int(grid[0]), int(grid[1])
    if h * w != num_tokens:
        raise ValueError(f"grid {grid} has {h * w} cells but {name} has {num_tokens} spatial tokens")
    return h, w
