"""Token t-SNE, SVD projection across a block, spatial localisation — on captures whose tokens are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.support.models import tiny_vit
from vitscope.analyses import SpatialLocalisation, pick_examples, spatial_localisation, svd_projection, token_tsne
from vitscope.capture import Capture, LayerOutput, ModelFacts, ViTCapture
from vitscope.data import Batch


class KnownCapture(Capture):
    """A fake two-depth 'model': depth 0 = the image's 4x4 patches as tokens [B, 16, 3·16] (plus one
    prefix token), depth 1 = ``block(depth 0 spatial tokens)``."""

    def __init__(self, block) -> None:
        super().__init__(torch.nn.Identity())
        self.block = block
        self.facts = ModelFacts("vit", 1, 1, 48, 1, (4, 4), True)

    def run(self, images, on_layer, *, grad=False):
        b = images.shape[0]
        patches = images.unfold(2, 4, 4).unfold(3, 4, 4)  # [B, 3, 4, 4, 4, 4]
        tokens = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, 16, 48)
        prefix = torch.zeros(b, 1, 48)
        on_layer(LayerOutput(0, torch.cat([prefix, tokens], 1), (4, 4), 1, (4, 4)))
        on_layer(LayerOutput(1, torch.cat([prefix, self.block(tokens)], 1), (4, 4), 1, (4, 4)))
        return tokens


def shift_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Move every token one grid cell to the right (cyclically, along rows)."""
    b, n, c = tokens.shape
    return tokens.reshape(b, 4, 4, c).roll(1, dims=2).reshape(b, n, c)


def image_batches(num: int, size: int, seed: int = 0) -> list[Batch]:
    images = torch.randn(num, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(num) % 2
    return [Batch(images[i : i + size], labels[i : i + size]) for i in range(0, num, size)]


def test_spatial_localisation_peaks_at_own_position_when_last_block_equals_depth_0():
    maps = spatial_localisation(KnownCapture(lambda t: t), image_batches(48, 16), progress=None)
    assert maps.shape == (16, 4, 4)
    flat = maps.reshape(16, 16)
    np.testing.assert_allclose(np.diagonal(flat), 1.0, atol=1e-12)
    assert (flat.argmax(axis=1) == np.arange(16)).all()
    off_diagonal = flat[~np.eye(16, dtype=bool)]
    assert np.abs(off_diagonal).max() < 0.5  # independent random patches


def test_spatial_localisation_follows_a_shift_and_gives_summary_rows():
    reducer = SpatialLocalisation()
    capture = KnownCapture(shift_tokens)
    for batch in image_batches(40, 10):
        reducer.begin_batch(batch.images, batch.labels)
        capture.run(batch.images, reducer.update)
        reducer.end_batch()
    flat = reducer.maps().reshape(16, 16)
    # deep position p holds the patch from the cell to its left (same row, column − 1 cyclically)
    source = [(p // 4) * 4 + (p % 4 - 1) % 4 for p in range(16)]
    assert list(flat.argmax(axis=1)) == source
    np.testing.assert_allclose(flat[np.arange(16), source], 1.0, atol=1e-12)
    rows = {r["metric"]: r for r in reducer.rows("fake")}
    assert rows["spatial_peak_hit"]["value"] == 0.0 and rows["spatial_peak_hit"]["layer"] == 1
    assert rows["spatial_self_cka"]["value"] == pytest.approx(np.diagonal(flat).mean())
    assert rows["spatial_self_cka"]["n"] == 40


def clustered_images(per_image_centres: torch.Tensor, seed: int) -> torch.Tensor:
    """Images whose 16 patches are their image's centre plus small noise: tokens cluster by image."""
    g = torch.Generator().manual_seed(seed)
    b = per_image_centres.shape[0]
    tokens = per_image_centres[:, None, :] + 0.05 * torch.randn(b, 16, 48, generator=g)
    return tokens.reshape(b, 4, 4, 3, 4, 4).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, 16, 16)


def test_token_tsne_keeps_each_images_tokens_together_and_is_seeded():
    centres = torch.randn(6, 48, generator=torch.Generator().manual_seed(1)) * 3
    images = clustered_images(centres, seed=2)
    labels = np.array([0, 0, 1, 1, 2, 2])
    capture = KnownCapture(lambda t: t)
    out = token_tsne(capture, images, labels, depth=0, perplexity=10, max_iter=300, seed=0, method="exact")
    assert out["points"].shape == (96, 2)
    np.testing.assert_array_equal(out["image_id"], np.repeat(np.arange(6), 16))
    np.testing.assert_array_equal(out["label"], np.repeat(labels, 16))
    np.testing.assert_array_equal(out["token"], np.tile(np.arange(16), 6))
    # nearest neighbour in the embedding belongs to the same image (tokens cluster by image)
    d = ((out["points"][:, None] - out["points"][None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (out["image_id"][d.argmin(axis=1)] == out["image_id"]).mean() == 1.0
    again = token_tsne(capture, images, labels, depth=0, perplexity=10, max_iter=300, seed=0, method="exact")
    np.testing.assert_array_equal(again["points"], out["points"])


def test_svd_projection_matches_numpy_up_to_sign():
    rotation, _ = torch.linalg.qr(torch.randn(48, 48, generator=torch.Generator().manual_seed(5)))
    capture = KnownCapture(lambda t: t @ rotation + 1.0)
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    out = svd_projection(capture, images, [0, 1, 1], depth=1)
    layers = capture.collect(images)
    before = layers[0].spatial_tokens.reshape(48, 48).double().numpy()
    after = layers[1].spatial_tokens.reshape(48, 48).double().numpy()
    mean = before.mean(axis=0)
    _, sigma, vt = np.linalg.svd(before - mean, full_matrices=False)
    np.testing.assert_allclose(out["singular_values"], sigma, rtol=1e-6)
    signs = np.sign(np.sum(out["before"]["points"] * ((before - mean) @ vt[:2].T), axis=0))
    np.testing.assert_allclose(out["before"]["points"], (before - mean) @ vt[:2].T * signs, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["after"]["points"], (after - mean) @ vt[:2].T * signs, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(out["after"]["label"], np.repeat([0, 1, 1], 16))


def test_real_vit_outputs_have_plot_ready_shapes_and_pick_examples_is_balanced():
    labels = np.array([0, 1, 2, 3] * 10)
    picked = pick_examples(labels, num_classes=2, per_class=3, seed=0)
    assert len(picked) == 6 and len(np.unique(labels[picked])) == 2
    assert all((labels[picked] == c).sum() == 3 for c in np.unique(labels[picked]))
    model = tiny_vit(depth=2)
    images = torch.randn(4, 3, 32, 32)
    out = svd_projection(ViTCapture(model, attention=False, branches=False), images, [0, 0, 1, 1], depth=2)
    assert out["before"]["points"].shape == (64, 2) and out["after"]["points"].shape == (64, 2)
