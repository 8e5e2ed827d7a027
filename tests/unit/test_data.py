"""Data: IDX files, image folders with bad files, stratified subsets, per-model transforms."""

from __future__ import annotations

import gzip
import struct
from collections import Counter

import numpy as np
import pytest
import torch

from tests.support.images import make_folder
from tests.support.models import tiny_vit
from vitscope.data import (
    Replaced,
    ReplacingSubset,
    SafeImageFolder,
    SkipCounter,
    build_transform,
    collate_skipping,
    make_loader,
    open_dataset,
    read_idx,
    split_choices,
    stratified_choice,
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
    assert Counter(labels.tolist()) == dict.fromkeys(range(10), 100)


def test_stratified_subset_is_deterministic_and_balanced():
    labels = np.repeat(np.arange(4), [50, 30, 10, 6])
    a = stratified_subset(labels, 20, seed=1)
    assert np.array_equal(a, stratified_subset(labels, 20, seed=1))
    assert not np.array_equal(a, stratified_subset(labels, 20, seed=2))
    assert sorted(Counter(labels[a].tolist()).values()) == [5, 5, 5, 5]
    b = stratified_subset(labels, 40, seed=0)  # class 3 has only 6: the others take up the slack
    counts = Counter(labels[b].tolist())
    assert counts[3] == 6 and sum(counts.values()) == 40 and len(set(b)) == 40


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
    assert Counter(labels.tolist()) == dict.fromkeys(range(10), 3)


def _reference_stratified_subset(labels, num_items, seed):
    """The selection rule written out plainly: classes round-robin, each in a seeded random order."""
    rng = np.random.default_rng(seed)
    if num_items >= len(labels):
        return np.arange(len(labels))
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    chosen, depth = [], 0
    while len(chosen) < num_items:
        for members in per_class:
            if depth < len(members) and len(chosen) < num_items:
                chosen.append(int(members[depth]))
        depth += 1
    return np.sort(chosen)


def test_stratified_choice_picks_the_stratified_subset_and_replacements_of_the_same_class():
    labels = np.random.default_rng(3).integers(0, 4, 200)
    for seed, n in ((0, 40), (1, 7), (2, 150)):
        choice = stratified_choice(labels, n, seed)
        assert np.array_equal(choice.indices, _reference_stratified_subset(labels, n, seed))
        chosen = set(choice.indices.tolist())
        first = []
        for index in choice.indices.tolist():
            candidates = list(choice.candidates(index))
            assert all(labels[c] == labels[index] and c not in chosen for c in candidates)
            assert (
                len(candidates)
                == len(set(candidates))
                == int((labels == labels[index]).sum()) - sum(labels[i] == labels[index] for i in chosen)
            )
            if candidates:
                first.append(candidates[0])
        if n == 40:  # every class has a reserve larger than its chosen: first candidates are all different
            assert len(first) == len(set(first)) == n


def test_replacing_subset_serves_a_readable_image_of_the_same_class(tmp_path):
    make_folder(tmp_path)  # cat: 0,1,2.jpg + truncated.jpg; dog: 0,1,2.jpg + notes.png
    dataset = SafeImageFolder(tmp_path, build_transform(tiny_vit()))
    names = [path.split("/")[-2] + "/" + path.split("/")[-1] for path, _ in dataset.samples]
    bad = [names.index("cat/truncated.jpg"), names.index("dog/notes.png")]
    choice = next(  # a seed whose subset holds both bad files
        c for c in (stratified_choice(dataset.labels, 4, seed=seed) for seed in range(100))
        if set(bad) <= set(c.indices.tolist())
    )  # fmt: skip
    items = [ReplacingSubset(dataset, choice)[k] for k in range(4)]
    replaced = [item for item in items if isinstance(item, Replaced)]
    assert len(replaced) == 2 and all(isinstance(item, (tuple, Replaced)) for item in items)
    for item in replaced:
        (skipped,) = item.skipped
        assert skipped.path.split("/")[-2] == dataset.classes[item.item[1]]  # replaced within its class
    batch = collate_skipping(items)
    assert len(batch.images) == 4 and len(batch.skipped) == 2


def test_split_choices_from_one_folder_never_share_an_image():
    labels = np.repeat(np.arange(3), 20)
    test, train = split_choices(labels, 60, labels, 60, same_source=True, num_test=15, num_train=15, seed=0)
    test_side = set(test.indices.tolist()) | {c for i in test.indices.tolist() for c in test.candidates(i)}
    train_side = set(train.indices.tolist()) | {c for i in train.indices.tolist() for c in train.candidates(i)}
    assert not test_side & train_side
    assert all(list(test.candidates(i)) for i in test.indices.tolist())  # the test split keeps replacements
