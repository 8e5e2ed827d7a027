"""`vitscope capture` end to end on a tiny image folder with bad files."""

from __future__ import annotations

import re

from tests.support.images import make_folder
from vitscope.cli import main


def test_capture_cli_prints_every_layer_and_skips(tmp_path, capsys):
    make_folder(tmp_path / "images")
    code = main(
        [
            "capture",
            "--model",
            "random:vit_tiny_patch16_224",
            "--data",
            f"folder:{tmp_path / 'images'}",
            "--num-images",
            "8",
            "--batch-size",
            "4",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "12 layers, 3 heads, 1 prefix tokens" in out
    assert "6 images; skipped 2 unreadable file(s)" in out
    depths = [int(m.group(1)) for m in re.finditer(r"^\s+(\d+)\s+197x192", out, flags=re.M)]
    assert depths == list(range(13))


def test_capture_cli_bad_data_names_path(tmp_path, capsys):
    code = main(["capture", "--model", "random:vit_tiny_patch16_224", "--data", f"folder:{tmp_path / 'missing'}"])
    assert code == 2
    assert "missing" in capsys.readouterr().err
