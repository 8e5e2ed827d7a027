"""Bad input, tried as a new user would: each gets a clear error naming the flag or file, or loses nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vitscope.cli import main

TINY = "random:vit_small_patch16_224?img_size=32&patch_size=8&embed_dim=32&depth=2&num_heads=4"


@pytest.mark.parametrize("count", ["0", "-5"])
@pytest.mark.parametrize("flag", ["--num-images", "--probe-images", "--noise-images", "--batch-size"])
def test_counts_below_one_name_the_flag(tmp_path, capsys, flag, count):
    argv = ["analyze", "--model", TINY, "--data", "fashion-mnist-subset", "--out", str(tmp_path / "o"), flag, count]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be a positive integer (at least 1), got {int(count)}" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["analyze", "demo"])
@pytest.mark.parametrize("value", ["0", "-5", "some"])
def test_spectrum_groups_takes_a_count_or_all(tmp_path, capsys, command, value):
    argv = [command, "--data", "fashion-mnist-subset", "--out", str(tmp_path / "o"), "--spectrum-groups", value]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--model", TINY] if command == "analyze" else argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --spectrum-groups: expected a positive integer or 'all', got {value!r}" in err
    assert not (tmp_path / "o").exists()


def test_a_missing_checkpoint_says_the_file_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "nope.pth"
    argv = ["analyze", "--model", f"file:{missing}", "--data", "fashion-mnist-subset", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"no such file: {missing}" in err and "arch=" not in err


def _folder_with_corrupt_images(root, per_class=12, corrupt=(("cat", 0), ("cat", 5), ("dog", 3))):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / cls / f"{i:02d}.png")
    for cls, i in corrupt:
        (root / cls / f"{i:02d}.png").write_bytes(b"not a png at all")
    return {f"{cls}/{i:02d}.png" for cls, i in corrupt}


def test_corrupt_images_in_the_subset_are_replaced_by_their_class_and_listed(tmp_path, capsys):
    corrupt = _folder_with_corrupt_images(tmp_path / "images")
    out = tmp_path / "out"
    argv = ["analyze", "--model", TINY, "--data", f"folder:{tmp_path / 'images'}", "--out", str(out),
            "--num-images", "24", "--probe-images", "1", "--batch-size", "8",
            "--metrics", "attention_distance,token_cosine", "--no-report"]  # fmt: skip
    # 24 images asked of 24 in the folder: no candidates left, so the three corrupt ones stay missing
    assert main(argv) == 0
    meta = json.loads((out / "metrics.json").read_text())["meta"]
    assert meta["num_images"] == 21 and len(meta["skipped"]) == 3

    argv[argv.index("--num-images") + 1] = "16"  # 16 of 24: every chosen image has candidates of its class
    out2 = tmp_path / "out2"
    argv[argv.index("--out") + 1] = str(out2)
    assert main(argv) == 0
    meta = json.loads((out2 / "metrics.json").read_text())["meta"]
    assert meta["num_images"] == 16, "a corrupt image in the subset must be replaced, not dropped"
    skipped = {"/".join(path.split("/")[-2:]) for path, _ in meta["skipped"]}
    assert skipped <= corrupt and len(skipped) == 2  # listed with their paths
    assert all("replaced by another image of its class" in reason for _, reason in meta["skipped"])
    printed = capsys.readouterr()
    assert (
        "skipped 2 unreadable file(s) (2 replaced by another image of their class, 0 without replacement)"
        in printed.out
    )
    assert any(name in printed.err for name in corrupt)
    rows = json.loads((out2 / "metrics.json").read_text())["rows"]
    assert {row["n"] for row in rows if row["metric"] == "token_cosine"} == {16}
