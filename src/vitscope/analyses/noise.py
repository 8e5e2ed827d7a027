"""Frequency-filtered noise robustness: which frequency band of noise hurts a classifier most.

Steps:
1. :func:`band_masks` splits the image's 2-D FFT grid into ``num_bands`` rings of equal width in radial
   frequency r = sqrt(f_y² + f_x²) (cycles per pixel, from 0 at DC to the grid's largest radius,
   sqrt(0.5) for even sizes); band 0 holds the lowest frequencies. The rings are disjoint and cover
   every frequency.
2. :func:`band_limited_noise` draws white Gaussian noise per image and channel, keeps only one band's
   Fourier coefficients (the mask is symmetric under f -> −f, so the result is real) and rescales each
   image's noise to the requested L2 norm (over channels and pixels).
3. :func:`noise_robustness` adds it to test images and reports, per band, the top-1 drop (clean minus
   noisy, percentage points) of any ``images -> logits`` callable, e.g. the last layer's linear probe
   (:meth:`vitscope.analyses.probes.LinearProbes.classifier`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from vitscope.data import Batch
from vitscope.progress import progress_bar
from vitscope.results import Row, make_row

__all__ = ["radial_frequency", "band_masks", "band_limited_noise", "NoiseResult", "noise_robustness"]

Classifier = Callable[[Tensor], Tensor]


def radial_frequency(h: int, w: int) -> Tensor:
    """|f| in cycles per pixel at every position of an unshifted FFT grid, [h, w] float64."""
    fy = torch.fft.fftfreq(h, dtype=torch.float64)
    fx = torch.fft.fftfreq(w, dtype=torch.float64)
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)


def band_masks(h: int, w: int, num_bands: int) -> Tensor:
    """[num_bands, h, w] boolean masks over the (unshifted) FFT grid, lowest radial frequency first.

    Band k holds k·r_max/num_bands ≤ r < (k+1)·r_max/num_bands (the last band includes r_max), where
    r_max is the largest radius on the grid. Raises when a band would be empty (too many bands for
    the image size).
    """
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    if num_bands < 1:
        raise ValueError(f"num_bands must be ≥ 1, got {num_bands}")
    radius = radial_frequency(h, w)
    scaled = radius / radius.max().clamp_min(1e-12) * num_bands
    index = scaled.floor().long().clamp_max(num_bands - 1)
    masks = index.unsqueeze(0) == torch.arange(num_bands).view(-1, 1, 1)
    empty = [k for k in range(num_bands) if not masks[k].any()]
    if empty:
        raise ValueError(f"num_bands={num_bands} is too many for {h}x{w} images: band(s) {empty} hold no frequency")
    return masks


def band_limited_noise(
    shape: tuple[int, ...], mask: Tensor, norm: float, *, generator: torch.Generator | None = None
) -> Tensor:
    """Gaussian noise [B, C, H, W] whose FFT lies in ``mask`` [H, W], each image's L2 norm = ``norm``.

    The noise is drawn on the CPU from ``generator`` (reproducible), float32.
    """
    if len(shape) != 4:
        raise ValueError(f"shape must be [B, C, H, W], got {tuple(shape)}")
    if tuple(mask.shape) != tuple(shape[-2:]):
        raise ValueError(f"mask {tuple(mask.shape)} does not match image size {tuple(shape[-2:])}")
    if norm < 0:
        raise ValueError(f"noise norm must be ≥ 0, got {norm}")
    white = torch.randn(shape, generator=generator, dtype=torch.float64)
    spectrum = torch.fft.fft2(white) * mask.to(torch.float64)
    noise = torch.fft.ifft2(spectrum).real
    norms = noise.flatten(1).norm(dim=1).clamp_min(1e-12)
    return (noise * (norm / norms).view(-1, 1, 1, 1)).float()


@dataclass
class NoiseResult:
    """Clean and per-band noisy top-1 (percent) of one classifier, bands from low to high frequency."""

    clean_top1: float
    noisy_top1: list[float]
    num_images: int
    norm: float

    @property
    def drops(self) -> list[float]:
        """Clean top-1 minus noisy top-1 per band, in percentage points."""
        return [self.clean_top1 - noisy for noisy in self.noisy_top1]

    def rows(self, model: str) -> list[Row]:
        """Tidy rows: metric ``noise_drop``, column ``band`` (0 = lowest frequency)."""
        return [
            make_row(model, "noise_drop", None, drop, n=self.num_images, band=band)
            for band, drop in enumerate(self.drops)
        ]


@torch.no_grad()
def noise_robustness(
    classifier: Classifier,
    batches: Iterable[Batch],
    *,
    num_bands: int = 5,
    norm: float | None = None,
    relative_norm: float = 0.1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: str | None = "noise",
) -> NoiseResult:
    """Top-1 drop of ``classifier`` under noise of each frequency band.

    Args:
        classifier: any callable images [B, 3, H, W] -> logits [B, K] (e.g. a probe classifier).
        batches: labelled test batches (:class:`vitscope.data.Batch`), in the model's input space.
        num_bands: radial frequency bands (see :func:`band_masks`).
        norm: L2 norm of the noise per image. None: ``relative_norm`` × sqrt(C·H·W), i.e. a root-mean-
            square of ``relative_norm`` per pixel value.
        seed: noise seed; the bands and batches draw in turn from one generator, so every run draws the
            same noise (each band its own white noise).
    """
    generator = torch.Generator().manual_seed(seed)
    masks: Tensor | None = None
    correct = torch.zeros(1 + num_bands, dtype=torch.long, device=device)  # clean, then each band; no per-batch sync
    total = 0
    for batch in progress_bar(batches, desc=progress, unit="batch", enabled=progress is not None):
        if len(batch.images) == 0:
            continue
        if int(batch.labels.min()) < 0:  # the loader's labels, still on the CPU
            raise ValueError("noise robustness needs labelled images (labels ≥ 0)")
        images, labels = batch.images.to(device, non_blocking=True), batch.labels.to(device, non_blocking=True)
        b, c, h, w = images.shape
        if masks is None:
            masks = band_masks(h, w, num_bands)
        scale = relative_norm * math.sqrt(c * h * w) if norm is None else norm
        correct[0] += (classifier(images).argmax(dim=-1) == labels).sum()
        for band in range(num_bands):
            noise = band_limited_noise((b, c, h, w), masks[band], scale, generator=generator)
            pred = classifier(images + noise.to(images.device, images.dtype)).argmax(dim=-1)
            correct[1 + band] += (pred == labels).sum()
        total += b
    if total == 0:
        raise ValueError("noise robustness: no images")
    top1 = (100.0 * correct.double() / total).cpu().tolist()
    return NoiseResult(top1[0], top1[1:], total, float(scale))
