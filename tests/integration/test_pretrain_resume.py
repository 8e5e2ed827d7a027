"""A pretraining run killed with SIGKILL resumes from its last checkpoint and ends bit-identical."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.training import pretrain_args
from vitscope.cli import build_parser
from vitscope.commands.pretrain import build_config
from vitscope.pretrain.trainer import pretrain


def _args(out: Path, *extra: str) -> list[str]:
    """The tiny run of tests/support/training.py as a hybrid (MAE as its MIM half), 16 steps, saved every 3."""
    return pretrain_args(out, "--mim", "mae", *extra, method="hybrid", steps=16, save_every=3)


def _cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vitscope", *_args(out, *extra)]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    start = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before writing {path}: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() - start > timeout:
            raise AssertionError(f"no {path} after {timeout} s")
        time.sleep(0.01)


@pytest.mark.slow
def test_killed_run_resumes_bit_identical(tmp_path: Path) -> None:
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(killed), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(killed / "train_state.pt", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    interrupted_at = torch.load(killed / "train_state.pt", weights_only=True)["step"]
    assert 3 <= interrupted_at < 16  # killed mid-run, after a checkpoint

    resumed = subprocess.run(_cli(killed, "--resume"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    # the uninterrupted reference, same seed and settings, in this process
    parser, _ = build_parser()
    reference = tmp_path / "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (--threads 1): CPU sums depend on the thread count
    try:
        pretrain(build_config(parser.parse_args(_args(reference))))
    finally:
        torch.set_num_threads(threads)

    a, b = load_file(str(reference / "encoder.safetensors")), load_file(str(killed / "encoder.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state_a = torch.load(reference / "train_state.pt", weights_only=True)
    state_b = torch.load(killed / "train_state.pt", weights_only=True)
    assert state_a["step"] == state_b["step"] == 16
    assert all(
        torch.equal(state_a["model"][k], state_b["model"][k]) for k in state_a["model"]
    )  # heads, momentum encoder
    steps = [json.loads(line)["step"] for line in (killed / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(16))  # log truncated to the checkpoint, then continued
    meta = json.loads((killed / "encoder.json").read_text())
    assert meta["step"] == 16 and meta["method"] == "hybrid" and meta["arch_kwargs"]["num_classes"] == 0
