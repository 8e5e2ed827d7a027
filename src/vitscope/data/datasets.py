"""Datasets that never crash on a bad file: images held in an array, and image folders whose unreadable
files come back as :class:`Skipped` markers (counted and replaced downstream, never fatal)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from vitscope.data.decode import load_rgb, to_rgb

__all__ = ["IMAGE_EXTENSIONS", "Skipped", "Replaced", "ArrayImageDataset", "SafeImageFolder", "to_tensor"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


@dataclass
class Skipped:
    """An item that could not be read: its path and why."""

    path: str
    reason: str


@dataclass
class Replaced:
    """A readable image drawn in place of unreadable ones: the dataset's ``(sample, label)`` and the
    files skipped to reach it."""

    item: tuple[Any, int]
    skipped: list[Skipped]


class ArrayImageDataset(Dataset):
    """Images held as a uint8 array [N, H, W] or [N, H, W, 3] with integer labels."""

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, transform: Callable | None = None, classes: Sequence[str] = ()
    ) -> None:
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = to_rgb(Image.fromarray(self.images[index]))  # grayscale expanded to 3 channels
        sample = self.transform(image) if self.transform else to_tensor(image)
        return sample, int(self.labels[index])


class SafeImageFolder(Dataset):
    """An image folder where unreadable files are skipped and reported, not fatal; every image is decoded
    to the RGB a viewer shows (:func:`~vitscope.data.decode.load_rgb`: 16-bit and float pixels scaled,
    alpha over white, EXIF orientation applied, first frame).

    With class sub-folders it is torchvision's ImageFolder layout (labels = sorted folder index);
    a flat folder gives label -1.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.transform = transform
        class_dirs = sorted(p for p in self.root.iterdir() if p.is_dir())
        self.classes = [p.name for p in class_dirs]
        samples: list[tuple[str, int]] = []
        if class_dirs:
            for label, folder in enumerate(class_dirs):
                samples += [(str(p), label) for p in sorted(folder.rglob("*")) if _is_image_name(p)]
        else:
            samples = [(str(p), -1) for p in sorted(self.root.iterdir()) if _is_image_name(p)]
        if not samples:
            raise ValueError(f"{self.root}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
        self.samples = samples
        self.labels = np.array([label for _, label in samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int] | Skipped:
        path, label = self.samples[index]
        try:
            image = load_rgb(path)
        except Exception as err:  # PIL raises many types for bad files; all mean "skip this one"
            return Skipped(path, f"{type(err).__name__}: {err}")
        sample = self.transform(image) if self.transform else to_tensor(image)
        return sample, label


def _is_image_name(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def to_tensor(image: Image.Image) -> Tensor:
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
