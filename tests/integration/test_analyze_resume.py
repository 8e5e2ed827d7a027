"""`vitscope analyze --resume` after SIGKILL, a kill mid-write, Ctrl-C or a failed late stage ends with the
numbers of a run that never stopped: metrics.csv byte for byte, every array equal (one thread, CPU)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.kill import RAISE, run_stopped_at, run_vitscope
from tests.support.runs import TINY_VIT, image_folder
from vitscope.analyses import ALL_ANALYSES, AnalysisConfig, analyze
from vitscope.analyses.checkpoint import SuiteCheckpoint
from vitscope.cli import main

pytestmark = pytest.mark.slow  # real subprocesses

MODELS = {"a": TINY_VIT + "&seed=1", "b": TINY_VIT + "&seed=2"}
# 24 test images in 6 batches of 4 (2 models: 12 calls of the per-model forward), saved every 2 batches;
# every analysis but t-SNE (its stage is restored in test_every_stage_comes_back_from_a_finished_checkpoint)
ANALYSES = [name for name in ALL_ANALYSES if name != "tsne"]
COUNTS = ["--num-images", "24", "--probe-images", "16", "--noise-images", "8", "--batch-size", "4",
          "--probe-epochs", "3", "--checkpoint-every", "2", "--no-report", "--metrics", ",".join(ANALYSES)]  # fmt: skip


def argv(data: Path, out: Path, *extra: str) -> list[str]:
    words = ["analyze", "--data", f"folder:{data}", "--out", str(out), *COUNTS, *extra]
    for label, spec in MODELS.items():
        words += ["--model", f"{label}={spec}"]
    return words


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """The image folder and a run that was never stopped."""
    root = tmp_path_factory.mktemp("resume")
    data = image_folder(root / "images")
    done = run_vitscope(argv(data, root / "reference"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "\r" not in done.stderr and "analyse: 24/24 img (100 %)" in done.stderr  # a log's progress: whole lines
    return data, root / "reference"


def assert_same_run(got: Path, expected: Path) -> None:
    assert (got / "metrics.csv").read_bytes() == (expected / "metrics.csv").read_bytes()
    with np.load(got / "arrays.npz") as a, np.load(expected / "arrays.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            assert np.array_equal(a[key], b[key], equal_nan=True), key
    assert not (got.parent / f".{got.name}.partial").exists()  # committed, checkpoints gone


def resume(words: list[str]) -> int:
    """``vitscope ... --resume`` in this process, on one thread like the reference run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main([*words, "--resume"])
    finally:
        torch.set_num_threads(threads)


def meta(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())["meta"]


