"""Data: IDX files, image folders with bad files, stratified subsets, per-model transforms."""
from __future__ import annotations

import gzip
import struct
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import tiny_vit
from vitscope.data import (
    SafeImageFolder, SkipCounter, build_transform, make_loader, open_dataset, read_idx,
    stratified_subset,
)


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_round_trip_and_errors(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x.gz", images)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), images)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04garbage")
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(tmp_path / "bad")
    with gzip.open(tmp_path / "short.gz", "wb") as fh:  # header says 2x3x4, data has 5 bytes
        fh.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 3, 4) + b"12345")
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short.gz")


def test_fashion_mnist_from_idx_dir(tmp_path):
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (20, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(20) % 10)
    dataset = open_dataset(f"fashion-mnist:{tmp_path}", "test", build_transform(tiny_vit()))
    image, label = dataset[3]
    assert image.shape == (3, 32, 32) and label == 3  # grayscale expanded to 3 channels, model's 32 px
    assert torch.equal(image[0], image[1])
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        open_dataset(f"fashion-mnist:{tmp_path}", "train")


def test_shipped_subset_is_balanced():
    images, labels = open_dataset("fashion-mnist-subset").images, open_dataset("fashion-mnist-subset").labels
    assert images.shape == (1000, 28, 28) and images.dtype == np.uint8
    assert Counter(labels.tolist()) == {c: 100 for c in range(10)}


def test_stratified_subset_is_deterministic_and_balanced():
    labels = np.repeat(np.arange(4), [50, 30, 10, 6])
    a = stratified_subset(labels, 20, seed=1)
    assert np.array_equal(a, stratified_subset(labels, 20, seed=1))
    assert not np.array_equal(a, stratified_subset(labels, 20, seed=2))
    assert sorted(Counter(labels[a].tolist()).values()) == [5, 5, 5, 5]
    b = stratified_subset(labels, 40, seed=0)  # class 3 has only 6: the others take up the slack
    counts = Counter(labels[b].tolist())
    assert counts[3] == 6 and sum(counts.values()) == 40 and len(set(b)) == 40


def make_folder(root):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / cls / f"{i}.jpg")
    good = (root / "cat" / "0.jpg").read_bytes()
    (root / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "dog" / "notes.png").write_text("this is not an image")


def test_folder_with_bad_files_is_read_and_reports_them(tmp_path):
    make_folder(tmp_path)
    dataset = SafeImageFolder(tmp_path, build_transform(tiny_vit()))
    assert dataset.classes == ["cat", "dog"] and len(dataset) == 8
    skips = SkipCounter()
    seen = 0
    for batch in make_loader(dataset, batch_size=3):
        skips.update(batch)
        seen += len(batch.images)
        assert batch.images.shape[1:] == (3, 32, 32)
    assert seen == 6 and skips.count == 2
    reported = {path.split("/")[-1] for path, _ in skips.skipped}
    assert reported == {"truncated.jpg", "notes.png"}
    assert "skipped 2" in skips.report()


def test_missing_folder_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_dataset(str(tmp_path / "nowhere"))


def test_loader_subset_is_stratified():
    dataset = open_dataset("fashion-mnist-subset")
    labels = torch.cat([b.labels for b in make_loader(dataset, num_images=30, batch_size=8, seed=0)])
    assert Counter(labels.tolist()) == {c: 3 for c in range(10)}
