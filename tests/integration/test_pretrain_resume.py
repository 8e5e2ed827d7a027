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

from vitscope.cli import build_parser
from vitscope.commands.pretrain import build_config
from vitscope.pretrain.trainer import pretrain

ARGS = [
    "pretrain",
    "--method",
    "hybrid",
    "--mim",
    "mae",
    "--model",
    "vit_tiny_patch16_224",
    "--model-kwargs",
    json.dumps({"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}),
    "--data",
    "fashion-mnist-subset",
    "--num-images",
    "96",
    "--steps",
    "16",
    "--batch-size",
    "8",
    "--lr",
    "1e-3",
    "--save-every",
    "3",
    "--moco-dim",
    "32",
    "--moco-mlp-dim",
    "64",
    "--decoder-dim",
    "32",
    "--decoder-depth",
    "1",
    "--decoder-heads",
    "2",
    "--no-progress",
    "--seed",
    "3",
    "--threads",
    "1",
]


def _cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vitscope", *ARGS, "--out", str(out), *extra]


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
        pretrain(build_config(parser.parse_args([*ARGS, "--out", str(reference)])))
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
