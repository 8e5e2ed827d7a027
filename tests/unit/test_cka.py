"""CKA: full-batch and minibatch estimates against plain float64 numpy written here, invariances, reducers."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from tests.support.models import tiny_vit
from vitscope.analyses import run_reducers
from vitscope.analyses.cka import CKAAccumulator, CKAReducer, CrossModelCKA, cross_model_cka
from vitscope.analyses.features import pooled_features as example_features
from vitscope.capture import FeatureCapture, ViTCapture
from vitscope.data import Batch
from vitscope.metrics.cka import cka, hsic1, linear_cka, rbf_cka


# ------------------------------------------------------------------------------ numpy references
def np_centre(k: np.ndarray) -> np.ndarray:
    n = len(k)
    h = np.eye(n) - np.ones((n, n)) / n
    return h @ k @ h


def np_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al.: HSIC with H K H, linear kernel."""
    k, l = np_centre(x @ x.T), np_centre(y @ y.T)
    return float(np.sum(k * l) / np.sqrt(np.sum(k * k) * np.sum(l * l)))


def np_rbf_gram(x: np.ndarray, threshold: float) -> np.ndarray:
    sq = np.array([[np.sum((a - b) ** 2) for b in x] for a in x])
    return np.exp(-sq / (2 * threshold**2 * np.median(sq)))


def np_hsic1(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (2012), eq. 5, written out with explicit loops for the diagonal."""
    n = len(k)
    kt, lt = k.copy(), l.copy()
    for i in range(n):
        kt[i, i] = 0.0
        lt[i, i] = 0.0
    ones = np.ones(n)
    term1 = np.trace(kt @ lt)
    term2 = (ones @ kt @ ones) * (ones @ lt @ ones) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (ones @ kt @ lt @ ones)
    return float((term1 + term2 - term3) / (n * (n - 3)))


def np_minibatch_cka(xs: list[np.ndarray], ys: list[np.ndarray], batch: int) -> np.ndarray:
    """Nguyen et al.: mean over minibatches of HSIC₁, loops over batches and layer pairs."""
    n = len(xs[0])
    out = np.zeros((len(xs), len(ys)))
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            xy, xx, yy = [], [], []
            for start in range(0, n, batch):
                k = x[start : start + batch] @ x[start : start + batch].T
                l = y[start : start + batch] @ y[start : start + batch].T
                xy.append(np_hsic1(k, l))
                xx.append(np_hsic1(k, k))
                yy.append(np_hsic1(l, l))
            out[i, j] = np.mean(xy) / np.sqrt(np.mean(xx) * np.mean(yy))
    return out


def related_features(n: int, dims: list[int], seed: int) -> list[np.ndarray]:
    """Layers that share a latent factor to different degrees (CKA well inside (0, 1))."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 6))
    return [
        latent @ rng.normal(size=(6, d)) * (i + 1) + rng.normal(size=(n, d)) * (0.5 + i) + 3.0
        for i, d in enumerate(dims)
    ]


def random_orthogonal(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


# ------------------------------------------------------------------------------------ full batch
@pytest.mark.parametrize("n, d1, d2", [(40, 5, 7), (12, 30, 50)])  # feature-space and Gram branch
def test_linear_cka_equals_numpy(n, d1, d2):
    x, y = related_features(n, [d1, d2], seed=n)
    value = linear_cka(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))
    assert value.ndim == 0
    assert value.item() == pytest.approx(np_linear_cka(x, y), rel=1e-5)
    assert 0.05 < value.item() < 0.99


def test_rbf_and_unbiased_cka_equal_numpy():
    x, y = related_features(20, [4, 9], seed=3)
    kx, ky = np_rbf_gram(x, 0.8), np_rbf_gram(y, 0.8)
    expected = np.sum(np_centre(kx) * np_centre(ky)) / np.sqrt(np.sum(np_centre(kx) ** 2) * np.sum(np_centre(ky) ** 2))
    assert rbf_cka(torch.tensor(x), torch.tensor(y), threshold=0.8).item() == pytest.approx(expected, rel=1e-9)
    lx, ly = x @ x.T, y @ y.T
    unbiased = np_hsic1(lx, ly) / np.sqrt(np_hsic1(lx, lx) * np_hsic1(ly, ly))
    assert linear_cka(torch.tensor(x), torch.tensor(y), unbiased=True).item() == pytest.approx(unbiased, rel=1e-9)
    assert hsic1(torch.tensor(lx), torch.tensor(ly)).item() == pytest.approx(np_hsic1(lx, ly), rel=1e-9)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_cka_with_itself_is_one(kernel):
    (x,) = related_features(16, [8], seed=1)
    assert cka(torch.tensor(x), torch.tensor(x), kernel=kernel).item() == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(torch.tensor(x), torch.tensor(x)).item() == pytest.approx(1.0, abs=1e-12)


def test_linear_cka_invariant_to_orthogonal_maps_and_isotropic_scaling():
    x, y = related_features(30, [10, 6], seed=5)
    base = np_linear_cka(x, y)
    qx, qy = random_orthogonal(10, 1), random_orthogonal(6, 2)
    for xa, ya in ((x @ qx, y), (x, y @ qy), (7.5 * x, y), (x, 0.01 * y), (3 * x @ qx, 0.2 * y @ qy)):
        assert linear_cka(torch.tensor(xa), torch.tensor(ya)).item() == pytest.approx(base, rel=1e-9)
    # but not to a non-isotropic scaling (the test can fail)
    stretched = x * np.linspace(0.1, 10, 10)
    assert abs(linear_cka(torch.tensor(stretched), torch.tensor(y)).item() - base) > 1e-3


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="same examples"):
        linear_cka(torch.randn(5, 3), torch.randn(6, 3))
    with pytest.raises(ValueError, match="kernel"):
        cka(torch.randn(5, 3), torch.randn(5, 3), kernel="poly")


