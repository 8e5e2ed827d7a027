"""Batched, seeded image augmentations for pretraining, on tensors (fast on CPU, run on GPU too).

Every random draw comes from an explicit CPU ``torch.Generator`` (small parameter tensors), so a
batch's augmentation is a function of the generator's seed alone; the pixel work then runs on
whatever device the images live on.

Recipes (official ones, scaled for small grayscale images such as 28 px Fashion-MNIST):
- MoCo v3: random resized crop (scale 0.08–1; 0.2–1 for images ≤ 64 px, since an 8 % crop of a 28 px
  image leaves a few pixels), flip, colour jitter p=0.8 (brightness 0.4, contrast 0.4, saturation 0.2;
  hue is skipped for every input: it is the identity on grayscale, which these recipes target),
  grayscale p=0.2, Gaussian blur p=1.0 / 0.1 on the two views (σ ∈ [0.1, 2.0] px at 224 px, scaled
  by size/224 but at least by 1/4), solarize p=0 / 0.2.
- SimMIM: random resized crop (scale 0.67–1, ratio 3/4–4/3), flip.
- MAE: random resized crop (scale 0.2–1), flip.
Images come in as uint8 [B, H, W] (grayscale) or [B, H, W, 3] and leave as float [B, 3, S, S],
normalised by the model's mean/std.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CropSpec",
    "ViewSpec",
    "to_float_rgb",
    "random_resized_crop",
    "color_jitter",
    "random_grayscale",
    "gaussian_blur",
    "solarize",
    "normalize",
    "make_view",
    "moco_view_specs",
    "mim_view_spec",
    "default_crop_scale",
]


@dataclass(frozen=True)
class CropSpec:
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5


@dataclass(frozen=True)
class ViewSpec:
    """One view's recipe: a crop, then photometric operations with their probabilities."""

    crop: CropSpec = CropSpec()
    jitter_p: float = 0.0
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    gray_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0


def default_crop_scale(method: str, image_size: int) -> tuple[float, float]:
    """Lower/upper crop area fraction of the official recipes, with MoCo's 0.08 raised to 0.2 below 64 px."""
    if method == "simmim":
        return (0.67, 1.0)
    if method == "mae":
        return (0.2, 1.0)
    if method == "moco":
        return (0.2, 1.0) if image_size <= 64 else (0.08, 1.0)
    raise ValueError(f"unknown method {method!r} (expected moco, simmim or mae)")


def moco_view_specs(image_size: int, min_scale: float | None = None) -> tuple[ViewSpec, ViewSpec]:
    """MoCo v3's asymmetric pair of views (blur 1.0/0.1, solarize 0/0.2)."""
    scale = (min_scale, 1.0) if min_scale is not None else default_crop_scale("moco", image_size)
    factor = max(image_size / 224.0, 0.25)
    sigma = (0.1 * factor, 2.0 * factor)
    common: dict[str, Any] = dict(crop=CropSpec(scale=scale), jitter_p=0.8, gray_p=0.2, blur_sigma=sigma)
    return ViewSpec(blur_p=1.0, solarize_p=0.0, **common), ViewSpec(blur_p=0.1, solarize_p=0.2, **common)


def mim_view_spec(method: str, image_size: int, min_scale: float | None = None) -> ViewSpec:
    scale = (min_scale, 1.0) if min_scale is not None else default_crop_scale(method, image_size)
    return ViewSpec(crop=CropSpec(scale=scale))


# ------------------------------------------------------------------------------------------ pieces
def to_float_rgb(images: Tensor) -> Tensor:
    """uint8 [B, H, W] or [B, H, W, 3] (or float [B, 3, H, W]) → float [B, 3, H, W] in [0, 1]."""
    if images.dtype == torch.uint8:
        images = images.float().div_(255.0)
        if images.dim() == 3:
            return images[:, None].expand(-1, 3, -1, -1).contiguous()
        if images.dim() == 4 and images.shape[-1] in (1, 3):
            return images.permute(0, 3, 1, 2).expand(-1, 3, -1, -1).contiguous()
    if images.dim() == 4 and images.shape[1] == 3:
        return images.float()
    raise ValueError(
        f"images must be uint8 [B,H,W] / [B,H,W,3] or float [B,3,H,W], got {tuple(images.shape)} {images.dtype}"
    )


def _uniform(generator: torch.Generator, size: int, low: float, high: float) -> Tensor:
    return torch.rand(size, generator=generator, dtype=torch.float64) * (high - low) + low


