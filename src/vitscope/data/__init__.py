"""Images in, batches out: Fashion-MNIST IDX files, image folders, per-model transforms, safe loading.

A data spec string names the images, the same in the CLI and the Python API:
- ``fashion-mnist`` or ``fashion-mnist:DIR`` — the IDX files of Debian's ``dataset-fashion-mnist``
  (default DIR /usr/share/datasets/fashion-mnist); falls back to the subset shipped in the package.
- ``fashion-mnist-subset`` — the subset shipped in the package (1,000 test and 2,000 train images).
- ``folder:DIR`` or a plain directory path — a torchvision ImageFolder layout (one folder per class)
  or a flat folder of images (label -1).

Unreadable images (truncated files, text named .png) are skipped and counted, never a crash: the
loader's batches carry the paths they skipped, and :class:`SkipCounter` sums them up.
Every image reaches the model as the 8-bit RGB a viewer shows, whatever its mode (16-bit, float, alpha,
palette, CMYK, EXIF-rotated, multi-frame): :func:`load_rgb` / :func:`to_rgb` (rules in :mod:`vitscope.data.decode`).
"""

from vitscope.data.batches import Batch, SkipCounter, collate_skipping, collate_views
from vitscope.data.datasets import ArrayImageDataset, Replaced, SafeImageFolder, Skipped
from vitscope.data.decode import load_rgb, to_rgb
from vitscope.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist, load_shipped_subset, read_idx
from vitscope.data.loaders import ChoiceLoader, ShardBatches, choice_loader, make_loader
from vitscope.data.specs import dataset_labels, open_dataset
from vitscope.data.subsets import (
    ReplacingSubset,
    StratifiedChoice,
    split_choices,
    stratified_choice,
    stratified_subset,
)
from vitscope.data.transforms import (
    MultiView,
    Preprocess,
    attach_preprocess,
    build_transform,
    distinct_views,
    input_normalisation,
    model_input_size,
)

__all__ = [
    "Batch",
    "SkipCounter",
    "Skipped",
    "ArrayImageDataset",
    "SafeImageFolder",
    "load_rgb",
    "to_rgb",
    "read_idx",
    "load_fashion_mnist",
    "load_shipped_subset",
    "FASHION_MNIST_CLASSES",
    "open_dataset",
    "dataset_labels",
    "stratified_subset",
    "build_transform",
    "model_input_size",
    "Preprocess",
    "attach_preprocess",
    "input_normalisation",
    "make_loader",
    "collate_skipping",
    "collate_views",
    "Replaced",
    "choice_loader",
    "ChoiceLoader",
    "ShardBatches",
    "ReplacingSubset",
    "StratifiedChoice",
    "stratified_choice",
    "split_choices",
    "MultiView",
    "distinct_views",
]
