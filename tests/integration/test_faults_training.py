"""Faults in training, tried through the real command line: divergence never replaces the last good
checkpoint, a fresh run never writes into an earlier run, bad numbers are refused naming the flag, and a
run killed (SIGKILL, Ctrl-C) at any point resumes to the same weights as an uninterrupted run."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitscope.pretrain.trainer as trainer
from tests.support.training import TINY_KWARGS, finetune_args, pretrain_args
from vitscope.cli import build_parser, main
from vitscope.commands.pretrain import build_config
from vitscope.pretrain import FinetuneConfig, ObjectiveConfig, TrainConfig, TrainingDiverged
from vitscope.pretrain.loop import TrainingInterrupted
from vitscope.pretrain.objectives import create_encoder
from vitscope.pretrain.trainer import export_encoder, pretrain


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as --threads 1: bit-identical comparisons need the same thread count
    yield
    torch.set_num_threads(threads)


def _finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in tensors.values() if v.is_floating_point())


def _state(run: Path) -> dict:
    return torch.load(run / "train_state.pt", weights_only=True)


# ------------------------------------------------------------------------------------------ divergence
@pytest.mark.parametrize("clip", ["0", "3"])
def test_a_diverging_pretrain_keeps_the_true_last_good_checkpoint(tmp_path, capsys, clip) -> None:
    run = tmp_path / "run"
    argv = pretrain_args(run, "--lr", "1000", "--clip-grad", clip, "--steps", "16", "--save-every", "2")
    assert main(argv) == 3
    message = capsys.readouterr().out.strip()
    assert message == (
        f"vitscope pretrain: gradient norm is inf at step 2; stopped before the optimizer step. "
        f"The last good checkpoint ({run / 'train_state.pt'}, step 2) was kept."
    )
    state = _state(run)
    assert state["step"] == 2 and _finite(state["model"])
    assert all(_finite(entry) for entry in state["optimizer"]["state"].values())
    assert _finite(load_file(str(run / "encoder.safetensors")))
    assert json.loads((run / "encoder.json").read_text())["step"] == 2
    # the kept state is the one before the bad step: resuming it replays that step to the same stop
    assert main([*argv, "--resume"]) == 3
    assert "gradient norm is inf at step 2" in capsys.readouterr().out
    assert _state(run)["step"] == 2


def test_a_diverging_finetune_keeps_the_true_last_good_checkpoint(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    encoder = create_encoder("vit_tiny_patch16_224", TINY_KWARGS, sincos_pos=True)
    export_encoder(tmp_path / "pretrained", encoder, TrainConfig(model_kwargs=TINY_KWARGS), step=0)
    run = tmp_path / "finetune"
    argv = finetune_args(f"file:{tmp_path / 'pretrained'}", run, "--lr", "1000", "--save-every", "1")
    assert main(argv) == 3
    message = capsys.readouterr().out.strip().splitlines()[-1]
    assert message.startswith("vitscope finetune: gradient norm is inf at step ")
    step = int(message.split(" at step ")[1].split(";")[0])
    assert message.endswith(f"The last good checkpoint ({run / 'train_state.pt'}, step {step}) was kept.")
    assert _state(run)["step"] == step and _finite(_state(run)["model"])
    assert _finite(load_file(str(run / "model.safetensors")))


@pytest.mark.parametrize("target", ["optimizer", "parameter"])
def test_state_that_goes_non_finite_with_a_finite_loss_is_never_saved(tmp_path, monkeypatch, target) -> None:
    """A fault injected after the real optimizer step of step 2: the loss and the gradient norm were
    finite, only the check before the checkpoint can see it."""
    real_step = trainer.backward_and_step
    calls = {"n": 0}

    def poisoned(loss, model, optimizer, scaler, clip):
        norm = real_step(loss, model, optimizer, scaler, clip)
        calls["n"] += 1
        if calls["n"] == 3:
            param = next(p for p in model.parameters() if p.requires_grad)
            with torch.no_grad():
                (optimizer.state[param]["exp_avg_sq"] if target == "optimizer" else param).view(-1)[0] = math.inf
        return norm

    monkeypatch.setattr(trainer, "backward_and_step", poisoned)
    parser, _ = build_parser()
    run = tmp_path / "run"
    config = build_config(parser.parse_args(pretrain_args(run, "--steps", "6", "--save-every", "1")))
    what = "optimizer exp_avg_sq of mask_token" if target == "optimizer" else "parameter mask_token"
    with pytest.raises(TrainingDiverged) as err:
        pretrain(config)
    assert str(err.value) == (
        f"non-finite values after step 2 in {what}; stopped without saving them. "
        f"The last good checkpoint ({run / 'train_state.pt'}, step 2) was kept."
    )
    state = _state(run)
    assert state["step"] == 2 and _finite(state["model"])
    assert all(_finite(entry) for entry in state["optimizer"]["state"].values())
    assert json.loads((run / "encoder.json").read_text())["step"] == 2


# ------------------------------------------------------------------------------- earlier runs' files
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(pretrain_args(run, "--keep-every", "2")) == 0
    return run


@pytest.mark.parametrize("leftover", [("encoder.safetensors", "encoder.json"), ("log.jsonl",), ("snapshots",)])
def test_a_fresh_run_refuses_a_directory_holding_an_earlier_runs_files(trained_run, tmp_path, capsys, leftover):
    run = tmp_path / "run"
    run.mkdir()
    for name in leftover:  # what an earlier run left, without its train_state.pt
        (shutil.copytree if (trained_run / name).is_dir() else shutil.copy)(trained_run / name, run / name)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(pretrain_args(run)) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"vitscope pretrain: error: {run} already holds files of an earlier run ({', '.join(leftover)}) but no "
        "train_state.pt to resume from; a new run would overwrite them: choose a new --out (or remove those files)"
    )
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_fresh_run_refuses_a_directory_holding_a_run_pointing_to_resume(trained_run, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert main(pretrain_args(run)) == 2
    assert capsys.readouterr().err.strip() == (
        f"vitscope pretrain: error: {run} already holds a run (train_state.pt, encoder.safetensors, encoder.json, "
        "log.jsonl, snapshots): continue it with --resume or choose a new --out"
    )


def test_a_fresh_finetune_refuses_a_directory_holding_a_trained_model(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"weights")
    assert main(finetune_args("file:unused", run)) == 2
    assert "already holds files of an earlier run (model.safetensors)" in capsys.readouterr().err
    assert (run / "model.safetensors").read_bytes() == b"weights"


def test_resuming_a_run_says_what_there_is_and_a_file_as_out_is_refused(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text("")
    assert main(pretrain_args(run, "--resume")) == 2
    assert f"cannot resume: no {run / 'train_state.pt'} to resume from (it holds log.jsonl)" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(pretrain_args(tmp_path / "file")) == 2
    assert "is a file; expected a run directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- flags
PRETRAIN_BAD = [
    ("--lr", "nan"), ("--lr", "inf"), ("--lr", "0"), ("--lr", "-1"), ("--blr", "nan"), ("--min-lr", "nan"),
    ("--min-lr", "-1e-5"), ("--weight-decay", "nan"), ("--weight-decay", "-0.1"), ("--clip-grad", "nan"),
    ("--clip-grad", "inf"), ("--clip-grad", "-1"), ("--epochs", "nan"), ("--epochs", "0"), ("--cl-weight", "nan"),
    ("--cl-weight", "1.5"), ("--moco-t", "nan"), ("--moco-t", "0"), ("--moco-m", "nan"), ("--moco-m", "1.01"),
    ("--mask-ratio", "nan"), ("--mask-ratio", "0"), ("--mask-ratio", "1"), ("--crop-min-scale", "nan"),
    ("--crop-min-scale", "0"), ("--crop-min-scale", "1.5"), ("--warmup-steps", "-1"), ("--seed", "-1"),
    ("--simmim-head-depth", "-1"), ("--device", "tpu"), ("--device", "cuda:x"),
]  # fmt: skip
FINETUNE_BAD = [
    ("--lr", "nan"), ("--blr", "inf"), ("--layer-decay", "nan"), ("--layer-decay", "0"), ("--layer-decay", "1.5"),
    ("--weight-decay", "nan"), ("--label-smoothing", "nan"), ("--label-smoothing", "1"), ("--warmup-epochs", "nan"),
    ("--warmup-epochs", "-1"), ("--min-lr", "nan"), ("--clip-grad", "nan"), ("--drop-path", "nan"),
    ("--drop-path", "1"), ("--crop-min-scale", "nan"), ("--crop-min-scale", "0"), ("--seed", "-1"),
    ("--device", "tpu"),
]  # fmt: skip


@pytest.mark.parametrize(
    "command,flag,value", [("pretrain", *bad) for bad in PRETRAIN_BAD] + [("finetune", *bad) for bad in FINETUNE_BAD]
)
def test_a_bad_number_or_device_is_refused_naming_the_flag(tmp_path, capsys, command, flag, value) -> None:
    out = tmp_path / "run"
    args = pretrain_args(out) if command == "pretrain" else finetune_args("file:unused", out)
    with pytest.raises(SystemExit) as exit_info:
        main([*args, f"{flag}={value}"])  # the = form: argparse takes "-1e-5" alone for an option
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: " in err and value in err and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: TrainConfig(lr=math.nan), "TrainConfig.lr"),
        (lambda: TrainConfig(clip_grad=math.inf), "TrainConfig.clip_grad"),
        (lambda: TrainConfig(min_lr=math.nan), "TrainConfig.min_lr"),
        (lambda: TrainConfig(weight_decay=math.nan), "TrainConfig.weight_decay"),
        (lambda: TrainConfig(device="tpu"), "TrainConfig.device"),
        (lambda: ObjectiveConfig(mask_ratio=math.nan), "ObjectiveConfig.mask_ratio"),
        (lambda: ObjectiveConfig(crop_min_scale=math.nan), "ObjectiveConfig.crop_min_scale"),
        (lambda: ObjectiveConfig(moco_t=0.0), "ObjectiveConfig.moco_t"),
        (lambda: FinetuneConfig(min_lr=math.nan), "FinetuneConfig.min_lr"),
        (lambda: FinetuneConfig(drop_path=math.inf), "FinetuneConfig.drop_path"),
        (lambda: FinetuneConfig(device="tpu"), "FinetuneConfig.device"),
    ],
)
def test_config_dataclasses_refuse_nan_and_out_of_range(make, field) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        make()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_cuda_on_a_machine_without_it_is_refused_before_work(tmp_path, capsys, command) -> None:
    out = tmp_path / "run"
    args = pretrain_args(out) if command == "pretrain" else finetune_args("file:unused", out)
    assert main([*args, "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"vitscope {command}: error: --device cuda: no CUDA device on this machine (use cpu)"
    )
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- kills
def test_ctrl_c_during_a_checkpoint_write_lets_it_finish_then_stops_naming_it(tmp_path, monkeypatch) -> None:
    real_save = trainer.save_train_state

    def save_with_ctrl_c(out, **kwargs):
        if kwargs["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # a real SIGINT, delivered in the middle of the write
        real_save(out, **kwargs)

    monkeypatch.setattr(trainer, "save_train_state", save_with_ctrl_c)
    parser, _ = build_parser()
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as err:
        pretrain(build_config(parser.parse_args(pretrain_args(run, "--steps", "6", "--save-every", "1"))))
    assert str(err.value) == (
        f"interrupted after 3 steps; the last checkpoint ({run / 'train_state.pt'}, step 3) is kept: "
        "continue with --resume"
    )
    assert _state(run)["step"] == 3 and json.loads((run / "encoder.json").read_text())["step"] == 3
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


STEPS = 30


def _start(run: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "vitscope", *pretrain_args(run, "--steps", str(STEPS), "--save-every", "1"), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _saved_step(run: Path) -> int:
    try:
        return int(json.loads((run / "encoder.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return 0


def _wait_past(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    start = time.monotonic()
    while _saved_step(run) <= step:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before its step {step + 1} checkpoint: {proc.stderr.read()[-2000:]}")
        assert time.monotonic() - start < timeout, f"no checkpoint past step {step} after {timeout} s"
        time.sleep(0.005)


def _kill_during_a_write(run: Path, proc: subprocess.Popen, timeout: float = 30.0) -> bool:
    """SIGKILL as soon as a temporary file of an atomic write appears; True when one was caught."""
    start = time.monotonic()
    while time.monotonic() - start < timeout and proc.poll() is None:
        if any(name.startswith(".") and name.endswith(".tmp") for name in os.listdir(run)):
            proc.kill()
            return True
    proc.kill()
    return False


@pytest.mark.slow
def test_killed_and_interrupted_runs_resume_to_the_uninterrupted_weights(tmp_path) -> None:
    rng = random.Random(20)
    run = tmp_path / "killed"
    # 1: SIGKILL during a checkpoint write (seen by the temporary file it leaves; retried if the kill missed)
    for _ in range(3):
        proc = _start(run, *(["--resume"] if (run / "train_state.pt").exists() else []))
        _wait_past(run, _saved_step(run), proc)
        _kill_during_a_write(run, proc)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        if [p.name for p in run.iterdir() if p.name.endswith(".tmp")]:
            break
    else:
        pytest.fail("no SIGKILL landed inside a checkpoint write in 3 tries")
    # 2: SIGKILL at a random point of a resumed run
    first = _state(run)["step"]
    proc = _start(run, "--resume")
    _wait_past(run, first, proc)
    time.sleep(rng.uniform(0.0, 0.3))
    proc.kill()
    proc.communicate()
    # 3: Ctrl-C
    second = _state(run)["step"]
    assert second > first
    proc = _start(run, "--resume")
    _wait_past(run, second, proc)
    time.sleep(rng.uniform(0.0, 0.2))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vitscope pretrain: interrupted after "), err
    kept = _state(run)
    assert lines[0].endswith(
        f"the last checkpoint ({run / 'train_state.pt'}, step {kept['step']}) is kept: continue with --resume"
    )
    assert second < kept["step"] < STEPS and _finite(kept["model"])
    # 4: to the end
    proc = _start(run, "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]  # the killed writes' leftovers are gone

    parser, _ = build_parser()
    reference = tmp_path / "reference"
    pretrain(build_config(parser.parse_args(pretrain_args(reference, "--steps", str(STEPS), "--save-every", "1"))))
    a, b = load_file(str(reference / "encoder.safetensors")), load_file(str(run / "encoder.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state_a, state_b = _state(reference), _state(run)
    assert state_a["step"] == state_b["step"] == STEPS
    assert all(torch.equal(state_a["model"][k], state_b["model"][k]) for k in state_a["model"])
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(STEPS))


# ------------------------------------------------------------------------------ full disk, two writers
@pytest.fixture(params=["800k", "1200k", "1700k"])
def small_disk(request, tmp_path):
    """A small tmpfs (root only) that fills up while the tiny run writes its checkpoints and snapshots:
    800 KiB in the first encoder write, 1200 KiB in the second state write, 1700 KiB in the fourth."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={request.param}", "tmpfs", str(disk)]
    if subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory) -> Path:
    reference = tmp_path_factory.mktemp("reference") / "run"
    assert main(pretrain_args(reference, "--steps", "6", "--save-every", "1", "--keep-every", "1")) == 0
    return reference


