"""One command-line vocabulary: every flag explained with its default, --version, --model-kwargs as key=value
or JSON, --warmup-steps or --warmup-epochs (not both), --model as a spec in every command, capture's table
without NaN, finetune in %, no progress frames in logs, and --resume extending a finished schedule."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from tests.support.kill import child_env
from tests.support.runs import TINY_VIT, image_folder
from tests.support.training import TINY_KWARGS, finetune_args, pretrain_args
from vitscope import __version__
from vitscope.cli import build_parser, main


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser, _ = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _flags():
    for name, command in _subparsers().items():
        for action in command._actions:
            if action.option_strings and action.dest != "help":
                yield name, command, action


@pytest.mark.parametrize("name,command,action", list(_flags()), ids=lambda x: getattr(x, "dest", x))
def test_every_flag_has_help_that_shows_its_default(name, command, action):
    assert action.help, f"{name} {action.option_strings[0]} has no help text"
    text = command._get_formatter()._expand_help(action)  # the text `vitscope NAME --help` prints for the flag
    if action.default not in (None, False):
        assert "default" in text, (name, action.dest, text)  # "(default: X)", added by the formatter when not said


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"vitscope {__version__}"


def test_model_kwargs_take_key_value_items_as_timm_scripts_do_and_json():
    parser, _ = build_parser()
    items = [f"{k}={v}" for k, v in TINY_KWARGS.items()]
    as_items = parser.parse_args(["pretrain", "--method", "mae", "--out", "x", "--model-kwargs", *items])
    as_json = parser.parse_args(
        ["pretrain", "--method", "mae", "--out", "x", "--model-kwargs", json.dumps(TINY_KWARGS)]
    )
    assert as_items.model_kwargs == as_json.model_kwargs == TINY_KWARGS
    tuple_and_text = parser.parse_args(
        ["finetune", "--model", "m:x", "--out", "x", "--model-kwargs", "a=(2,2)", "b=gelu"]
    )
    assert tuple_and_text.model_kwargs == {"a": (2, 2), "b": "gelu"}


def test_bad_model_kwargs_and_both_warmups_are_refused_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["pretrain", "--method", "mae", "--out", "x", "--model-kwargs", "depth"])
    assert (
        stop.value.code == 2
        and "--model-kwargs: expected KEY=VALUE or a JSON object, got 'depth'" in capsys.readouterr().err
    )
    for command in (["pretrain", "--method", "mae"], ["finetune", "--model", "file:x"]):
        with pytest.raises(SystemExit) as stop:
            main([*command, "--out", "x", "--warmup-steps", "3", "--warmup-epochs", "1"])
        assert stop.value.code == 2 and "not allowed with argument --warmup-steps" in capsys.readouterr().err


def test_pretrain_model_is_a_spec_and_other_kinds_are_refused(tmp_path, capsys):
    assert main(pretrain_args(tmp_path / "run", "--model", "file:runs/x")) == 2
    err = capsys.readouterr().err
    assert "--model file:runs/x: pretrain starts from an untrained timm architecture; give random:NAME" in err
    assert not (tmp_path / "run").exists()


def test_capture_prints_a_dash_where_depth_0_has_no_attention_and_progress_lines_in_a_log(tmp_path):
    data = image_folder(tmp_path / "images", classes=2, per_class=4)
    argv = ["capture", "--model", TINY_VIT, "--data", f"folder:{data}", "--num-images", "6", "--batch-size", "3"]
    done = subprocess.run([sys.executable, "-m", "vitscope", *argv], capture_output=True, text=True,
                          env=child_env({"VITSCOPE_PROGRESS_INTERVAL": "0"}), timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.split()[:1] in (["0"], ["1"])}
    assert rows["0"][-1] == "—" and float(rows["1"][-1]) > 0 and "nan" not in done.stdout
    # stderr is a pipe here: whole lines (a line per batch at interval 0), no carriage-return frames
    assert "\r" not in done.stderr
    assert [line.split(" [")[0] for line in done.stderr.splitlines() if line.startswith("capture:")] == [
        "capture: 1/2 batch (50 %)", "capture: 2/2 batch (100 %)"]  # fmt: skip


def test_pretrain_resume_extends_a_finished_schedule_and_refuses_a_shorter_one(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(pretrain_args(run, "--steps", "4")) == 0
    assert main(pretrain_args(run, "--steps", "6", "--resume")) == 0
    assert "pretrain mae: 6 steps" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines() if "loss" in line]
    assert steps == list(range(6))
    assert main(pretrain_args(run, "--steps", "5", "--resume")) == 2
    assert "the run is at step 6, past the 5 steps asked for" in capsys.readouterr().err


def test_warmup_in_epochs_and_finetune_in_percent_extended_by_resume(tmp_path, capsys):
    import torch

    run = tmp_path / "pretrain"
    assert main(pretrain_args(run, "--steps", "4", "--warmup-epochs", "0.5")) == 0  # 96 images / 8: 12 steps an epoch
    state = torch.load(run / "train_state.pt", weights_only=True)
    assert state["scheduler"]["warmup_steps"] == 6
    tuned = tmp_path / "finetune"
    assert main(finetune_args(f"file:{run}", tuned, "--epochs", "1", "--warmup-steps", "2")) == 0
    out = capsys.readouterr().out
    first = json.loads((tuned / "metrics.json").read_text())["top1_per_epoch"]
    assert f"finetune: top-1 per epoch [{100 * first[0]:.2f}%]" in out and "epoch 1/1: test top-1" in out
    assert main(finetune_args(f"file:{run}", tuned, "--epochs", "2", "--warmup-steps", "2", "--resume")) == 0
    again = json.loads((tuned / "metrics.json").read_text())["top1_per_epoch"]
    assert len(again) == 2 and again[0] == first[0]


def test_pretrain_spec_options_go_to_timm_under_model_kwargs():
    from vitscope.commands.pretrain import build_config

    parser, _ = build_parser()
    base = ["pretrain", "--method", "mae", "--out", "x", "--model", "random:vit_tiny_patch16_224?img_size=16&depth=2"]
    config = build_config(parser.parse_args([*base, "--model-kwargs", "depth=3"]))
    assert config.arch == "vit_tiny_patch16_224" and config.model_kwargs == {"img_size": 16, "depth": 3}
    assert config.objective.simmim_head_depth == 0  # the official linear head unless asked
    config = build_config(parser.parse_args([*base, "--simmim-head-depth", "2", "--decoder-dim", "48"]))
    assert (config.objective.simmim_head_depth, config.objective.decoder_dim) == (2, 48)