def test_sigkill_during_the_pass_then_resume_equals_the_run_that_never_stopped(reference, tmp_path):
    data, expected = reference
    out = tmp_path / "run"
    # the 9th forward is batch 4 of the test pass; batches 0-3 were saved after batch 3
    killed = run_stopped_at(argv(data, out), "vitscope.analyses.driver:_run_one", 9)
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists()  # nothing committed
    state = torch.load(tmp_path / ".run.partial" / "checkpoint" / "test.pt", weights_only=True)
    assert state["next_batch"] == 4 and state["seen"] == 16 and not state["done"]

    resumed = run_vitscope(argv(data, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming the unfinished run" in resumed.stderr
    assert_same_run(out, expected)
    assert meta(out)["resumed"] == ["test pass from batch 4"]
    assert meta(out)["run_id"] == json.loads((out / "manifest.json").read_text())["run_id"]


def test_sigkill_while_a_checkpoint_is_written_keeps_the_previous_one(reference, tmp_path):
    data, expected = reference
    out = tmp_path / "run"
    # torch.save calls: 1 bank chunk + 2 state at batch 1, 3 chunk + 4 state at batch 3: killed after the
    # second state was written to its temporary file, before it was renamed into place
    killed = run_stopped_at(argv(data, out), "torch:save", 4, when="after")
    assert killed.returncode == -signal.SIGKILL
    checkpoint = tmp_path / ".run.partial" / "checkpoint"
    assert list(checkpoint.glob(".test.pt.*.tmp")), "the interrupted write is a temporary file"
    assert torch.load(checkpoint / "test.pt", weights_only=True)["next_batch"] == 2  # the previous save

    resumed = run_vitscope(argv(data, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(out, expected)
    assert meta(out)["resumed"] == ["test pass from batch 2"]


def test_ctrl_c_saves_at_the_end_of_the_batch_and_says_how_to_continue(reference, tmp_path):
    data, expected = reference
    out = tmp_path / "run"
    stopped = run_stopped_at(argv(data, out), "vitscope.analyses.driver:_run_one", 5, signum=signal.SIGINT)
    assert stopped.returncode == 130
    last = stopped.stderr.strip().splitlines()[-1]
    partial = tmp_path / ".run.partial"
    assert last.startswith(f"vitscope analyze: interrupted (Ctrl-C); kept in {partial}: test pass: 3 of 6 batches")
    assert last.endswith(f"to continue, run the same command with --resume (--out {out})")
    assert "Traceback" not in stopped.stderr
    # the Ctrl-C came during batch 2: it was finished and saved before stopping
    assert torch.load(tmp_path / ".run.partial" / "checkpoint" / "test.pt", weights_only=True)["next_batch"] == 3

    assert resume(argv(data, out)) == 0
    assert_same_run(out, expected)


def test_a_failed_late_stage_keeps_what_came_before_and_resume_skips_it(reference, tmp_path):
    data, expected = reference
    out = tmp_path / "run"
    failed = run_stopped_at(argv(data, out), "vitscope.analyses.suite:noise_robustness", 2, signum=RAISE)
    assert failed.returncode == 1
    message = failed.stderr.strip().splitlines()[-1]
    assert message.startswith("error: the noise (b) stage failed: RuntimeError: injected fault; kept in")
    assert "test pass: done; train pass: done; probes of a: done; noise on a: done; probes of b: done" in message
    assert message.endswith("once the cause is fixed, run the same command with --resume (--out " + f"{out})")

    assert resume(argv(data, out)) == 0
    assert_same_run(out, expected)
    assert meta(out)["resumed"] == ["test pass (done)", "train pass (done)", "probes-0", "noise-0", "probes-1"]


def test_resume_with_other_settings_is_refused_naming_them(reference, tmp_path, capsys):
    data, _ = reference
    out = tmp_path / "run"
    killed = run_stopped_at(argv(data, out), "vitscope.analyses.driver:_run_one", 9)
    assert killed.returncode == -signal.SIGKILL
    words = argv(data, out, "--resume")
    words[words.index("--num-images") + 1] = "20"
    words[words.index("--probe-epochs") + 1] = "4"
    assert main(words) == 2
    err = capsys.readouterr().err
    assert "cannot resume: the unfinished run in" in err
    assert "config.num_images: 24 then, 20 now; config.probe_epochs: 3 then, 4 now" in err
    assert (tmp_path / ".run.partial" / "checkpoint" / "test.pt").is_file()  # the unfinished run is kept
    assert main(argv(data, out)) == 2  # neither --resume nor --overwrite: refused, not discarded
    assert "has an unfinished run in" in capsys.readouterr().err


def test_every_stage_comes_back_from_a_finished_checkpoint(reference, tmp_path):
    """A checkpoint holding every stage (t-SNE included) gives the same output again without computing any."""
    data, _ = reference
    config = AnalysisConfig(num_images=16, probe_train_images=8, noise_images=4, batch_size=8, probe_epochs=2,
                            tsne_classes=2, tsne_per_class=2)  # fmt: skip
    first = analyze(MODELS, f"folder:{data}", config, checkpoint=SuiteCheckpoint(tmp_path / "checkpoint", 1))
    again = SuiteCheckpoint(tmp_path / "checkpoint", 1)
    second = analyze(MODELS, f"folder:{data}", config, checkpoint=again)
    assert first is not None and second is not None
    assert again.restored == ["test pass (done)", "train pass (done)", "probes-0", "noise-0", "probes-1", "noise-1",
                              "tsne"]  # fmt: skip
    assert second.results.to_csv_text() == first.results.to_csv_text()
    assert sorted(second.arrays) == sorted(first.arrays) and "a/tsne_points" in first.arrays
    for key, value in first.arrays.items():
        assert second.arrays[key].dtype == value.dtype and np.array_equal(second.arrays[key], value), key
    for path in (tmp_path / "checkpoint").glob("*.pt"):
        torch.load(path, weights_only=True)  # every file loads without unpickling code