def test_a_full_disk_keeps_the_last_checkpoint_and_resumes_to_the_same_weights(
    small_disk, uninterrupted_run, capsys
) -> None:
    run = small_disk / "run"
    argv = pretrain_args(run, "--steps", "6", "--save-every", "1", "--keep-every", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    kept = _state(run)
    assert err.startswith(f"vitscope pretrain: error: cannot write the run in {run} after "), err
    assert f": No space left on device); the last checkpoint ({run / 'train_state.pt'}, step {kept['step']}) " in err
    assert err.endswith("is kept: make room and continue with --resume") and len(err.splitlines()) == 1
    assert 1 <= kept["step"] < 6 and _finite(kept["model"])
    assert not list(run.rglob("*.tmp"))  # no half-written file left
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)  # room made
    assert main([*argv, "--resume"]) == 0
    for name in ("encoder.safetensors", "snapshots/step-0000001/encoder.safetensors"):
        a, b = load_file(str(uninterrupted_run / name)), load_file(str(run / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_second_writer_of_a_run_is_refused_naming_the_first(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    first = _start(run)
    try:
        _wait_past(run, 0, first)
        assert main(pretrain_args(run, "--steps", str(STEPS), "--save-every", "1", "--resume")) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"vitscope pretrain: error: {run} is being written by another process (pid {first.pid} ")
        assert "vitscope pretrain --method mae" in err and err.endswith("wait for it to finish or choose another --out")
    finally:
        first.kill()
        first.communicate()
