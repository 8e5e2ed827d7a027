"""Any image Pillow opens, as the 8-bit RGB image a viewer shows.

Pillow's own ``convert("RGB")`` clips 16-bit and 32-bit integer pixels at 255 (a 16-bit PNG becomes
nearly white), clips float pixels in [0, 1] to 0 or 1 (a float TIFF becomes black), drops alpha
(transparent pixels show whatever colour lies under them, often black) and ignores the EXIF orientation.
The rules here:

- EXIF orientation (all eight values) is applied first; a multi-frame file (GIF, TIFF) gives its first frame.
- ``I;16`` / ``I;16B`` / ``I;16L`` (and any other 16-bit layout): value × 255 / 65535.
- ``I`` (32-bit integers): within 0..65535 as 16-bit; otherwise min–max over the image.
- ``F`` (float): within [0, 1] as value × 255; otherwise min–max over the finite values. NaN is black,
  +inf white, −inf black; an image of one value outside [0, 1] is clipped (black below 0, white above 1).
- Alpha (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa`` / ``La``, a palette or ``tRNS`` transparency) is
  composited over white.
- Every other mode (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ...) is Pillow's conversion to RGB.

Single-channel results are grey (the same value in all three channels). Embedded ICC profiles are not
applied: pixel values are taken as sRGB, as torchvision's and timm's image loaders take them.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

__all__ = ["load_rgb", "to_rgb"]

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_UINT16_MAX = 65535


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """The first frame of the image file at ``path``, decoded (see :func:`to_rgb`) to an 8-bit RGB image.

    Raises whatever Pillow raises for a file it cannot read (truncated, not an image, ...).
    """
    with Image.open(path) as image:
        image.seek(0)
        image.load()
        return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` upright (EXIF orientation applied) as an 8-bit RGB image, by the rules of this module."""
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "F":
        return _grey_to_rgb(_float_unit(np.asarray(image, dtype=np.float64)))
    if mode == "I" or mode.startswith("I;"):
        return _grey_to_rgb(_integer_unit(np.asarray(image).astype(np.int64)))
    if mode in _ALPHA_MODES or "transparency" in image.info:
        return _over_white(image.convert("RGBA"))
    return image.convert("RGB")


def _float_unit(values: np.ndarray) -> np.ndarray:
    """Float pixels [H, W] mapped to [0, 1]: as they are within [0, 1], else min–max over finite values."""
    finite = np.isfinite(values)
    if not finite.any():
        return np.where(np.isposinf(values), 1.0, 0.0)
    low, high = float(values[finite].min()), float(values[finite].max())
    unit = values if (low >= 0.0 and high <= 1.0) or high == low else (values - low) / (high - low)
    return np.clip(np.nan_to_num(unit, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)


def _integer_unit(values: np.ndarray) -> np.ndarray:
    """Integer pixels [H, W] mapped to [0, 1]: as 16-bit within 0..65535, else min–max over the image."""
    low, high = int(values.min()), int(values.max())
    if (low >= 0 and high <= _UINT16_MAX) or high == low:
        return np.clip(values / _UINT16_MAX, 0.0, 1.0)
    return (values - low) / (high - low)


def _grey_to_rgb(unit: np.ndarray) -> Image.Image:
    """A [H, W] array in [0, 1] as an 8-bit grey RGB image (rounded to the nearest level)."""
    grey = np.round(unit * 255.0).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))


def _over_white(rgba: Image.Image) -> Image.Image:
    """An RGBA image composited over a white background, as RGB."""
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
