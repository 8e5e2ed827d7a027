"""Images in, batches out: Fashion-MNIST IDX files, image folders, per-model transforms, safe loading.

A data spec string names the images, the same in the CLI and the Python API:
- ``fashion-mnist`` or ``fashion-mnist:DIR`` — the IDX files of Debian's ``dataset-fashion-mnist``
  (default DIR /usr/share/datasets/fashion-mnist); falls back to the subset shipped in the package.
- ``fashion-mnist-subset`` — the subset shipped in the package (1,000 test and 2,000 train images).
- ``folder:DIR`` or a plain directory path — a torchvision ImageFolder layout (one folder per class)
  or a flat folder of images (label -1).

Unreadable images (truncated files, text named .png) are skipped and counted, never a crash: the
loader's batches carry the paths they skipped, and :class:`SkipCounter` sums them up.
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

DEFAULT_FASHION_MNIST = Path(os.environ.get("VITSCOPE_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
SHIPPED_SUBSET = Path(__file__).parent / "data" / "fashion_mnist_subset.npz"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")

__all__ = [
    "Batch", "SkipCounter", "ArrayImageDataset", "SafeImageFolder", "read_idx", "load_fashion_mnist",
    "open_dataset", "stratified_subset", "build_transform", "model_input_size", "make_loader",
    "collate_skipping", "collate_views",
]


# ----------------------------------------------------------------------------------------- IDX files
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
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
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


# ------------------------------------------------------------------------------------------ datasets
@dataclass
class Batch:
    """A collated batch: images [B, 3, H, W], labels [B] (-1 when unknown), skipped (path, reason) pairs."""

    images: Tensor
    labels: Tensor
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Skipped:
    path: str
    reason: str


class ArrayImageDataset(Dataset):
    """Images held as a uint8 array [N, H, W] or [N, H, W, 3] with integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable | None = None,
                 classes: Sequence[str] = ()) -> None:
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = Image.fromarray(self.images[index]).convert("RGB")  # grayscale expanded to 3 channels
        sample = self.transform(image) if self.transform else _to_tensor(image)
        return sample, int(self.labels[index])


class SafeImageFolder(Dataset):
    """An image folder where unreadable files are skipped and reported, not fatal.

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

    def __getitem__(self, index: int) -> tuple[Tensor, int] | _Skipped:
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                img.load()
                image = img.convert("RGB")
        except Exception as err:  # PIL raises many types for bad files; all mean "skip this one"
            return _Skipped(path, f"{type(err).__name__}: {err}")
        sample = self.transform(image) if self.transform else _to_tensor(image)
        return sample, label


def _is_image_name(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _to_tensor(image: Image.Image) -> Tensor:
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def collate_skipping(items: list) -> Batch:
    """Stack the good samples; carry the skipped ones' paths and reasons along."""
    skipped = [(item.path, item.reason) for item in items if isinstance(item, _Skipped)]
    good = [item for item in items if not isinstance(item, _Skipped)]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    images = torch.stack([image for image, _ in good])
    labels = torch.tensor([label for _, label in good], dtype=torch.long)
    return Batch(images, labels, skipped)


class SkipCounter:
    """Sums the skipped files over a run's batches."""

    def __init__(self) -> None:
        self.skipped: list[tuple[str, str]] = []

    def update(self, batch: Batch) -> None:
        self.skipped.extend(batch.skipped)

    @property
    def count(self) -> int:
        return len(self.skipped)

    def report(self) -> str:
        if not self.skipped:
            return "skipped 0 unreadable files"
        lines = [f"skipped {self.count} unreadable file(s):"] + [f"  {p}: {r}" for p, r in self.skipped]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------- data specs
def open_dataset(spec: str, split: str = "test", transform: Callable | None = None) -> Dataset:
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


def stratified_subset(labels: np.ndarray | None, num_items: int, seed: int = 0, total: int | None = None) -> np.ndarray:
    """Indices of a deterministic subset of ``num_items``, balanced over classes when labels exist.

    Classes are visited round-robin, each in a seeded random order, so every class gets
    ⌊n/k⌋ or ⌈n/k⌉ items (fewer only when a class runs out). Without labels: a seeded permutation.
    """
    rng = np.random.default_rng(seed)
    size = len(labels) if labels is not None else int(total or 0)
    if num_items >= size:
        return np.arange(size)
    if labels is None or (labels < 0).all():
        return np.sort(rng.permutation(size)[:num_items])
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < num_items:
        for members in per_class:
            if depth < len(members) and len(chosen) < num_items:
                chosen.append(int(members[depth]))
        depth += 1
    return np.sort(np.array(chosen, dtype=np.int64))


# --------------------------------------------------------------------------------------- transforms
def model_input_size(model: torch.nn.Module) -> tuple[int, int] | None:
    """The (H, W) a model was built for (timm ``patch_embed.img_size``), or None when dynamic/unknown."""
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is None or getattr(patch_embed, "dynamic_img_size", False):
        return None
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def build_transform(model: torch.nn.Module, input_size: tuple[int, int] | None = None) -> Callable:
    """Eval transform from the model's own data config (timm ``resolve_data_config``).

    The input size is the one the model was built with (a ViT created with ``img_size=32`` gets 32 px,
    whatever its pretrained config says) unless ``input_size`` overrides it. Small inputs (≤ 64 px)
    are resized without a centre crop, since cropping a 28 px image loses the object.
    """
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({}, model=model)
    size = input_size or model_input_size(model) or tuple(config["input_size"][1:])
    config["input_size"] = (3, int(size[0]), int(size[1]))
    if max(size) <= 64:
        config["crop_pct"] = 1.0
    return create_transform(**config, is_training=False)


def make_loader(dataset: Dataset, *, num_images: int | None = None, batch_size: int = 64, seed: int = 0,
                num_workers: int = 0, shuffle: bool = False) -> DataLoader:
    """A loader over a deterministic (stratified) subset of ``dataset`` yielding :class:`Batch`."""
    if num_images is not None and num_images < len(dataset):
        indices = stratified_subset(dataset_labels(dataset), num_images, seed, total=len(dataset))
        dataset = Subset(dataset, indices.tolist())
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      collate_fn=collate_skipping, generator=generator)


def collate_views(items: list) -> list[Batch]:
    """Collate samples whose image is a tuple of views (one per model pipeline) into a Batch per view.

    Skipped files are carried on the first view's batch.
    """
    skipped = [(item.path, item.reason) for item in items if isinstance(item, _Skipped)]
    good = [item for item in items if not isinstance(item, _Skipped)]
    if not good:
        return [Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)]
    labels = torch.tensor([label for _, label in good], dtype=torch.long)
    num_views = len(good[0][0])
    return [Batch(torch.stack([views[v] for views, _ in good]), labels, skipped if v == 0 else [])
            for v in range(num_views)]
