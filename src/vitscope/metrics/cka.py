"""Centered kernel alignment (CKA) of two sets of features of the same examples: pure functions.

Linear CKA (Kornblith et al. 2019) compares features X [n, d1] and Y [n, d2] of the same n examples:
CKA = HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L)) with Gram matrices K = XXᵀ, L = YYᵀ; RBF CKA uses
Gaussian-kernel Gram matrices. The unbiased HSIC₁ (Song et al. 2012) is ⟨U(K), U(L)⟩ / (n(n − 3)),
where U is the "U-centring" of a Gram matrix (:func:`unbiased_centre`); the streaming minibatch CKA
built on it lives in :mod:`vitscope.analyses.cka`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "Kernel",
    "KERNELS",
    "check_kernel",
    "as_2d",
    "gram_linear",
    "gram_rbf",
    "grams",
    "unbiased_centre",
    "hsic1",
    "linear_cka",
    "rbf_cka",
    "cka",
]

Kernel = Literal["linear", "rbf"]
KERNELS = ("linear", "rbf")


def check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, not {kernel!r}")


# ---------------------------------------------------------------------------------- Gram matrices
def gram_linear(x: Tensor) -> Tensor:
    """Linear-kernel Gram matrices: x [..., n, d] -> [..., n, n]. Features are centred first
    (CKA is invariant to it; it only helps the numerics)."""
    x = x - x.mean(dim=-2, keepdim=True)
    return x @ x.transpose(-1, -2)


def gram_rbf(x: Tensor, threshold: float = 1.0) -> Tensor:
    """RBF-kernel Gram matrices: x [..., n, d] -> [..., n, n].

    Bandwidth as Kornblith et al.: σ² = threshold² · median of the squared distances (over the whole
    n × n matrix, diagonal included), per matrix.
    """
    x = x - x.mean(dim=-2, keepdim=True)
    dots = x @ x.transpose(-1, -2)
    sq_norms = dots.diagonal(dim1=-2, dim2=-1)
    sq_dist = (sq_norms.unsqueeze(-1) + sq_norms.unsqueeze(-2) - 2 * dots).clamp_min(0)
    median = torch.quantile(sq_dist.flatten(-2), 0.5, dim=-1).clamp_min(torch.finfo(x.dtype).tiny)  # as np.median
    return torch.exp(-sq_dist / (2 * threshold**2 * median[..., None, None]))


def grams(x: Tensor, kernel: Kernel, threshold: float) -> Tensor:
    return gram_linear(x) if kernel == "linear" else gram_rbf(x, threshold)


def unbiased_centre(gram: Tensor) -> Tensor:
    """U-centring of Gram matrices [..., n, n] (n ≥ 4): ⟨U(K), U(L)⟩ / (n(n − 3)) is HSIC₁(K, L).

    U(K)_ij = K̃_ij − r_i/(n−2) − r_j/(n−2) + S/((n−1)(n−2)) for i ≠ j and 0 on the diagonal, where K̃
    is K with its diagonal zeroed, r its row sums and S its total.
    """
    n = gram.shape[-1]
    if n < 4:
        raise ValueError(f"unbiased HSIC needs at least 4 examples per batch, got {n}")
    eye = torch.eye(n, dtype=torch.bool, device=gram.device)
    k = gram.masked_fill(eye, 0)
    rows = k.sum(dim=-1) / (n - 2)  # r_i / (n - 2)
    total = rows.sum(dim=-1, keepdim=True) / (2 * (n - 1))  # S / (2 (n-1)(n-2)), added once per side
    shift = rows - total
    centred = k - shift.unsqueeze(-1) - shift.unsqueeze(-2)
    return centred.masked_fill(eye, 0)


def hsic1(k: Tensor, l: Tensor) -> Tensor:
    """Unbiased HSIC₁ (Song et al. 2012) of Gram matrices [..., n, n] via U-centring."""
    n = k.shape[-1]
    return (unbiased_centre(k) * unbiased_centre(l)).sum(dim=(-2, -1)) / (n * (n - 3))


# ------------------------------------------------------------------------------------ full batch
def as_2d(name: str, x: Tensor) -> Tensor:
    if x.ndim < 2:
        raise ValueError(f"{name} must be [n, d] (or [n, ...], flattened), got shape {tuple(x.shape)}")
    return x.flatten(1)


def _check_pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    x, y = as_2d("x", x), as_2d("y", y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same examples: {x.shape[0]} vs {y.shape[0]} rows")
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float64)
    return x.to(dtype), y.to(dtype)


def linear_cka(x: Tensor, y: Tensor, *, unbiased: bool = False) -> Tensor:
    """Linear CKA of x [n, d1] and y [n, d2] (same n examples), a scalar tensor (float64).

    Biased (Kornblith et al.) by default: ‖YcᵀXc‖²_F / (‖XcᵀXc‖_F ‖YcᵀYc‖_F) with column-centred
    features, computed in feature space or via n × n Gram matrices, whichever is cheaper.
    ``unbiased=True`` uses HSIC₁ (n ≥ 4), the single-batch form of :class:`CKAAccumulator`.
    """
    x, y = _check_pair(x, y)
    if unbiased:
        return cka(x, y, kernel="linear", unbiased=True)
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    n, d = x.shape[0], x.shape[1] + y.shape[1]
    if d < n:  # feature space: d × d products
        cross = (y.T @ x).square().sum()
        return cross / ((x.T @ x).norm() * (y.T @ y).norm())
    k, l = x @ x.T, y @ y.T
    return (k * l).sum() / (k.norm() * l.norm())


def rbf_cka(x: Tensor, y: Tensor, *, threshold: float = 1.0, unbiased: bool = False) -> Tensor:
    """RBF-kernel CKA (bandwidth ``threshold`` × median distance). Builds n × n matrices: small n only."""
    return cka(x, y, kernel="rbf", threshold=threshold, unbiased=unbiased)


def cka(x: Tensor, y: Tensor, *, kernel: Kernel = "linear", threshold: float = 1.0, unbiased: bool = False) -> Tensor:
    """CKA from n × n Gram matrices with either kernel; biased (centring matrix H) or HSIC₁."""
    check_kernel(kernel)
    x, y = _check_pair(x, y)
    k, l = grams(x, kernel, threshold), grams(y, kernel, threshold)
    if unbiased:
        k, l = unbiased_centre(k), unbiased_centre(l)
    else:
        k, l = _double_centre(k), _double_centre(l)
    return (k * l).sum() / (k.norm() * l.norm())


def _double_centre(gram: Tensor) -> Tensor:
    """HKH with H = I − 11ᵀ/n."""
    gram = gram - gram.mean(dim=0, keepdim=True)
    return gram - gram.mean(dim=1, keepdim=True)