# ------------------------------------------------------------------------------------ minibatch
def test_minibatch_accumulator_equals_numpy_loops():
    n, batch = 60, 16  # last batch holds 12 examples: per-batch HSIC₁ is still averaged per batch
    xs = related_features(n, [5, 8, 3], seed=10)
    ys = related_features(n, [4, 9], seed=11)
    acc = CKAAccumulator()
    for start in range(0, n, batch):
        acc.update(
            [torch.tensor(x[start : start + batch], dtype=torch.float32) for x in xs],
            [torch.tensor(y[start : start + batch], dtype=torch.float32) for y in ys],
        )
    expected = np_minibatch_cka(xs, ys, batch)
    np.testing.assert_allclose(acc.matrix().numpy(), expected, rtol=1e-5)
    assert acc.num_batches == 4 and acc.num_examples == n
    assert acc.matrix().shape == (3, 2)
    # it really accumulates: the first batch alone gives a different answer
    first = CKAAccumulator()
    first.update([torch.tensor(x[:batch]) for x in xs], [torch.tensor(y[:batch]) for y in ys])
    assert np.abs(first.matrix().numpy() - expected).max() > 1e-3


def test_stacked_tensor_input_equals_list_and_self_matrix_is_symmetric():
    xs = related_features(40, [6, 6, 6], seed=4)
    a_list, a_stack = CKAAccumulator(), CKAAccumulator()
    for start in range(0, 40, 10):
        chunk = [torch.tensor(x[start : start + 10]) for x in xs]
        a_list.update(chunk)
        a_stack.update(torch.stack(chunk))
    m = a_list.matrix()
    torch.testing.assert_close(m, a_stack.matrix())
    torch.testing.assert_close(m, m.T)
    torch.testing.assert_close(m.diagonal(), torch.ones(3, dtype=torch.float64))
    np.testing.assert_allclose(m.numpy(), np_minibatch_cka(xs, xs, 10), rtol=1e-8)


def test_minibatch_cka_invariances():
    x, y = related_features(48, [7, 5], seed=8)
    q = random_orthogonal(7, 3)

    def run(xa, ya):
        acc = CKAAccumulator()
        for start in range(0, 48, 12):
            acc.update([torch.tensor(xa[start : start + 12])], [torch.tensor(ya[start : start + 12])])
        return acc.matrix().item()

    base = run(x, y)
    assert run(x @ q, y) == pytest.approx(base, rel=1e-9)
    assert run(x, 40.0 * y) == pytest.approx(base, rel=1e-9)
    assert run(x, x) == pytest.approx(1.0, abs=1e-12)


