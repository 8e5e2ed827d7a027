"""`torchrun --nproc_per_node=2 -m vitscope analyze` (gloo, CPU) writes the same results as one process.

The batches are shared out whole (batch k to rank k mod 2), every reducer merges on rank 0, and rank 0
alone writes the run directory; so every value of metrics.csv — moments and their standard errors,
CKA, spectra, probes, noise drops — equals the single-process run's within 1e-5 relative. (The
smallest singular values of a CNN stage are float32 noise that differs between any two runs, as oneDNN's
convolutions do not round identically every time: they are compared at the precision of the largest.)
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.support.runs import TINY_VIT, image_folder

pytestmark = pytest.mark.slow

MODELS = ["--model", f"a={TINY_VIT}&seed=1", "--model", f"b={TINY_VIT}&seed=2", "--model", "cnn=random:resnet18"]


def analyze_argv(data: Path, out: Path) -> list[str]:
    return ["analyze", *MODELS, "--data", f"folder:{data}", "--out", str(out), "--num-images", "60",
            "--probe-images", "36", "--noise-images", "12", "--batch-size", "8", "--probe-epochs", "5",
            "--no-report"]  # fmt: skip


def read_rows(path: Path) -> dict[tuple, tuple[float, str]]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    keyed = {}
    for row in rows:
        key = tuple((k, v) for k, v in row.items() if k not in ("value", "stderr"))
        keyed[key] = (float(row["value"]), row["stderr"])
    return keyed


def test_two_gloo_processes_give_the_single_process_results(tmp_path):
    data = image_folder(tmp_path / "images", classes=4, per_class=30)
    single, split = tmp_path / "single", tmp_path / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process in both runs
    single_command = [sys.executable, "-m", "vitscope", *analyze_argv(data, single)]
    run = subprocess.run(single_command, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vitscope",
               *analyze_argv(data, split)]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("analysed 3 model(s) on 60 images") == 1  # rank 0 alone reports and writes
    expected, got = read_rows(single / "metrics.csv"), read_rows(split / "metrics.csv")
    assert got.keys() == expected.keys() and len(got) > 500
    metrics = {dict(key)["metric"] for key in got}
    assert {"cka", "linear_probe_top1", "noise_drop", "singular_values", "attention_entropy"} <= metrics
    scale = {}  # a spectrum's values are as precise as its largest one (the smallest are float32 noise)
    for key, (value, _) in expected.items():
        row = dict(key)
        if row["metric"] == "singular_values":
            scale[(row["model"], row["layer"])] = max(scale.get((row["model"], row["layer"]), 0.0), abs(value))
    for key, (value, stderr) in expected.items():
        row = dict(key)
        other, other_stderr = got[key]
        size = max(
            abs(value), scale.get((row["model"], row["layer"]), 0.0) if row["metric"] == "singular_values" else 0
        )
        assert abs(other - value) <= 1e-5 * size + 1e-12, (row, value, other)
        if stderr:  # a standard error is known to the precision of the values it comes from
            assert abs(float(other_stderr) - float(stderr)) <= 1e-5 * max(size, float(stderr)) + 1e-12, row
    arrays = [np.load(path / "arrays.npz") for path in (single, split)]
    np.testing.assert_array_equal(arrays[1]["a/attention_rows"], arrays[0]["a/attention_rows"])
    for name in ("a/attention_peaks", "a/tsne_points", "b/localisation"):
        np.testing.assert_allclose(arrays[1][name], arrays[0][name], rtol=1e-5, atol=1e-6)
