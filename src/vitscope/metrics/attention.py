"""Attention metrics on spatial attention Ã [B, H, N, N]: distance, NMI, entropy (definitions: docs/metrics.md).

Ã has the prefix tokens removed and its rows renormalised (:func:`spatial_attention_for_reduction`);
the N spatial tokens are in row-major order over ``grid`` = (h, w). Every reduction runs in float32
(float64 for float64 input), also for bf16/fp16 input. The derivations that turn the definitions
into a few passes over [B, H, N, N] are written next to each function.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

from vitscope.capture.layer import pair, spatial_attention
from vitscope.metrics.tensors import TINY, as_reduction, check_attention, check_grid, reduction_dtype

__all__ = [
    "REDUCTION_CHUNK_BYTES",
    "image_chunks",
    "spatial_attention",
    "spatial_attention_for_reduction",
    "distance_matrix",
    "attention_distance",
    "mean_row_kl_to_uniform",
    "key_marginal",
    "entropy_from_parts",
    "nmi_from_parts",
    "attention_nmi",
    "attention_entropy",
]


def spatial_attention_for_reduction(attn: Tensor, num_prefix_tokens: int, out: Tensor | None = None) -> Tensor:
    """Ã [B, H, N, N] as a contiguous float32 (float64) tensor, in one pass over the full attention.

    Like :func:`spatial_attention`, but the row sums are taken in the reduction dtype; bf16/fp16 attention
    is upcast to float32 once and renormalised in place. ``out``: a contiguous buffer of at least Ã's size to
    write into (a reducer passes the same one for every chunk: a fresh one of many MB costs page faults).
    """
    check_attention(attn)
    spatial = attn[..., num_prefix_tokens:, num_prefix_tokens:]
    dtype = reduction_dtype(attn)
    out = _scratch(out, spatial.shape, dtype, spatial.device)
    if spatial.dtype != dtype:  # bf16/fp16: upcast first, then renormalise in place (a mixed-dtype division is slow)
        out.copy_(spatial)
        return out.div_(out.sum(dim=-1, keepdim=True).clamp_min_(1e-12))
    row_sums = spatial.sum(dim=-1, keepdim=True, dtype=dtype).clamp_min_(1e-12)
    return torch.div(spatial, row_sums, out=out)


def _scratch(out: Tensor | None, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The front of ``out`` (a contiguous buffer of at least this many elements, dtype and device) viewed as
    ``shape``, else a new tensor."""
    size = math.prod(shape)
    if out is not None and out.dtype == dtype and out.device == device and out.is_contiguous() and out.numel() >= size:
        return out.view(-1)[:size].view(shape)
    return torch.empty(shape, dtype=dtype, device=device)


REDUCTION_CHUNK_BYTES = 16 * 2**20
"""Bytes of float32 attention reduced at a time (:func:`image_chunks`): about half a server CPU's L3 cache."""


