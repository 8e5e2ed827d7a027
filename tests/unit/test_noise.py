"""Frequency-band noise: masks partition the spectrum, noise has the asked norm and stays in its band."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitscope.analyses.noise import band_limited_noise, band_masks, noise_robustness, radial_frequency
from vitscope.data import Batch


@pytest.mark.parametrize("h, w, bands", [(32, 32, 6), (28, 20, 4), (7, 9, 3)])
def test_band_masks_partition_the_spectrum_from_low_to_high(h, w, bands):
    masks = band_masks(h, w, bands)
    assert masks.shape == (bands, h, w) and masks.dtype == torch.bool
    assert (masks.sum(dim=0) == 1).all()  # disjoint, and their union is every frequency
    assert masks[0, 0, 0]  # DC in the lowest band
    # radii computed here with numpy: every radius of band k is below every radius of band k+1
    fy, fx = np.fft.fftfreq(h), np.fft.fftfreq(w)
    radius = np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    np.testing.assert_allclose(radial_frequency(h, w).numpy(), radius)
    for k in range(bands - 1):
        assert radius[masks[k].numpy()].max() < radius[masks[k + 1].numpy()].min()
    assert masks[-1].numpy()[radius == radius.max()].all()


def test_too_many_bands_is_an_error():
    with pytest.raises(ValueError, match="too many"):
        band_masks(4, 4, 50)


@pytest.mark.parametrize("band", [0, 2, 4])
def test_noise_has_the_norm_and_lies_in_its_band(band):
    masks = band_masks(16, 16, 5)
    noise = band_limited_noise((3, 2, 16, 16), masks[band], 2.5, generator=torch.Generator().manual_seed(0))
    assert noise.shape == (3, 2, 16, 16) and noise.dtype == torch.float32
    np.testing.assert_allclose(noise.flatten(1).norm(dim=1).numpy(), 2.5, rtol=1e-5)
    energy = np.abs(np.fft.fft2(noise.double().numpy())) ** 2
    inside = energy[..., masks[band].numpy()].sum()
    outside = energy[..., ~masks[band].numpy()].sum()
    assert outside < 1e-10 * inside
    assert inside == pytest.approx(16 * 16 * 3 * 2.5**2, rel=1e-4)  # Parseval: Σ|F|² = HW·Σx²


def mean_sign_classifier(images: torch.Tensor) -> torch.Tensor:
    """Class 1 when the image mean is positive: it sees only the DC component."""
    m = images.mean(dim=(1, 2, 3))
    return torch.stack([-m, m], dim=1)


def labelled_batches(seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(40, 3, 16, 16, generator=g) * 0.2 + torch.linspace(-0.3, 0.3, 40).view(-1, 1, 1, 1)
    labels = (images.mean(dim=(1, 2, 3)) > 0).long()
    return [Batch(images[:20], labels[:20]), Batch(images[20:], labels[20:])]


def test_zero_norm_gives_zero_drop():
    result = noise_robustness(mean_sign_classifier, labelled_batches(), num_bands=4, norm=0.0, progress=None)
    assert result.clean_top1 == 100.0
    assert result.drops == [0.0, 0.0, 0.0, 0.0]
    rows = result.rows("m")
    assert [r["band"] for r in rows] == [0, 1, 2, 3] and all(r["metric"] == "noise_drop" for r in rows)


def test_only_the_band_holding_dc_hurts_a_dc_classifier_and_results_are_seeded():
    kwargs = dict(num_bands=4, norm=40.0, seed=3, progress=None)
    result = noise_robustness(mean_sign_classifier, labelled_batches(), **kwargs)
    assert result.drops[0] > 10.0  # band 0 shifts the image means
    assert result.drops[1:] == [0.0, 0.0, 0.0]  # higher bands have zero mean: no prediction changes
    again = noise_robustness(mean_sign_classifier, labelled_batches(), **kwargs)
    assert again.noisy_top1 == result.noisy_top1
    assert result.num_images == 40 and result.norm == 40.0
