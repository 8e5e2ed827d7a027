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
    at_step_4 = load_file(str(FIXTURE / "run" / "encoder.safetensors"))
    assert resumed.keys() == expected.keys()
    # The fixture was written on another CPU. The key third of a qkv bias gets gradients of ~0 (softmax
    # ignores a shift shared by all keys), and AdamW turns the kernels' rounding there into updates of up
    # to ~2e-5; every other weight agrees to 1e-7. The four resumed steps move weights by ~1e-3.
    atol, key_bias_atol = 1e-5, 5e-5
    for key in expected:
        got, want = resumed[key].clone(), expected[key]  # got: its key third is checked apart, then set
        if key.endswith("attn.qkv.bias"):
            keys = slice(len(want) // 3, 2 * len(want) // 3)
            torch.testing.assert_close(got[keys], want[keys], rtol=1e-4, atol=key_bias_atol, msg=key)
            got[keys] = want[keys]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=atol, msg=key)
    moved = max(float((expected[k] - at_step_4[k]).abs().max()) for k in expected)
    assert moved > 10 * key_bias_atol  # landing within atol of the expected weights is not landing where it started
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(8))