def image_chunks(attn: Tensor, chunk_bytes: int | None = None) -> tuple[Tensor, ...]:
    """``attn`` [B, ...] split along the images into as few views of near-equal size as keep each within
    ``chunk_bytes`` (default :data:`REDUCTION_CHUNK_BYTES`) of float32 (one image at least). The attention
    metrics are per image, so reducing chunk by chunk gives the same numbers while the several passes over
    each chunk hit the cache instead of memory (2-3x faster on a CPU for ViT-B at batch 64)."""
    per_image = 4 * math.prod(attn.shape[1:])
    most = max(1, (REDUCTION_CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // max(1, per_image))
    chunks = max(1, -(-attn.shape[0] // most))
    return attn.split(max(1, -(-attn.shape[0] // chunks)))  # chunks of equal size, the last one no larger


@lru_cache(maxsize=32)
def _cached_distance_matrix(h: int, w: int, ph: int, pw: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w) * ph  # [N], row-major grid
    cols = torch.arange(w, dtype=torch.float64).repeat(h) * pw
    distances = torch.hypot(rows[:, None] - rows[None, :], cols[:, None] - cols[None, :])  # [N, N] pixels
    return distances.to(device=device, dtype=dtype)


def distance_matrix(
    grid: tuple[int, int],
    patch_size: int | tuple[int, int],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """D [N, N] in pixels: D_ij = ‖(Δrow·ph, Δcol·pw)‖₂ between grid cells i and j (row-major).

    Cached per (grid, patch size, device, dtype); treat the result as read-only.
    """
    h, w = int(grid[0]), int(grid[1])
    ph, pw = pair(patch_size)
    return _cached_distance_matrix(h, w, ph, pw, torch.device(device), dtype)


def attention_distance(attn: Tensor, grid: tuple[int, int], patch_size: int | tuple[int, int]) -> Tensor:
    """Mean attention distance in pixels, [B, H]: (1/N) Σ_ij Ã_ij D_ij.

    One matrix-vector product of the flattened maps [B·H, N²] with the flattened D.
    """
    check_attention(attn)
    b, heads, n, _ = attn.shape
    check_grid(grid, n, "attn")
    probs = as_reduction(attn)
    dist = distance_matrix(grid, patch_size, probs.device, probs.dtype)
    return (probs.reshape(b, heads, n * n) @ dist.reshape(n * n)) / n


def mean_row_kl_to_uniform(attn: Tensor, scratch: Tensor | None = None) -> Tensor:
    """[B, H]: mean over queries of KL(Ã_q ‖ uniform) = (1/N) Σ_qk Ã_qk log(N·Ã_qk) = log N − entropy.

    Working with log(N·Ã) rather than log Ã keeps every term near 0 for near-uniform attention, so
    the float32 sums do not lose the small differences that NMI is made of (about 50× smaller error
    than log Ã at N = 196). log is taken of max(N·Ã, 1e-38) in one buffer (0·log 0 = 0) and
    contracted with Ã by ``vecdot``, cheaper than xlogy followed by a sum (and 2.5x faster than a
    batched matrix product of [1, N²] by [N², 1] on a CPU). ``scratch``: a contiguous buffer of at least Ã's
    size to hold the logs (reused by a reducer from chunk to chunk).
    """
    b, heads, n, _ = attn.shape
    probs = as_reduction(attn).reshape(b, heads, n * n)
    logs = torch.mul(probs, float(n), out=_scratch(scratch, probs.shape, probs.dtype, probs.device))
    logs.clamp_min_(TINY if probs.dtype == torch.float32 else 1e-300).log_()
    return torch.linalg.vecdot(probs, logs) / n  # [B, H]


def key_marginal(attn: Tensor) -> Tensor:
    """p(k) = (1/N) Σ_q Ã_qk, [B, H, N], as a matrix-vector product (faster than a column mean)."""
    b, heads, n, _ = attn.shape
    probs = as_reduction(attn).reshape(b * heads, n, n)
    ones = torch.full((b * heads, 1, n), 1.0 / n, dtype=probs.dtype, device=probs.device)
    return torch.bmm(ones, probs).reshape(b, heads, n)


def entropy_from_parts(row_kl: Tensor, num_keys: int) -> Tensor:
    """Mean row entropy [B, H] from :func:`mean_row_kl_to_uniform`: log N − KL."""
    return math.log(num_keys) - row_kl


def nmi_from_parts(row_kl: Tensor, marginal: Tensor) -> Tensor:
    """NMI from the mean row KL to uniform [B, H] and the key marginal p(k) [B, H, N].

    With p(q) = 1/N and E the mean row entropy:
        I = Σ_qk p(q) Ã_qk log(Ã_qk / p(k)) = (1/N) Σ_qk Ã_qk log Ã_qk − Σ_k p(k) log p(k) = H(k) − E.
    Adding and subtracting log N (Σ_qk Ã_qk / N = Σ_k p(k) = 1):
        I = (1/N) Σ_qk Ã_qk log(N·Ã_qk) − Σ_k p(k) log(N·p(k)) = row KL − KL(p ‖ uniform),
        H(k) = log N − KL(p ‖ uniform),   NMI = I / sqrt(log N · H(k)).
    When log N or H(k) is 0, I is 0 and NMI is 0. Clamped to [0, 1] against float rounding.
    """
    n = marginal.shape[-1]
    key_kl = torch.xlogy(marginal, marginal * n).sum(dim=-1)
    mutual_information = row_kl - key_kl
    denominator = torch.sqrt((math.log(n) - key_kl).clamp_min(0) * math.log(n))
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    nmi = torch.where(denominator > 0, mutual_information / safe, torch.zeros_like(denominator))
    return nmi.clamp(0.0, 1.0)


def attention_nmi(attn: Tensor) -> Tensor:
    """Normalised mutual information between query and key, [B, H], with p(q) = 1/N (docs/metrics.md)."""
    check_attention(attn)
    return nmi_from_parts(mean_row_kl_to_uniform(attn), key_marginal(attn))


def attention_entropy(attn: Tensor) -> Tensor:
    """Mean over queries of the row entropy −Σ_k Ã_qk log Ã_qk, [B, H] (nats)."""
    check_attention(attn)
    return entropy_from_parts(mean_row_kl_to_uniform(attn), attn.shape[-1])
