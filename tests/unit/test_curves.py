"""`vitscope curves`: learning curves from track records or kept encoders measured afresh, and their files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from tests.support.training import pretrain_args
from vitscope.cli import main


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_curves_from_logs_and_from_kept_encoders_agree(tmp_path: Path, capsys) -> None:
    tracked, kept = tmp_path / "tracked", tmp_path / "kept"
    assert main(pretrain_args(tracked, "--track-every", "2", "--keep-every", "2", method="simmim", steps=4)) == 0
    assert main(pretrain_args(kept, "--keep-every", "2", method="simmim", steps=4)) == 0  # same weights, untracked
    out = tmp_path / "curves"
    assert main(["curves", str(tracked), f"other={kept}", "--out", str(out), "--threads", "1"]) == 0
    assert "tracked: 3 points (log)" in capsys.readouterr().out
    rows = _rows(out / "curves.csv")
    logged = {(r["trained_steps"], r["key"]): float(r["value"]) for r in rows if r["run"] == "tracked"}
    fresh = {(r["trained_steps"], r["key"]): float(r["value"]) for r in rows if r["run"] == "other"}
    assert {s for s, _ in logged} == {"0", "2", "4"}
    assert {s for s, _ in fresh} == {"2", "4", "control"}  # kept encoders, and a random model of the arch
    for step in ("2", "4"):
        for key in ("knn_top1", "attention_entropy/late", "effective_rank/block1", "embedding_spread"):
            assert fresh[(step, key)] == pytest.approx(logged[(step, key)], rel=1e-5, abs=1e-9)
    page = (out / "curves.html").read_text()
    assert "<svg" in page and "tracked" in page and "other" in page and "http" not in page.split("<svg", 1)[0]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "curves.svg").read_text().lstrip().startswith("<?xml")


def test_curves_refuses_what_is_not_a_run(tmp_path: Path, capsys) -> None:
    assert main(["curves", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert f"{tmp_path / 'missing'}: not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["curves", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no track records in log.jsonl (train with --track-every N)" in err and err.count("\n") == 1
    assert main(["curves", str(tmp_path / "empty"), "--blocks", "middle", "--out", str(tmp_path / "o")]) == 2
    assert "--blocks middle: expected late, early or blockN" in capsys.readouterr().err


def test_a_torn_last_log_line_is_skipped_and_a_torn_middle_one_named(tmp_path: Path) -> None:
    from vitscope.pretrain.curves import log_points

    record = {"step": 1, "kind": "track", "trained_steps": 2, "epoch": 0.5, "metrics": {"knn_top1": 0.5}}
    (tmp_path / "log.jsonl").write_text(json.dumps(record) + '\n{"step": 2, "ki')
    assert log_points(tmp_path) == [{"trained_steps": 2, "epoch": 0.5, "metrics": {"knn_top1": 0.5}}]
    (tmp_path / "log.jsonl").write_text('{"step": 2, "ki\n' + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=r"log.jsonl: line 1 is not JSON"):
        log_points(tmp_path)
