"""The metric functions against hand-computed cases and a plain float64 numpy reading of docs/metrics.md."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import vitscope.capture
from vitscope.metrics import (
    attention_distance,
    attention_entropy,
    attention_nmi,
    depth_cosine_similarity,
    distance_matrix,
    effective_rank,
    fourier_delta_log_amplitude,
    head_cosine_similarity,
    residual_ratio,
    singular_values,
    spatial_attention,
    spatial_attention_for_reduction,
    token_cosine_similarity,
)


# ------------------------------------------------------------ plain numpy references (the definitions, with loops)
def np_distance(attn: np.ndarray, grid: tuple[int, int], patch: tuple[int, int]) -> np.ndarray:
    b, heads, n, _ = attn.shape
    _h, w = grid
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            dr, dc = i // w - j // w, i % w - j % w
            dist[i, j] = math.sqrt((dr * patch[0]) ** 2 + (dc * patch[1]) ** 2)
    out = np.zeros((b, heads))
    for bi in range(b):
        for hi in range(heads):
            out[bi, hi] = (attn[bi, hi] * dist).sum() / n
    return out


def xlogx(x: float) -> float:
    return 0.0 if x == 0 else x * math.log(x)


def np_nmi(attn: np.ndarray) -> np.ndarray:
    b, heads, n, _ = attn.shape
    out = np.zeros((b, heads))
    for bi in range(b):
        for hi in range(heads):
            a = attn[bi, hi]
            pq = 1.0 / n
            pk = a.sum(axis=0) / n
            mi = 0.0
            for q in range(n):
                for k in range(n):
                    if a[q, k] > 0:
                        mi += pq * a[q, k] * math.log(a[q, k] / pk[k])
            hq = math.log(n)
            hk = -sum(xlogx(p) for p in pk)
            out[bi, hi] = mi / math.sqrt(hq * hk) if hq * hk > 0 else 0.0
    return out


def np_entropy(attn: np.ndarray) -> np.ndarray:
    b, heads, n, _ = attn.shape
    out = np.zeros((b, heads))
    for bi in range(b):
        for hi in range(heads):
            out[bi, hi] = np.mean([-sum(xlogx(x) for x in attn[bi, hi, q]) for q in range(n)])
    return out


def cosine(u: np.ndarray, v: np.ndarray) -> float:
    return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))


def np_token_cosine(tokens: np.ndarray) -> np.ndarray:
    b, n, _ = tokens.shape
    return np.array(
        [
            np.mean([cosine(tokens[bi, i], tokens[bi, j]) for i in range(n) for j in range(n) if i != j])
            for bi in range(b)
        ]
    )


def np_head_cosine(heads: np.ndarray) -> np.ndarray:
    b, h, n, _ = heads.shape
    out = np.zeros(b)
    for bi in range(b):
        per_token = [
            np.mean([cosine(heads[bi, x, t], heads[bi, y, t]) for x in range(h) for y in range(h) if x != y])
            for t in range(n)
        ]
        out[bi] = np.mean(per_token)
    return out


def np_fourier(tokens: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    b, _n, c = tokens.shape
    h, w = grid
    maps = tokens.transpose(0, 2, 1).reshape(b, c, h, w)
    log_amp = np.log(np.abs(np.fft.fft2(maps)) + 1e-6)
    log_amp = np.roll(log_amp, shift=(h // 2, w // 2), axis=(2, 3)).mean(axis=(0, 1))
    length = min(h - h // 2, w - w // 2)
    diagonal = np.array([log_amp[h // 2 + t, w // 2 + t] for t in range(length)])
    return diagonal - diagonal[0]


def random_attention(b: int, heads: int, n: int, seed: int, zeros: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scores = 3 * torch.randn(b, heads, n, n, generator=gen, dtype=torch.float64)
    if zeros:  # some exact zeros, to exercise 0·log 0 = 0
        scores = scores.masked_fill(torch.rand(b, heads, n, n, generator=gen) < 0.3, -math.inf)
        scores[..., 0] = 0.0
    return torch.softmax(scores, dim=-1)


# ------------------------------------------------------------------------------ hand-computed cases
def test_uniform_attention_has_nmi_zero_and_entropy_log_n():
    n = 16
    attn = torch.full((2, 3, n, n), 1.0 / n)
    assert torch.allclose(attention_nmi(attn), torch.zeros(2, 3), atol=1e-6)
    assert torch.allclose(attention_entropy(attn), torch.full((2, 3), math.log(n)), atol=1e-5)


def test_identity_attention_has_distance_zero_nmi_one_entropy_zero():
    n = 9
    attn = torch.eye(n).expand(2, 4, n, n).clone()
    assert torch.equal(attention_distance(attn, (3, 3), 16), torch.zeros(2, 4))
    assert torch.allclose(attention_nmi(attn), torch.ones(2, 4), atol=1e-6)
    assert torch.allclose(attention_entropy(attn), torch.zeros(2, 4), atol=1e-6)


def test_all_queries_on_one_key_has_nmi_zero():
    attn = torch.zeros(1, 1, 4, 4)
    attn[..., 2] = 1.0  # H(k) = 0: no information about the query
    assert attention_nmi(attn).item() == 0.0


def test_two_by_two_grid_distance_by_hand():
    attn = torch.zeros(1, 2, 4, 4)
    attn[0, 0, :, 3] = 1.0  # every query looks at the bottom-right cell
    attn[0, 1] = 0.25  # uniform
    # patch (rows 16 px, cols 8 px): distances to cell 3 are sqrt(16²+8²), 16, 8, 0
    to_corner = (math.hypot(16, 8) + 16 + 8 + 0) / 4
    uniform = 4 * (16 + 8 + math.hypot(16, 8)) / 16  # each cell has one row, one column, one diagonal neighbour
    expected = torch.tensor([[to_corner, uniform]])
    assert torch.allclose(attention_distance(attn, (2, 2), (16, 8)), expected, atol=1e-5)
    d = distance_matrix((2, 2), 16)
    assert torch.allclose(
        d,
        torch.tensor(
            [
                [0, 16, 16, 16 * math.sqrt(2)],
                [16, 0, 16 * math.sqrt(2), 16],
                [16, 16 * math.sqrt(2), 0, 16],
                [16 * math.sqrt(2), 16, 16, 0],
            ]
        ),
    )


def test_distance_matrix_is_cached_per_grid_patch_and_device():
    assert distance_matrix((14, 14), 16) is distance_matrix((14, 14), (16, 16))
    assert distance_matrix((14, 14), 16) is not distance_matrix((14, 14), 8)


def test_identical_tokens_cosine_one_orthogonal_tokens_cosine_zero():
    same = torch.randn(1, 1, 8).expand(2, 5, 8)
    assert torch.allclose(token_cosine_similarity(same), torch.ones(2), atol=1e-6)
    orthogonal = torch.eye(6).unsqueeze(0) * 3.0
    assert torch.allclose(token_cosine_similarity(orthogonal), torch.zeros(1), atol=1e-7)
    heads_same = torch.randn(2, 1, 5, 4).expand(2, 3, 5, 4)
    assert torch.allclose(head_cosine_similarity(heads_same), torch.ones(2), atol=1e-6)
    assert torch.allclose(depth_cosine_similarity(same, 2.5 * same), torch.ones(2), atol=1e-6)
    assert torch.allclose(depth_cosine_similarity(same, -same), -torch.ones(2), atol=1e-6)


def test_rank_one_tokens_have_effective_rank_one():
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(16, generator=gen)
    tokens = torch.randn(4, 9, 1, generator=gen) * direction  # every token a multiple of one direction
    sv = singular_values(tokens, images_per_group=2)
    assert sv.shape == (2, 16)
    assert torch.allclose(effective_rank(sv), torch.ones(2), atol=1e-4)
    # k equal singular values give effective rank k
    assert torch.allclose(effective_rank(torch.tensor([[2.0, 2.0, 2.0, 0.0]])), torch.tensor([3.0]))


def test_noise_has_higher_high_frequency_amplitude_than_blurred_noise():
    gen = torch.Generator().manual_seed(0)
    h = w = 16
    noise = torch.randn(4, 8, h, w, generator=gen)  # [B, C, h, w]
    kernel = torch.ones(8, 1, 3, 3) / 9.0
    blurred = torch.nn.functional.conv2d(
        torch.nn.functional.pad(noise, (1, 1, 1, 1), mode="circular"), kernel, groups=8
    )
    as_tokens = lambda maps: maps.flatten(2).transpose(1, 2)  # noqa: E731 [B, h·w, C]
    high_noise = fourier_delta_log_amplitude(as_tokens(noise), (h, w))
    high_blurred = fourier_delta_log_amplitude(as_tokens(blurred), (h, w))
    assert high_noise.shape == (h - h // 2,)
    assert high_noise[0] == 0 and high_blurred[0] == 0
    assert high_noise[-1] > high_blurred[-1] + 1.0  # a 3×3 box filter removes most of the top frequency


def test_residual_ratio_by_hand():
    stream = torch.zeros(2, 3, 4)
    stream[0, 0, 0], stream[1] = 6.0, 1.0  # norms 6 and sqrt(12)
    branch = torch.zeros(2, 3, 4)
    branch[0, 1, 1], branch[1, 2] = 2.0, 0.5  # norms 2 and 1
    assert torch.allclose(residual_ratio(stream, branch), torch.tensor([3.0, math.sqrt(12)]))


# ------------------------------------------------------------------------- random cases vs numpy
@pytest.mark.parametrize("grid,patch", [((3, 3), 16), ((2, 4), (8, 4))])
def test_attention_metrics_match_numpy(grid, patch):
    n = grid[0] * grid[1]
    attn = random_attention(2, 3, n, seed=1, zeros=True)
    patch_pair = (patch, patch) if isinstance(patch, int) else patch
    a = attn.numpy()
    for dtype, atol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        x = attn.to(dtype)
        dist = attention_distance(x, grid, patch)
        assert dist.dtype == dtype
        np.testing.assert_allclose(dist.numpy(), np_distance(a, grid, patch_pair), atol=atol * 100, rtol=1e-5)
        np.testing.assert_allclose(attention_nmi(x).numpy(), np_nmi(a), atol=atol)
        np.testing.assert_allclose(attention_entropy(x).numpy(), np_entropy(a), atol=atol)


def test_spatial_attention_renormalises_and_is_capture_s():
    assert spatial_attention is vitscope.capture.spatial_attention
    attn = random_attention(2, 2, 5, seed=2)  # 1 prefix token + 4 spatial
    expected = attn[:, :, 1:, 1:].numpy()
    expected = expected / expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(spatial_attention(attn, 1).numpy(), expected, atol=1e-12)
    reduced = spatial_attention_for_reduction(attn.to(torch.bfloat16), 1)
    assert reduced.dtype == torch.float32 and reduced.is_contiguous()
    np.testing.assert_allclose(reduced.numpy(), expected, atol=1e-2)


def test_token_metrics_match_numpy():
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randn(4, 6, 5, generator=gen, dtype=torch.float64) + 0.5
    other = tokens + 0.7 * torch.randn(4, 6, 5, generator=gen, dtype=torch.float64)
    heads = torch.randn(2, 3, 6, 4, generator=gen, dtype=torch.float64) + 0.3
    t = tokens.numpy()
    np.testing.assert_allclose(token_cosine_similarity(tokens).numpy(), np_token_cosine(t), atol=1e-12)
    np.testing.assert_allclose(token_cosine_similarity(tokens.float()).numpy(), np_token_cosine(t), atol=1e-5)
    np.testing.assert_allclose(head_cosine_similarity(heads).numpy(), np_head_cosine(heads.numpy()), atol=1e-12)
    o = other.numpy()
    expected_depth = [np.mean([cosine(t[b, i], o[b, i]) for i in range(6)]) for b in range(4)]
    np.testing.assert_allclose(depth_cosine_similarity(tokens, other).numpy(), expected_depth, atol=1e-12)
    np.testing.assert_allclose(
        residual_ratio(tokens, other - tokens).numpy(),
        [np.linalg.norm(t[b]) / np.linalg.norm(o[b] - t[b]) for b in range(4)],
        atol=1e-12,
    )


def test_singular_values_and_effective_rank_match_numpy():
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randn(6, 5, 7, generator=gen, dtype=torch.float64)
    sv = singular_values(tokens, images_per_group=3)
    assert sv.shape == (2, 7)
    for g in range(2):
        stacked = tokens[3 * g : 3 * g + 3].reshape(15, 7).numpy()
        expected = np.linalg.svd(stacked, compute_uv=False)
        np.testing.assert_allclose(sv[g].numpy(), expected, atol=1e-10)
        p = expected / expected.sum()
        np.testing.assert_allclose(effective_rank(sv)[g].item(), math.exp(-sum(xlogx(x) for x in p)), atol=1e-10)
    with pytest.raises(ValueError, match="images_per_group"):
        singular_values(tokens[:5], images_per_group=2)


@pytest.mark.parametrize("grid", [(6, 6), (5, 5), (4, 6)])
def test_fourier_matches_numpy_fft(grid):
    gen = torch.Generator().manual_seed(5)
    n = grid[0] * grid[1]
    tokens = torch.randn(3, n, 4, generator=gen, dtype=torch.float64).cumsum(dim=1)  # some low-pass structure
    expected = np_fourier(tokens.numpy(), grid)
    np.testing.assert_allclose(fourier_delta_log_amplitude(tokens, grid).numpy(), expected, atol=1e-9)
    np.testing.assert_allclose(fourier_delta_log_amplitude(tokens.float(), grid).numpy(), expected, atol=1e-4)


def test_low_precision_input_is_reduced_in_float32():
    attn = random_attention(2, 2, 16, seed=6).float()
    tokens = torch.randn(2, 16, 8)
    for dtype in (torch.bfloat16, torch.float16):
        low = attn.to(dtype)
        for fn in (attention_nmi, attention_entropy, lambda a: attention_distance(a, (4, 4), 16)):
            out = fn(low)
            assert out.dtype == torch.float32
            np.testing.assert_allclose(out.numpy(), fn(low.float()).numpy(), rtol=1e-5, atol=1e-5)
        assert token_cosine_similarity(tokens.to(dtype)).dtype == torch.float32
        assert fourier_delta_log_amplitude(tokens.to(dtype), (4, 4)).dtype == torch.float32
        assert singular_values(tokens.to(dtype)).dtype == torch.float32


def test_bad_shapes_name_the_argument():
    with pytest.raises(ValueError, match="grid"):
        attention_distance(torch.full((1, 1, 4, 4), 0.25), (3, 3), 16)
    with pytest.raises(ValueError, match=r"attn must be \[B, H, N, N\]"):
        attention_nmi(torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match="grid"):
        fourier_delta_log_amplitude(torch.randn(1, 10, 3), (3, 3))
    with pytest.raises(ValueError, match="tokens_a and tokens_b"):
        depth_cosine_similarity(torch.randn(1, 4, 3), torch.randn(1, 5, 3))


def test_float32_nmi_keeps_the_small_values_of_near_uniform_attention():
    """Untrained ViTs have NMI ~ 1e-4 at N = 196: float32 must resolve it (no log N cancellation)."""
    gen = torch.Generator().manual_seed(7)
    attn = torch.softmax(0.05 * torch.randn(2, 2, 196, 196, generator=gen, dtype=torch.float64), dim=-1)
    exact = attention_nmi(attn)
    assert 1e-4 < exact.min().item() < 1e-3
    np.testing.assert_allclose(attention_nmi(attn.float()).double().numpy(), exact.numpy(), rtol=1e-3, atol=0)
    np.testing.assert_allclose(
        attention_entropy(attn.float()).double().numpy(), attention_entropy(attn).numpy(), rtol=1e-6
    )
