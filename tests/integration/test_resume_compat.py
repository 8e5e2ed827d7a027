"""A run checkpointed by an earlier vitscope resumes with this one and ends where the uninterrupted run ended.

``tests/data/resume_v1`` was written before the package was reorganised: a hybrid (MAE + MoCo v3)
run of 8 steps stopped after its step-4 checkpoint (``run/``), and the encoder the same run reached
uninterrupted (``final_encoder.safetensors``). Resuming it must be accepted (same settings, same
state layout) and must land on those weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from vitscope.cli import main

FIXTURE = Path(__file__).parents[1] / "data" / "resume_v1"


def test_checkpoint_from_before_the_reorganisation_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", run)
    args = json.loads((FIXTURE / "args.json").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fixture was written with one thread
    try:
        assert main([*args, "--out", str(run), "--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    resumed = load_file(str(run / "encoder.safetensors"))
    expected = load_file(str(FIXTURE / "final_encoder.safetensors"))
    assert resumed.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(8))