def test_small_batches_are_skipped_with_a_warning():
    acc = CKAAccumulator()
    with pytest.warns(UserWarning, match="at least 4"):
        acc.update([torch.randn(3, 5)])
    assert acc.skipped_batches == 1 and acc.num_batches == 0
    with pytest.raises(RuntimeError, match="no batch"):
        acc.matrix()


def test_rbf_accumulator_single_batch_equals_unbiased_rbf_cka():
    x, y = related_features(24, [5, 6], seed=2)
    acc = CKAAccumulator("rbf", rbf_threshold=0.5)
    acc.update([torch.tensor(x)], [torch.tensor(y)])
    kx, ky = np_rbf_gram(x, 0.5), np_rbf_gram(y, 0.5)
    expected = np_hsic1(kx, ky) / np.sqrt(np_hsic1(kx, kx) * np_hsic1(ky, ky))
    assert acc.matrix().item() == pytest.approx(expected, rel=1e-8)


# ------------------------------------------------------------------------------------ on models
def batches_of(images: torch.Tensor, size: int) -> list[Batch]:
    labels = torch.arange(len(images)) % 3
    return [Batch(images[i : i + size], labels[i : i + size]) for i in range(0, len(images), size)]


def test_within_model_reducer_full_batch_is_symmetric_with_unit_diagonal_and_matches_numpy():
    model = tiny_vit(depth=3)
    torch.manual_seed(1)
    images = torch.randn(24, 3, 32, 32)
    reducer = CKAReducer()
    run_reducers(ViTCapture(model, attention=False), batches_of(images, 24), [reducer], progress=None)
    m = reducer.matrix()
    assert reducer.depths == [0, 1, 2, 3]
    torch.testing.assert_close(m, m.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(m.diagonal(), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)
    feats = [example_features(layer).double().numpy() for layer in ViTCapture(model).collect(images)]
    np.testing.assert_allclose(m.numpy(), np_minibatch_cka(feats, feats, 24), rtol=1e-6)
    rows = reducer.rows("vit")
    assert len(rows) == 16
    row = next(r for r in rows if r["layer"] == 1 and r["other_layer"] == 3)
    assert row["metric"] == "cka" and row["other_model"] == "vit" and row["n"] == 24
    assert row["value"] == pytest.approx(m[1, 3].item())


def test_cross_model_vit_against_resnet_equals_numpy_over_batches():
    vit = tiny_vit(depth=2)
    torch.manual_seed(0)
    resnet = timm.create_model("resnet10t", pretrained=False, num_classes=0).eval()
    images = torch.randn(30, 3, 32, 32)
    capture_a, capture_b = ViTCapture(vit, attention=False, branches=False), FeatureCapture(resnet)
    pair = cross_model_cka(capture_a, capture_b, batches_of(images, 10), name_a="vit", name_b="resnet", progress=None)
    feats_a = [example_features(l).double().numpy() for l in capture_a.collect(images)]
    feats_b = [example_features(l).double().numpy() for l in capture_b.collect(images)]
    expected = np_minibatch_cka(feats_a, feats_b, 10)
    m = pair.matrix()
    stages = capture_b.facts.num_layers  # stem + 4 stages for a timm ResNet
    assert m.shape == (3, stages) and len(feats_b) == stages
    np.testing.assert_allclose(m.numpy(), expected, rtol=1e-5)
    rows = pair.side_a.rows("vit")
    assert pair.side_b.rows("resnet") == []
    assert {(r["layer"], r["other_layer"]) for r in rows} == {(i, j) for i in range(3) for j in range(1, stages + 1)}
    assert all(r["other_model"] == "resnet" for r in rows)


def test_cross_model_sides_must_alternate_and_see_the_same_batch():
    images, labels = torch.randn(6, 3, 32, 32), torch.arange(6)
    capture = ViTCapture(tiny_vit(), attention=False)

    def feed(side, labels):
        side.begin_batch(images, labels)
        capture.run(images, side.update)
        side.end_batch()

    pair = CrossModelCKA("a", "b")
    feed(pair.side_a, labels)
    with pytest.raises(RuntimeError, match="two batches"):
        feed(pair.side_a, labels)
    pair = CrossModelCKA("a", "b")
    feed(pair.side_a, labels)
    with pytest.raises(RuntimeError, match="different batches"):
        feed(pair.side_b, labels.flip(0))
