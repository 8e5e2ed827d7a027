"""Fashion-MNIST from IDX files (Debian's ``dataset-fashion-mnist``) or the subset shipped in the package."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
from numpy.typing import DTypeLike

__all__ = [
    "DEFAULT_FASHION_MNIST",
    "SHIPPED_SUBSET",
    "FASHION_MNIST_CLASSES",
    "read_idx",
    "load_fashion_mnist",
    "load_shipped_subset",
]

DEFAULT_FASHION_MNIST = Path(os.environ.get("VITSCOPE_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
SHIPPED_SUBSET = Path(__file__).parent / "fashion_mnist_subset.npz"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped), as in LeCun's MNIST format: magic, dims, big-endian data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except OSError as err:
        raise ValueError(f"{path}: cannot read IDX file ({err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    dtypes: dict[int, DTypeLike] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX data type 0x{raw[2]:02x}")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=dtypes[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated IDX file ({data.size} values for shape {shape})")
    return data.reshape(shape)


def _idx_file(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).exists():
            return root / name
    raise FileNotFoundError(f"{root}: no {stem}[.gz]; install Debian's dataset-fashion-mnist or pass fashion-mnist:DIR")


def load_fashion_mnist(root: str | os.PathLike | None = None, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST as (images uint8 [N, 28, 28], labels int64 [N]).

    Reads the IDX files under ``root`` (default: Debian's location); when ``root`` is not given and
    they are missing, the subset shipped in the package is used.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    root_path = Path(root) if root is not None else DEFAULT_FASHION_MNIST
    if root is None and not root_path.exists():
        return load_shipped_subset(split)
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_idx_file(root_path, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_idx_file(root_path, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{root_path}: {len(images)} images but {len(labels)} labels for split {split}")
    return images, labels


def load_shipped_subset(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    if not SHIPPED_SUBSET.exists():
        raise FileNotFoundError(
            f"Fashion-MNIST not found at {DEFAULT_FASHION_MNIST} and no shipped subset at {SHIPPED_SUBSET}"
        )
    with np.load(SHIPPED_SUBSET) as npz:
        return npz[f"{split}_images"], npz[f"{split}_labels"].astype(np.int64)
