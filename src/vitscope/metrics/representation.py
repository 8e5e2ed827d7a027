"""Representation metrics on spatial tokens [B, N, C] and head outputs (definitions: docs/metrics.md):
token / head / depth cosine similarity, singular values and effective rank, the Fourier Δ log
amplitude, and the residual ratio. Reductions run in float32 (float64 for float64 input).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

from vitscope.metrics.tensors import as_reduction, check_grid

__all__ = [
    "token_cosine_similarity",
    "head_cosine_similarity",
    "depth_cosine_similarity",
    "singular_values",
    "effective_rank",
    "fourier_log_amplitude_diagonal",
    "fourier_delta_log_amplitude",
    "residual_ratio",
]


def _mean_pairwise_cosine(vectors: Tensor) -> Tensor:
    """[..., M, D] -> [...]: mean cosine over ordered pairs i ≠ j of the M vectors.

    With u_i = v_i / ‖v_i‖ and s = Σ_i u_i:  Σ_{i≠j} u_i·u_j = ‖s‖² − Σ_i ‖u_i‖²  (O(M·D)).
    A zero vector has cosine 0 with everything (it normalises to 0).
    """
    m = vectors.shape[-2]
    if m < 2:
        raise ValueError(f"cosine between distinct vectors needs at least 2, got {m}")
    x = as_reduction(vectors)
    norms = torch.linalg.vector_norm(x, dim=-1)  # [..., M]
    inverse = torch.where(norms > 1e-12, 1.0 / norms.clamp_min(1e-12), torch.zeros_like(norms))
    total = (inverse.unsqueeze(-2) @ x).squeeze(-2)  # s = Σ_i v_i / ‖v_i‖, without forming the u_i: [..., D]
    off_diagonal = total.square().sum(dim=-1) - (norms * inverse).square().sum(dim=-1)
    return off_diagonal / (m * (m - 1))


def token_cosine_similarity(tokens: Tensor) -> Tensor:
    """[B]: mean cosine similarity between distinct spatial tokens of each image."""
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be [B, N, C], got shape {tuple(tokens.shape)}")
    return _mean_pairwise_cosine(tokens)


def head_cosine_similarity(head_outputs: Tensor) -> Tensor:
    """[B]: per token, mean cosine between the outputs of distinct heads; mean over tokens.

    ``head_outputs`` [B, H, N, D] are what each head outputs at the N spatial query positions, before
    the output projection: A_h·V_h with the model's own attention over all keys (prefix tokens
    included), i.e. what the heads actually contribute (:attr:`LayerOutput.spatial_head_outputs`).
    """
    if head_outputs.ndim != 4:
        raise ValueError(f"head_outputs must be [B, H, N, D], got shape {tuple(head_outputs.shape)}")
    per_token = _mean_pairwise_cosine(head_outputs.transpose(1, 2))  # [B, N]
    return per_token.mean(dim=-1)


def depth_cosine_similarity(tokens_a: Tensor, tokens_b: Tensor) -> Tensor:
    """[B]: mean over tokens of the cosine between the same token in two layers."""
    if tokens_a.shape != tokens_b.shape or tokens_a.ndim != 3:
        raise ValueError(
            f"tokens_a and tokens_b must both be [B, N, C], got {tuple(tokens_a.shape)} and {tuple(tokens_b.shape)}"
        )
    cosine = torch.nn.functional.cosine_similarity(as_reduction(tokens_a), as_reduction(tokens_b), dim=-1, eps=1e-12)
    return cosine.mean(dim=-1)


def singular_values(tokens: Tensor, images_per_group: int = 2) -> Tensor:
    """[G, min(k·N, C)]: singular values (descending) of each group's stacked (k·N) × C tokens.

    Consecutive images form the groups; B must be a multiple of ``images_per_group`` (k). Computed as the
    square roots of the eigenvalues of the smaller Gram matrix (XXᵀ or XᵀX) in float64: twice as fast as
    an SVD of the float32 tokens and closer to the exact values (errors ~1e-15 of the largest).
    """
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be [B, N, C], got shape {tuple(tokens.shape)}")
    b, n, c = tokens.shape
    if images_per_group < 1 or b % images_per_group:
        raise ValueError(f"tokens has {b} images, not a positive multiple of images_per_group={images_per_group}")
    groups = tokens.to(torch.float64).reshape(b // images_per_group, images_per_group * n, c)
    gram = groups @ groups.mT if images_per_group * n <= c else groups.mT @ groups
    values = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(-1)
    return values if tokens.dtype == torch.float64 else values.to(torch.float32)


def effective_rank(singular_values: Tensor) -> Tensor:
    """[...]: exp(entropy(σ / Σσ)) over the last dimension (Roy & Vetterli 2007)."""
    sigma = as_reduction(singular_values).clamp_min(0)
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
    h, w = check_grid(grid, tokens.shape[1], "tokens")
    length = min(h - h // 2, w - w // 2)
    x = as_reduction(tokens)
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
        raise ValueError(
            f"stream and branch must have the same [B, ...] shape, got {tuple(stream.shape)} and {tuple(branch.shape)}"
        )
    stream_norm = torch.linalg.vector_norm(as_reduction(stream).flatten(1), dim=-1)
    branch_norm = torch.linalg.vector_norm(as_reduction(branch).flatten(1), dim=-1)
    return stream_norm / branch_norm.clamp_min(torch.finfo(stream_norm.dtype).tiny)
