"""Data spec strings: ``fashion-mnist[:DIR]``, ``fashion-mnist-subset``, ``folder:DIR`` (or a plain directory)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from vitscope.data.datasets import ArrayImageDataset, SafeImageFolder
from vitscope.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist, load_shipped_subset

__all__ = ["open_dataset", "dataset_labels"]


def open_dataset(
    spec: str, split: str = "test", transform: Callable | None = None
) -> ArrayImageDataset | SafeImageFolder:
    """Open the images a data spec names (see module docstring). Raises with the spec on bad input."""
    kind, _, arg = spec.partition(":")
    if kind == "fashion-mnist":
        images, labels = load_fashion_mnist(arg or None, split)
        return ArrayImageDataset(images, labels, transform, FASHION_MNIST_CLASSES)
    if kind == "fashion-mnist-subset":
        images, labels = load_shipped_subset(split)
        return ArrayImageDataset(images, labels, transform, FASHION_MNIST_CLASSES)
    path = arg if kind in ("folder", "imagefolder") else spec
    if not Path(path).exists():
        raise FileNotFoundError(f"data spec {spec!r}: no such directory {path}")
    return SafeImageFolder(path, transform)


def dataset_labels(dataset: Dataset) -> np.ndarray | None:
    labels = getattr(dataset, "labels", None)
    return None if labels is None else np.asarray(labels)
