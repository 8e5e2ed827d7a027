"""--track-every under torchrun (two gloo processes on CPU): rank 0 alone measures, the run completes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support.torchrun import torchrun
from tests.support.training import pretrain_args


@pytest.mark.slow
def test_rank_zero_alone_tracks_under_torchrun(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [*torchrun(), "-m", "vitscope", *pretrain_args(run, "--track-every", "2", method="moco", steps=4)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    tracked = [r["trained_steps"] for r in records if r.get("kind") == "track"]
    assert tracked == [0, 2, 4]  # once per measurement: rank 0 only
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert done.stdout.count("tracking: 3 measurements took") == 1
