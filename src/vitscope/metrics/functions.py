"""The papers' metrics as pure tensor functions: torch in, torch out, any float dtype, any device.

Shapes: ``attn`` is spatial attention Ã [B, H, N, N] (prefix tokens removed, rows renormalised:
see :func:`spatial_attention`); ``tokens`` are spatial tokens [B, N, C] in row-major order over
``grid`` = (h, w), h·w = N. Every reduction runs in float32 (float64 when the input is float64),
also for bf16/fp16 input. Definitions are those of SPEC.md ("Definitions"); the derivations used
to turn them into a few passes over [B, H, N, N] are written next to each function.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

from vitscope.capture import spatial_attention

__all__ = [
    "attention_distance",
    "attention_nmi",
    "attention_entropy",
    "token_cosine_similarity",
    "head_cosine_similarity",
    "depth_cosine_similarity",
    "singular_values",
    "effective_rank",
    "fourier_delta_log_amplitude",
    "fourier_log_amplitude_diagonal",
    "residual_ratio",
    "spatial_attention",
    "spatial_attention_for_reduction",
    "distance_matrix",
    "mean_row_kl_to_uniform",
    "key_marginal",
    "entropy_from_parts",
    "nmi_from_parts",
]

_TINY = 1e-38  # below float32's smallest normal: x·log x there is < 1e-36, i.e. 0 for our sums


# --------------------------------------------------------------------------------------- helpers
def reduction_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 input, else float32 (bf16/fp16/float32 are all reduced in float32)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _as_reduction(x: Tensor) -> Tensor:
    return x.to(reduction_dtype(x))


def _pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair (rows, cols), not {value!r}")
    return (int(value[0]), int(value[1]))


def _check_attention(attn: Tensor, name: str = "attn") -> None:
    if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"{name} must be [B, H, N, N], got shape {tuple(attn.shape)}")
    if not attn.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got {attn.dtype}")


def _check_grid(grid: tuple[int, int], num_tokens: int, name: str) -> tuple[int, int]:
    h, w = int(grid[0]), int(grid[1])
    if h * w != num_tokens:
        raise ValueError(f"grid {grid} has {h * w} cells but {name} has {num_tokens} spatial tokens")
    return h, w


def spatial_attention_for_reduction(attn: Tensor, num_prefix_tokens: int) -> Tensor:
    """Ã [B, H, N, N] as a contiguous float32 (float64) tensor, in one pass over the full attention.

    Like :func:`spatial_attention`, but the row sums are taken in the reduction dtype and the
    division promotes, so bf16/fp16 attention is upcast by the same pass that renormalises it.
    """
    _check_attention(attn)
    spatial = attn[..., num_prefix_tokens:, num_prefix_tokens:]
    row_sums = spatial.sum(dim=-1, keepdim=True, dtype=reduction_dtype(attn)).clamp_min_(1e-12)
    return spatial / row_sums


# ------------------------------------------------------------------------------------- attention
@lru_cache(maxsize=32)
def _cached_distance_matrix(h: int, w: int, ph: int, pw: int, device: torch.device,
                            dtype: torch.dtype) -> Tensor:
    rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w) * ph  # [N], row-major grid
    cols = torch.arange(w, dtype=torch.float64).repeat(h) * pw
    distances = torch.hypot(rows[:, None] - rows[None, :], cols[:, None] - cols[None, :])  # [N, N] pixels
    return distances.to(device=device, dtype=dtype)


def distance_matrix(grid: tuple[int, int], patch_size: int | tuple[int, int],
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """D [N, N] in pixels: D_ij = ‖(Δrow·ph, Δcol·pw)‖₂ between grid cells i and j (row-major).

    Cached per (grid, patch size, device, dtype); treat the result as read-only.
    """
    h, w = int(grid[0]), int(grid[1])
    ph, pw = _pair(patch_size, "patch_size")
    return _cached_distance_matrix(h, w, ph, pw, torch.device(device), dtype)


def attention_distance(attn: Tensor, grid: tuple[int, int], patch_size: int | tuple[int, int]) -> Tensor:
    """Mean attention distance in pixels, [B, H]: (1/N) Σ_ij Ã_ij D_ij.

    One matrix-vector product of the flattened maps [B·H, N²] with the flattened D.
    """
    _check_attention(attn)
    b, heads, n, _ = attn.shape
    _check_grid(grid, n, "attn")
    probs = _as_reduction(attn)
    dist = distance_matrix(grid, patch_size, probs.device, probs.dtype)
    return (probs.reshape(b, heads, n * n) @ dist.reshape(n * n)) / n


def mean_row_kl_to_uniform(attn: Tensor) -> Tensor:
    """[B, H]: mean over queries of KL(Ã_q ‖ uniform) = (1/N) Σ_qk Ã_qk log(N·Ã_qk) = log N − entropy.

    Working with log(N·Ã) rather than log Ã keeps every term near 0 for near-uniform attention, so
    the float32 sums do not lose the small differences that NMI is made of (about 50× smaller error
    than log Ã at N = 196). log is taken of max(N·Ã, 1e-38) in one buffer (0·log 0 = 0) and
    contracted with Ã by a batched dot product, cheaper than xlogy followed by a sum.
    """
    b, heads, n, _ = attn.shape
    probs = _as_reduction(attn).reshape(b * heads, 1, n * n)
    logs = torch.mul(probs, float(n))
    logs.clamp_min_(_TINY if probs.dtype == torch.float32 else 1e-300).log_()
    plogp = torch.bmm(probs, logs.reshape(b * heads, n * n, 1))  # [B·H, 1, 1]
    return plogp.reshape(b, heads) / n


def key_marginal(attn: Tensor) -> Tensor:
    """p(k) = (1/N) Σ_q Ã_qk, [B, H, N], as a matrix-vector product (faster than a column mean)."""
    b, heads, n, _ = attn.shape
    probs = _as_reduction(attn).reshape(b * heads, n, n)
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
    """Normalised mutual information between query and key, [B, H] (SPEC: p(q) = 1/N)."""
    _check_attention(attn)
    return nmi_from_parts(mean_row_kl_to_uniform(attn), key_marginal(attn))


def attention_entropy(attn: Tensor) -> Tensor:
    """Mean over queries of the row entropy −Σ_k Ã_qk log Ã_qk, [B, H] (nats)."""
    _check_attention(attn)
    return entropy_from_parts(mean_row_kl_to_uniform(attn), attn.shape[-1])


# ---------------------------------------------------------------------------------------- tokens
def _mean_pairwise_cosine(vectors: Tensor) -> Tensor:
    """[..., M, D] -> [...]: mean cosine over ordered pairs i ≠ j of the M vectors.

    With u_i = v_i / ‖v_i‖ and s = Σ_i u_i:  Σ_{i≠j} u_i·u_j = ‖s‖² − Σ_i ‖u_i‖²  (O(M·D)).
    A zero vector has cosine 0 with everything (it normalises to 0).
    """
    m = vectors.shape[-2]
    if m < 2:
        raise ValueError(f"cosine between distinct vectors needs at least 2, got {m}")
    unit = torch.nn.functional.normalize(_as_reduction(vectors), dim=-1, eps=1e-12)
    total = unit.sum(dim=-2)
    off_diagonal = total.square().sum(dim=-1) - unit.square().sum(dim=(-2, -1))
    return off_diagonal / (m * (m - 1))


def token_cosine_similarity(tokens: Tensor) -> Tensor:
    """[B]: mean cosine similarity between distinct spatial tokens of each image."""
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be [B, N, C], got shape {tuple(tokens.shape)}")
    return _mean_pairwise_cosine(tokens)


def head_cosine_similarity(head_outputs: Tensor) -> Tensor:
    """[B]: per token, mean cosine between the outputs of distinct heads; mean over tokens.

    ``head_outputs`` [B, H, N, D] are the per-head Ã_h·V_h before the output projection.
    """
    if head_outputs.ndim != 4:
        raise ValueError(f"head_outputs must be [B, H, N, D], got shape {tuple(head_outputs.shape)}")
    per_token = _mean_pairwise_cosine(head_outputs.transpose(1, 2))  # [B, N]
    return per_token.mean(dim=-1)


def depth_cosine_similarity(tokens_a: Tensor, tokens_b: Tensor) -> Tensor:
    """[B]: mean over tokens of the cosine between the same token in two layers."""
    if tokens_a.shape != tokens_b.shape or tokens_a.ndim != 3:
        raise ValueError(f"tokens_a and tokens_b must both be [B, N, C], got {tuple(tokens_a.shape)} "
                         f"and {tuple(tokens_b.shape)}")
    cosine = torch.nn.functional.cosine_similarity(_as_reduction(tokens_a), _as_reduction(tokens_b),
                                                   dim=-1, eps=1e-12)
    return cosine.mean(dim=-1)


def singular_values(tokens: Tensor, images_per_group: int = 2) -> Tensor:
    """[G, min(k·N, C)]: singular values (descending) of each group's stacked (k·N) × C tokens.

    Consecutive images form the groups; B must be a multiple of ``images_per_group`` (k).
    """
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be [B, N, C], got shape {tuple(tokens.shape)}")
    b, n, c = tokens.shape
    if images_per_group < 1 or b % images_per_group:
        raise ValueError(f"tokens has {b} images, not a positive multiple of images_per_group={images_per_group}")
    groups = _as_reduction(tokens).reshape(b // images_per_group, images_per_group * n, c)
    return torch.linalg.svdvals(groups)


def effective_rank(singular_values: Tensor) -> Tensor:
    """[...]: exp(entropy(σ / Σσ)) over the last dimension (Roy & Vetterli 2007)."""
    sigma = _as_reduction(singular_values).clamp_min(0)
    p = sigma / sigma.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(sigma.dtype).tiny)
    return torch.exp(-torch.xlogy(p, p).sum(dim=-1))


@lru_cache(maxsize=32)
def _diagonal_dft_basis(h: int, w: int, length: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """[2·length, N]: cos and −sin rows of the 2-D DFT at frequencies (t, t), t = 0..length-1."""
    rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w)
    cols = torch.arange(w, dtype=torch.float64).repeat(h)
    t = torch.arange(length, dtype=torch.float64)[:, None]
    phase = 2 * math.pi * (t * rows[None] / h + t * cols[None] / w)  # [length, N]
    return torch.cat([phase.cos(), -phase.sin()]).to(device=device, dtype=dtype)


def fourier_log_amplitude_diagonal(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """[B, m]: per image, mean over channels of log(|FFT2| + 1e-6) along the shifted main diagonal.

    After rolling by (h//2, w//2) the zero frequency sits at (h//2, w//2); the diagonal from there to
    the end visits the unshifted frequencies (t, t), t = 0..m−1, m = min(h − h//2, w − w//2)
    (= h − h//2 for a square grid). Only those m DFT coefficients are computed, as one matmul with
    a cached cos/sin basis, instead of the full FFT2.
    """
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be [B, N, C], got shape {tuple(tokens.shape)}")
    h, w = _check_grid(grid, tokens.shape[1], "tokens")
    length = min(h - h // 2, w - w // 2)
    x = _as_reduction(tokens)
    basis = _diagonal_dft_basis(h, w, length, x.device, x.dtype)
    coefficients = basis @ x  # [B, 2·length, C]: real parts, then imaginary parts
    amplitude = torch.sqrt(coefficients[:, :length].square() + coefficients[:, length:].square())
    return torch.log(amplitude + 1e-6).mean(dim=-1)


def fourier_delta_log_amplitude(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """[h − h//2]: Δ log amplitude from the zero to the highest diagonal frequency (mean over B, C).

    The last value is the "high-frequency Δ log amplitude"; lower means more low-pass.
    """
    curve = fourier_log_amplitude_diagonal(tokens, grid).mean(dim=0)
    return curve - curve[0]


def residual_ratio(stream: Tensor, branch: Tensor) -> Tensor:
    """[B]: ‖residual stream‖ / ‖branch output‖ per image (Frobenius norms over all tokens and channels)."""
    if stream.shape != branch.shape or stream.ndim < 2:
        raise ValueError(f"stream and branch must have the same [B, ...] shape, got {tuple(stream.shape)} "
                         f"and {tuple(branch.shape)}")
    stream_norm = torch.linalg.vector_norm(_as_reduction(stream).flatten(1), dim=-1)
    branch_norm = torch.linalg.vector_norm(_as_reduction(branch).flatten(1), dim=-1)
    return stream_norm / branch_norm.clamp_min(torch.finfo(stream_norm.dtype).tiny)