def crop_boxes(batch: int, spec: CropSpec, generator: torch.Generator) -> Tensor:
    """Per image (centre_x, centre_y, width, height, flip) as fractions of the image, float64 [B, 5].

    Area fraction ~ U(scale), log aspect ratio ~ U(log ratio); boxes wider or taller than the image
    are shrunk to fit (torchvision retries instead; this keeps one draw per image).
    """
    area = _uniform(generator, batch, *spec.scale)
    log_ratio = _uniform(generator, batch, math.log(spec.ratio[0]), math.log(spec.ratio[1]))
    ratio = log_ratio.exp()
    width = (area * ratio).sqrt().clamp(max=1.0)
    height = (area / ratio).sqrt().clamp(max=1.0)
    cx = width / 2 + torch.rand(batch, generator=generator, dtype=torch.float64) * (1 - width)
    cy = height / 2 + torch.rand(batch, generator=generator, dtype=torch.float64) * (1 - height)
    flip = (torch.rand(batch, generator=generator, dtype=torch.float64) < spec.flip_p).double()
    return torch.stack([cx, cy, width, height, flip], dim=1)


def random_resized_crop(images: Tensor, size: int, spec: CropSpec, generator: torch.Generator) -> Tensor:
    """Crop a random box from each image and resize it to ``size`` (bilinear), flipping some horizontally."""
    boxes = crop_boxes(images.shape[0], spec, generator)
    cx, cy, w, h, flip = boxes.unbind(1)
    theta = torch.zeros(images.shape[0], 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = w * (1 - 2 * flip)
    theta[:, 0, 2] = 2 * cx - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * cy - 1
    theta = theta.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, [images.shape[0], images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(images: Tensor) -> Tensor:
    weights = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def _where_drawn(p: float, batch: int, generator: torch.Generator, device: torch.device) -> Tensor:
    return (torch.rand(batch, generator=generator) < p).to(device).view(-1, 1, 1, 1)


def color_jitter(images: Tensor, spec: ViewSpec, generator: torch.Generator) -> Tensor:
    """Brightness, contrast, saturation (in that order) with factors ~ U(1 ± strength), applied with p."""
    b, device = images.shape[0], images.device
    apply = _where_drawn(spec.jitter_p, b, generator, device)
    bright = _uniform(generator, b, 1 - spec.brightness, 1 + spec.brightness).float().to(device).view(-1, 1, 1, 1)
    contrast = _uniform(generator, b, 1 - spec.contrast, 1 + spec.contrast).float().to(device).view(-1, 1, 1, 1)
    sat = _uniform(generator, b, 1 - spec.saturation, 1 + spec.saturation).float().to(device).view(-1, 1, 1, 1)
    out = (images * bright).clamp(0, 1)
    mean = _gray(out).mean(dim=(2, 3), keepdim=True)
    out = ((out - mean) * contrast + mean).clamp(0, 1)
    gray = _gray(out)
    out = ((out - gray) * sat + gray).clamp(0, 1)
    return torch.where(apply, out, images)


def random_grayscale(images: Tensor, p: float, generator: torch.Generator) -> Tensor:
    apply = _where_drawn(p, images.shape[0], generator, images.device)
    return torch.where(apply, _gray(images).expand_as(images), images)


def gaussian_blur(images: Tensor, p: float, sigma: tuple[float, float], generator: torch.Generator) -> Tensor:
    """Separable Gaussian blur with a per-image σ ~ U(sigma), applied with probability p."""
    b, c, h, w = images.shape
    apply = _where_drawn(p, b, generator, images.device)
    sigmas = _uniform(generator, b, *sigma).float().to(images.device)
    radius = max(1, math.ceil(3 * sigma[1]))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / sigmas[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B*C, K]
    x = images.reshape(1, b * c, h, w)
    x = F.conv2d(
        F.pad(x, (radius, radius, 0, 0), mode="reflect" if w > radius else "replicate"),
        kernel[:, None, None, :],
        groups=b * c,
    )
    x = F.conv2d(
        F.pad(x, (0, 0, radius, radius), mode="reflect" if h > radius else "replicate"),
        kernel[:, None, :, None],
        groups=b * c,
    )
    return torch.where(apply, x.view(b, c, h, w), images)


def solarize(images: Tensor, p: float, generator: torch.Generator, threshold: float = 0.5) -> Tensor:
    apply = _where_drawn(p, images.shape[0], generator, images.device)
    return torch.where(apply & (images >= threshold), 1.0 - images, images)


def normalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    m = images.new_tensor(mean).view(1, -1, 1, 1)
    s = images.new_tensor(std).view(1, -1, 1, 1)
    return (images - m) / s


def make_view(
    images: Tensor,
    size: int,
    spec: ViewSpec,
    generator: torch.Generator,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> Tensor:
    """One augmented, normalised view [B, 3, size, size] of float [B, 3, H, W] images in [0, 1].

    Every operation draws its parameters for the whole batch, whether or not it is applied, so the
    number of draws (and hence later draws) does not depend on the probabilities' outcomes.
    """
    x = random_resized_crop(images, size, spec.crop, generator)
    if spec.jitter_p > 0:
        x = color_jitter(x, spec, generator)
    if spec.gray_p > 0:
        x = random_grayscale(x, spec.gray_p, generator)
    if spec.blur_p > 0:
        x = gaussian_blur(x, spec.blur_p, spec.blur_sigma, generator)
    if spec.solarize_p > 0:
        x = solarize(x, spec.solarize_p, generator)
    return normalize(x, mean, std)
