"""Atomic writes: whole files or nothing, usual permissions."""

from __future__ import annotations

import os

import pytest

from vitscope.io import atomic_path, write_json_atomic, write_text_atomic


def test_failed_write_keeps_old_content_and_leaves_no_temp(tmp_path):
    target = tmp_path / "results.json"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_written_files_get_umask_permissions(tmp_path):
    write_json_atomic(tmp_path / "a" / "b.json", {"x": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a" / "b.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "a" / "b.json").read_text().strip() == '{\n  "x": 1\n}'
