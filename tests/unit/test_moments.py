"""Streaming metrics: batches of unequal size give the whole set's means and standard errors."""

from __future__ import annotations

import gc
import math
import weakref

import numpy as np
import pytest
import timm
import torch

from tests.support.models import tiny_vit
from vitscope import metrics as F
from vitscope.analyses import ALL_METRICS, Reducer, RunningMoments, analyze_model, metric_reducers, run_reducers
from vitscope.capture import ViTCapture
from vitscope.data import Batch
from vitscope.results import Results

NUM_IMAGES = 7


def batches(images: torch.Tensor, sizes: list[int]) -> list[Batch]:
    out, start = [], 0
    for size in sizes:
        out.append(Batch(images[start : start + size], torch.arange(start, start + size)))
        start += size
    assert start == len(images)
    return out


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_vit()  # 32 px, patch 8 (4×4 grid), dim 32, 2 blocks, 4 heads, CLS token


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(NUM_IMAGES, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def whole_set_values(model: torch.nn.Module, images: torch.Tensor) -> dict[tuple[str, int, int | None], np.ndarray]:
    """Per-image values of every scalar metric, from one forward pass over all images at once."""
    layers = ViTCapture(model).collect(images)
    values: dict[tuple[str, int, int | None], np.ndarray] = {}

    def put(metric: str, depth: int, per_image: torch.Tensor) -> None:
        per_image = per_image.double()
        if per_image.ndim == 2:  # per head
            for head in range(per_image.shape[1]):
                values[(metric, depth, head)] = per_image[:, head].numpy()
            per_image = per_image.mean(dim=1)
        values[(metric, depth, None)] = per_image.numpy()

    for layer in layers:
        tokens, d = layer.spatial_tokens, layer.depth
        put("token_cosine", d, F.token_cosine_similarity(tokens))
        put("fourier_high", d, F.fourier_log_amplitude_diagonal(tokens, layer.grid).diff(dim=1).sum(dim=1))
        if d == 0:
            continue
        attn = layer.spatial_attn
        put("attention_distance", d, F.attention_distance(attn, layer.grid, layer.patch_size))
        put("nmi", d, F.attention_nmi(attn))
        put("attention_entropy", d, F.attention_entropy(attn))
        put("head_cosine", d, F.head_cosine_similarity(layer.spatial_head_outputs))
        put("depth_cosine", d, F.depth_cosine_similarity(layers[d - 1].spatial_tokens, tokens))
        put("residual_ratio_attn", d, F.residual_ratio(layer.stream_in, layer.attn_branch))
        put("residual_ratio_mlp", d, F.residual_ratio(layer.stream_mid(), layer.mlp_branch))
    return values


def row_map(results: Results) -> dict[tuple, dict]:
    return {(r["metric"], r["layer"], r["head"], r.get("freq"), r.get("index")): r for r in results.rows}


@pytest.mark.parametrize("chunk_bytes", [None, 2 * 4 * 16 * 16 * 4, 1], ids=["one-chunk", "2-images", "1-image"])
def test_streamed_means_and_stderr_equal_whole_set(model, images, chunk_bytes, monkeypatch):
    if chunk_bytes is not None:  # the attention reduced a few images at a time (4 heads × 16² × float32 per image)
        monkeypatch.setattr("vitscope.metrics.attention.REDUCTION_CHUNK_BYTES", chunk_bytes)
    streamed = analyze_model(model, batches(images, [3, 1, 3]), label="vit", progress=None, spectrum_groups=None)
    rows = row_map(streamed)
    expected = whole_set_values(model, images)
    for (metric, layer, head), per_image in expected.items():
        row = rows[(metric, layer, head, None, None)]
        assert row["n"] == NUM_IMAGES
        assert row["value"] == pytest.approx(per_image.mean(), rel=1e-5, abs=1e-6), (metric, layer, head)
        stderr = per_image.std(ddof=1) / math.sqrt(NUM_IMAGES)
        assert row["stderr"] == pytest.approx(stderr, rel=1e-3, abs=1e-7), (metric, layer, head)


def test_unequal_batches_equal_one_batch_for_every_row(model, images):
    one = row_map(
        analyze_model(
            model,
            [Batch(images, torch.zeros(NUM_IMAGES, dtype=torch.long))],
            label="m",
            progress=None,
            spectrum_groups=None,
        )
    )
    many = row_map(analyze_model(model, batches(images, [2, 3, 1, 1]), label="m", progress=None, spectrum_groups=None))
    assert one.keys() == many.keys()
    for key, row in one.items():
        assert many[key]["n"] == row["n"], key
        assert many[key]["value"] == pytest.approx(row["value"], rel=1e-5, abs=1e-6), key
        if row["stderr"] is not None:
            assert many[key]["stderr"] == pytest.approx(row["stderr"], rel=1e-3, abs=1e-6), key


def test_rows_cover_every_metric_layer_and_head(model, images):
    results = analyze_model(model, batches(images, [4, 3]), label="vit", progress=None, spectrum_groups=None)
    layers = {m: sorted({r["layer"] for r in results.select(metric=m)}) for m in ALL_METRICS}
    for metric in ("token_cosine", "effective_rank", "fourier_high", "fourier_delta", "singular_values"):
        assert layers[metric] == [0, 1, 2], metric
    for metric in (
        "attention_distance",
        "nmi",
        "attention_entropy",
        "head_cosine",
        "depth_cosine",
        "residual_ratio_attn",
        "residual_ratio_mlp",
    ):
        assert layers[metric] == [1, 2], metric
    heads = sorted(r["head"] for r in results.select(metric="nmi", layer=2) if r["head"] is not None)
    assert heads == [0, 1, 2, 3]
    per_head = [r["value"] for r in results.select(metric="nmi", layer=2) if r["head"] is not None]
    assert results.value(metric="nmi", layer=2, head=None) == pytest.approx(np.mean(per_head), rel=1e-6)
    # curves: 4×4 grid -> 2 Fourier frequencies; groups of 2 images of 16 tokens × 32 dims -> 32 values
    assert sorted(r["freq"] for r in results.select(metric="fourier_delta", layer=1)) == [0, 1]
    delta = {r["freq"]: r["value"] for r in results.select(metric="fourier_delta", layer=1)}
    assert delta[0] == 0.0 and delta[1] == pytest.approx(results.value(metric="fourier_high", layer=1))
    assert sorted(r["index"] for r in results.select(metric="singular_values", layer=0)) == list(range(32))
    assert results.select(metric="effective_rank", layer=0)[0]["n"] == 6  # 3 full groups of 2 out of 7


def test_spectrum_groups_straddle_batches_and_match_direct_svd(model, images):
    results = analyze_model(
        model,
        batches(images, [3, 1, 3]),
        label="vit",
        metrics=["singular_values", "effective_rank"],
        progress=None,
        spectrum_groups=2,
    )
    layers = ViTCapture(model).collect(images[:4])
    for layer in layers:
        sv = F.singular_values(layer.spatial_tokens, 2).double()  # groups (0, 1) and (2, 3)
        curve = sorted(results.select(metric="singular_values", layer=layer.depth), key=lambda r: r["index"])
        np.testing.assert_allclose([r["value"] for r in curve], sv.mean(0).numpy(), rtol=1e-4, atol=1e-5)
        ranks = F.effective_rank(sv)
        row = results.select(metric="effective_rank", layer=layer.depth)[0]
        assert row["value"] == pytest.approx(ranks.mean().item(), rel=1e-5)
        assert row["stderr"] == pytest.approx(ranks.std().item() / math.sqrt(2), rel=1e-3, abs=1e-6)
        assert row["n"] == 4


def test_running_moments_are_exact_for_large_mean_small_spread():
    gen = np.random.default_rng(0)
    values = 1e6 + 1e-3 * gen.standard_normal(50)
    moments = RunningMoments()
    for chunk in np.split(values, [7, 8, 30]):
        moments.update(torch.from_numpy(chunk))
    mean, stderr = moments.result()
    assert mean == pytest.approx(values.mean(), rel=1e-15)
    assert stderr == pytest.approx(values.std(ddof=1) / math.sqrt(50), rel=1e-6)


def test_metric_subset_unknown_name_and_save_load(model, images, tmp_path):
    results = analyze_model(model, batches(images, [7]), label="only", metrics=["nmi", "depth_cosine"], progress=None)
    assert {r["metric"] for r in results.rows} == {"nmi", "depth_cosine"}
    results.save(tmp_path)
    loaded = Results.load(tmp_path)
    assert len(loaded.rows) == len(results.rows)
    assert loaded.value(metric="nmi", layer=1, head=3) == pytest.approx(results.value(metric="nmi", layer=1, head=3))
    with pytest.raises(ValueError, match="unknown metrics"):
        metric_reducers(ViTCapture(model).facts, ["nmi", "attention_distnace"])


def test_reducers_keep_no_attention_or_tokens_after_a_block(model, images):
    """Every depth's attention and tokens are freed once the reducers have seen them."""
    capture = ViTCapture(model)
    reducers = metric_reducers(capture.facts)
    refs: list[weakref.ref] = []

    class Watch(Reducer):
        def update(self, layer) -> None:
            refs.append(weakref.ref(layer.tokens))
            if layer.attn is not None:
                refs.append(weakref.ref(layer.attn))

    run_reducers(capture, batches(images, [4, 3]), reducers + [Watch()], progress=None)
    gc.collect()
    assert refs and all(ref() is None for ref in refs)


def test_low_precision_model_is_reduced_in_float32(images):
    model32 = tiny_vit()
    model16 = tiny_vit().to(torch.bfloat16)
    data = batches(images, [7])
    reference = analyze_model(
        model32, data, label="m", metrics=["nmi", "attention_distance", "token_cosine"], progress=None
    )
    low = analyze_model(
        model16,
        [Batch(b.images.to(torch.bfloat16), b.labels) for b in data],
        label="m",
        metrics=["nmi", "attention_distance", "token_cosine"],
        progress=None,
    )
    for row in reference.select(head=None):
        other = low.value(metric=row["metric"], layer=row["layer"], head=None)
        assert math.isfinite(other)
        assert other == pytest.approx(row["value"], rel=0.05, abs=2e-3), row["metric"]


def test_cnn_gets_token_metrics_only():
    torch.manual_seed(0)
    cnn = timm.create_model("resnet10t", pretrained=False, num_classes=3).eval()
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    results = analyze_model(
        cnn,
        [images[:2], images[2:]],
        label="cnn",
        progress=None,
        metrics=["token_cosine", "fourier_high", "nmi", "head_cosine", "residual_ratio_attn"],
    )
    assert {r["metric"] for r in results.rows} == {"token_cosine", "fourier_high"}
    assert {r["layer"] for r in results.select(metric="token_cosine")} == set(range(1, len(cnn.feature_info) + 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_autocast_matches_cpu_float32(model, images):
    cpu = analyze_model(model, batches(images, [7]), label="m", progress=None)
    gpu = analyze_model(tiny_vit(), batches(images, [7]), label="m", device="cuda", dtype=torch.bfloat16, progress=None)
    for row in cpu.select(head=None, freq=None, index=None):
        other = gpu.value(metric=row["metric"], layer=row["layer"], head=None, freq=None, index=None)
        assert other == pytest.approx(row["value"], rel=0.05, abs=5e-3), (row["metric"], row["layer"])
