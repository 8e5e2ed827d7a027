"""Checkpoint files that are not what they should be: each is refused with one sentence naming the file
and what was expected (exit status 2, no traceback), and nothing of the run is overwritten."""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.support.training import TINY_KWARGS, pretrain_args
from vitscope.cli import main
from vitscope.models import CheckpointError, UnsafeCheckpointError, load_model, read_checkpoint
from vitscope.pretrain.finite import nonfinite_state
from vitscope.pretrain.objectives import create_encoder


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as --threads 1 in the runs: resuming checks the thread count
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A real 4-step MAE run, checkpointed at steps 2 and 4, with the step-2 encoder kept."""
    out = tmp_path_factory.mktemp("faults") / "run"
    assert main(pretrain_args(out, "--keep-every", "2")) == 0
    return out


def _copy(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy, copy / "train_state.pt"


def _state(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _edit_state(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        state = _state(path)
        edit(state)
        torch.save(state, path)

    return apply


def _drop_zip_member(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            if not name.endswith("/data/0"):
                archive.writestr(name, data)


def _resize_first_matrix(state: dict) -> None:
    key = next(k for k, v in state["model"].items() if v.ndim == 2)
    state["model"][key] = torch.zeros(3, 5)


def _poison_weight(state: dict) -> None:
    key = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][key] = state["model"][key].clone().fill_(float("nan"))


def _resize_optimizer_moment(state: dict) -> None:
    entry = next(iter(state["optimizer"]["state"].values()))
    entry["exp_avg"] = torch.zeros(7)


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "empty": (lambda p: p.write_bytes(b""), "but it is empty (0 bytes)"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "truncated or damaged zip"),
    "random bytes": (
        lambda p: p.write_bytes(bytes([7]) + np.random.default_rng(0).bytes(4095)),
        "unrecognised binary data (first bytes 07",
    ),
    "json": (lambda p: p.write_text(json.dumps({"step": 4, "model": {}})), 'holds JSON text (starts with \'{"step": 4'),
    "text": (lambda p: p.write_text("step 4 of 4\n"), "holds text (starts with 'step 4 of 4')"),
    "html": (lambda p: p.write_text("<!DOCTYPE html><html><body>404</body></html>"), "an HTML or XML page"),
    "a pickle of a list": (lambda p: torch.save([1, 2, 3], p), "but it holds a list"),
    "another model's weights": (lambda p: torch.save({"weight": torch.ones(2)}, p), "but it lacks format, step"),
    "missing keys": (_edit_state(lambda s: s.pop("rng")), "but it lacks rng"),
    "another format": (_edit_state(lambda s: s.update(format="vitscope-finetune-state-v1")), "its format is"),
    "a step that is text": (_edit_state(lambda s: s.update(step="4")), "its 'step' entry is a str"),
    "wrong shapes": (_edit_state(_resize_first_matrix), "has shape [3, 5], this run's"),
    "a missing tensor": (_edit_state(lambda s: s["model"].pop("encoder.norm.weight")), "lacks encoder.norm.weight"),
    "optimizer of another model": (_edit_state(_resize_optimizer_moment), "optimizer exp_avg of"),
    "bad RNG state": (_edit_state(lambda s: s["rng"].update(torch=torch.zeros(3))), "RNG state is not valid"),
    "non-finite weights": (_edit_state(_poison_weight), "holds non-finite weights"),
    "zip missing a member": (_drop_zip_member, "failed locating file data/0"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_a_corrupt_train_state_is_one_sentence_and_nothing_is_overwritten(trained_run, tmp_path, capsys, kind):
    run, state_path = _copy(trained_run, tmp_path)
    corrupt, expected = CORRUPTIONS[kind]
    corrupt(state_path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(pretrain_args(run, "--resume")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert str(state_path) in err and expected in err, err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # nothing written


def test_a_resumed_run_refuses_a_finetune_state_naming_the_format(trained_run, tmp_path, capsys) -> None:
    run, state_path = _copy(trained_run, tmp_path)
    _edit_state(lambda s: s.update(format="vitscope-finetune-state-v1"))(state_path)
    assert main(pretrain_args(run, "--resume")) == 2
    assert "expected a vitscope train state (vitscope-train-state-v1)" in capsys.readouterr().err


NOT_CHECKPOINTS: dict[str, tuple[bytes, str]] = {
    "notes.txt": (b"hello world\n", "holds text (starts with 'hello world')"),
    "config.json": (b'{"a": 1}', "holds JSON text (starts with '{\"a\": 1}')"),
    "noise.bin": (bytes([9]) + np.random.default_rng(1).bytes(300), "unrecognised binary data (first bytes 09"),
    "page.pt": (b"<html><head><title>Sign in</title></head></html>", "an HTML or XML page"),
    "lfs.pth": (b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n", "a Git LFS pointer"),
    "empty.pth": (b"", "is empty (0 bytes)"),
    "weights.safetensors": (b"hello world\n", "holds text (starts with 'hello world')"),
}


@pytest.mark.parametrize("name", list(NOT_CHECKPOINTS))
def test_a_file_that_is_no_checkpoint_is_named_for_what_it_holds_not_called_unsafe(tmp_path, name) -> None:
    content, expected = NOT_CHECKPOINTS[name]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert not isinstance(err.value, UnsafeCheckpointError)
    assert str(err.value).startswith(f"{path}: expected a PyTorch checkpoint") and expected in str(err.value)
    with pytest.raises(CheckpointError, match="expected a PyTorch checkpoint"):
        load_model(f"file:{path}?arch=vit_tiny_patch16_224")


def test_a_text_file_as_a_file_spec_is_a_sentence_on_the_command_line(tmp_path, capsys) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello world\n")  # 'h' 'e' once read as a pickle memo lookup: "error: 101"
    argv = ["capture", "--model", f"file:{notes}?arch=vit_tiny_patch16_224", "--data", "fashion-mnist-subset"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"vitscope capture: error: {notes}: expected a PyTorch checkpoint (torch.save) or a safetensors file, "
        "but it holds text (starts with 'hello world')"
    )


def test_a_damaged_pickle_is_called_damaged_and_a_real_one_loads(tmp_path) -> None:
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.arange(4.0)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(read_checkpoint(path)["w"], torch.arange(4.0))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="is a truncated pickle") as err:
        read_checkpoint(path)
    assert not isinstance(err.value, UnsafeCheckpointError)


def test_safetensors_content_loads_whatever_its_suffix(tmp_path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "weights.pt"
    save_file({"w": torch.arange(3.0)}, str(path))
    assert torch.equal(read_checkpoint(path)["w"], torch.arange(3.0))


def test_nonfinite_state_names_parameters_buffers_and_optimizer_state() -> None:
    torch.manual_seed(0)
    model = create_encoder("vit_tiny_patch16_224", TINY_KWARGS)
    model.register_buffer("running_scale", torch.ones(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    optimizer.step()
    assert nonfinite_state(model, optimizer) == []
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[0, 0] = float("inf")
        model.running_scale[2] = float("nan")
    optimizer.state[model.cls_token]["exp_avg_sq"][0, 0, 5] = float("nan")
    assert nonfinite_state(model, optimizer) == [
        "parameter blocks.1.mlp.fc1.weight",
        "buffer running_scale",
        "optimizer exp_avg_sq of cls_token",
    ]


def test_a_run_killed_between_its_state_and_encoder_writes_is_made_whole_on_resume(trained_run, tmp_path) -> None:
    run, state_path = _copy(trained_run, tmp_path)
    for name in ("encoder.safetensors", "encoder.json"):  # the encoder of step 2 beside the state of step 4
        shutil.copy(run / "snapshots" / "step-0000002" / name, run / name)
    assert json.loads((run / "encoder.json").read_text())["step"] == 2
    assert main(pretrain_args(run, "--resume")) == 0  # already complete: nothing to train
    assert json.loads((run / "encoder.json").read_text())["step"] == 4
    encoder = load_file(str(run / "encoder.safetensors"))
    state = _state(state_path)["model"]
    assert encoder.keys() and all(torch.equal(v, state[f"encoder.{k}"]) for k, v in encoder.items())
    assert all(
        torch.equal(v, t)
        for v, t in zip(encoder.values(), load_file(str(trained_run / "encoder.safetensors")).values())
    )
