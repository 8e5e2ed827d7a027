"""--track-every under torchrun (two gloo processes on CPU): rank 0 alone measures, the run completes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.training import pretrain_args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_rank_zero_alone_tracks_under_torchrun(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", "-m", "vitscope",
        *pretrain_args(run, "--track-every", "2", method="moco", steps=4),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    tracked = [r["trained_steps"] for r in records if r.get("kind") == "track"]
    assert tracked == [0, 2, 4]  # once per measurement: rank 0 only
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert done.stdout.count("tracking: 3 measurements took") == 1
