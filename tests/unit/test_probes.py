"""Linear probes: separable features reach 100 %, shuffled labels stay at chance, batching = one by one."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from tests.support.models import tiny_vit
from vitscope.analyses import FeatureBank, ProbeConfig, fit_linear_probes, linear_probe, run_reducers
from vitscope.capture import FeatureCapture, ViTCapture
from vitscope.data import Batch

FAST = ProbeConfig(epochs=30, lr=5e-2, batch_size=64, seed=0)


def separable_layers(
    n: int, classes: int, width: int, seed: int, noise_seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[2, n, width]: layer 0 is pure noise, layer 1 has well-separated class means (``seed``) plus
    small noise (``noise_seed``): linearly separable by construction."""
    means = torch.randn(classes, width, generator=torch.Generator().manual_seed(seed)) * 6
    noise = torch.randn(
        2, n, width, generator=torch.Generator().manual_seed(seed if noise_seed is None else noise_seed)
    )
    labels = torch.arange(n) % classes
    feats = noise.clone()
    feats[1] = means[labels] + 0.3 * noise[1] + 100.0  # large offset: standardisation must handle it
    return feats, labels


def test_separable_layer_reaches_100_percent_and_noise_layer_stays_near_chance():
    train, train_labels = separable_layers(400, 4, 12, seed=0, noise_seed=1)
    test, test_labels = separable_layers(200, 4, 12, seed=0, noise_seed=2)
    probes = fit_linear_probes(train, train_labels, config=FAST)
    top1 = probes.top1(test, test_labels)
    assert top1[1].item() == 100.0
    assert probes.train_top1[1].item() == 100.0
    assert 10.0 <= top1[0].item() <= 40.0  # 4 classes: chance is 25 %


def test_shuffled_labels_stay_at_chance():
    classes, g = 5, torch.Generator().manual_seed(3)
    train = torch.randn(3, 500, 16, generator=g)
    test = torch.randn(3, 500, 16, generator=g)
    train_labels = torch.randint(0, classes, (500,), generator=g)
    test_labels = torch.randint(0, classes, (500,), generator=g)
    config = ProbeConfig(epochs=40, lr=5e-2, batch_size=None)  # full batch: fits the noise of the train split
    top1 = fit_linear_probes(train, train_labels, config=config).top1(test, test_labels)
    # chance 20 %; binomial std over 500 images ≈ 1.8 points
    assert ((top1 > 12.0) & (top1 < 28.0)).all(), top1


def test_same_seed_same_result_and_batched_equals_one_layer_at_a_time():
    train, labels = separable_layers(300, 3, 8, seed=4)
    config = ProbeConfig(epochs=5, lr=1e-2, batch_size=32, seed=11)
    first = fit_linear_probes(train, labels, config=config)
    second = fit_linear_probes(train, labels, config=config)
    assert torch.equal(first.weight, second.weight) and torch.equal(first.bias, second.bias)
    other_seed = fit_linear_probes(train, labels, config=ProbeConfig(epochs=5, lr=1e-2, batch_size=32, seed=12))
    assert not torch.equal(first.weight, other_seed.weight)
    for layer in range(2):
        alone = fit_linear_probes(train[layer : layer + 1], labels, config=config)
        torch.testing.assert_close(alone.weight[0], first.weight[layer], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(alone.bias[0], first.bias[layer], rtol=1e-4, atol=1e-6)


def test_standardisation_uses_train_statistics_per_layer():
    train, labels = separable_layers(100, 2, 5, seed=2)
    probes = fit_linear_probes(train, labels, config=ProbeConfig(epochs=1))
    arr = train.double().numpy()
    np.testing.assert_allclose(probes.mean.numpy(), arr.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(probes.std.numpy(), np.sqrt(arr.var(axis=1) + 1e-6), rtol=1e-5)


def test_unlabelled_data_is_refused():
    with pytest.raises(ValueError, match="labelled"):
        fit_linear_probes(torch.randn(1, 4, 3), torch.full((4,), -1))


def batches(images: torch.Tensor, labels: torch.Tensor, size: int) -> list[Batch]:
    return [Batch(images[i : i + size], labels[i : i + size]) for i in range(0, len(images), size)]


def test_feature_bank_holds_cls_and_gap_of_every_depth_and_feeds_a_classifier():
    model = tiny_vit(depth=2)
    torch.manual_seed(0)
    images, labels = torch.randn(20, 3, 32, 32), torch.arange(20) % 2
    capture = ViTCapture(model, attention=False, branches=False)
    bank = FeatureBank()
    run_reducers(capture, batches(images, labels, 8), [bank], progress=None)
    layers = capture.collect(images)
    assert bank.depths == [0, 1, 2] and bank.kinds == ["cls", "gap"] and len(bank) == 20
    gap = bank.features("gap")
    assert gap.shape == (3, 20, 32) and gap.dtype == torch.float32
    for layer in layers:
        torch.testing.assert_close(gap[layer.depth], layer.spatial_tokens.mean(1))
        torch.testing.assert_close(bank.features("cls")[layer.depth], layer.tokens[:, 0])
    rows, probes = linear_probe(bank, bank, "vit", config=ProbeConfig(epochs=3), progress=None)
    assert {(r["feature"], r["layer"]) for r in rows} == {(k, d) for k in ("cls", "gap") for d in range(3)}
    assert all(r["metric"] == "linear_probe_top1" and r["n"] == 20 for r in rows)
    # the last layer's probe as an image classifier gives the probe's own logits
    classifier = probes["gap"].classifier(model)
    expected = probes["gap"].logits(gap)[-1]
    torch.testing.assert_close(classifier(images), expected, rtol=1e-4, atol=1e-4)
    cls_classifier = probes["cls"].classifier(capture, depth=1)
    torch.testing.assert_close(
        cls_classifier(images), probes["cls"].logits(bank.features("cls"))[1], rtol=1e-4, atol=1e-4
    )


def test_cnn_stages_of_different_width_are_padded_and_classifier_uses_true_width():
    torch.manual_seed(0)
    resnet = timm.create_model("resnet10t", pretrained=False, num_classes=0).eval()
    capture = FeatureCapture(resnet)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 2
    bank = FeatureBank()
    run_reducers(capture, batches(images, labels, 8), [bank], progress=None)
    assert bank.kinds == ["gap"]
    widths = bank.widths("gap")
    feats = bank.features("gap")
    assert feats.shape[2] == max(widths) and (feats[0, :, widths[0] :] == 0).all()
    _, probes = linear_probe(bank, bank, "resnet", config=ProbeConfig(epochs=2), progress=None)
    logits = probes["gap"].classifier(capture)(images)
    torch.testing.assert_close(logits, probes["gap"].logits(feats)[-1], rtol=1e-4, atol=1e-4)


def test_probe_features_keep_only_their_own_values_not_the_layer_they_came_from():
    """A CLS feature is a view of the layer's [B, N, C] tokens: the bank must keep (and checkpoint) a copy."""
    model = tiny_vit()
    bank = FeatureBank()
    images = torch.randn(4, 3, 32, 32)
    run_reducers(ViTCapture(model), [Batch(images, torch.arange(4))], [bank], progress=None)
    (batch,) = bank.state()["batches"]
    assert set(batch["features"]) == {(kind, depth) for kind in ("cls", "gap") for depth in range(3)}
    for key, feats in batch["features"].items():
        assert feats.shape == (4, 32), key
        assert feats.untyped_storage().nbytes() == feats.numel() * feats.element_size(), key
