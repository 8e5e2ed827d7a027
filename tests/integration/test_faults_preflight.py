"""Checks before the long pass, through the real CLI: tiny random-weight timm ViTs saved to files, small
image folders made here. Each bad input is refused in one sentence before any work, or the run adapts
(counts, analyses) and says so in a note."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.support.results import make_results, write_results_dir
from tests.support.runs import image_folder
from vitscope.cli import main

ARCH = "vit_small_patch16_224"
SMALL = ["--batch-size", "4", "--probe-epochs", "2", "--no-report"]


def _save_vit(path: Path, seed: int, **shape) -> str:
    """A random timm ViT saved as safetensors; its ``file:`` spec."""
    torch.manual_seed(seed)
    save_file(timm.create_model(ARCH, pretrained=False, num_classes=0, embed_dim=32, **shape).state_dict(), str(path))
    options = "&".join(f"{k}={v}" for k, v in shape.items() if k != "img_size")  # img_size is read off the weights
    return f"file:{path}?arch={ARCH}&embed_dim=32&{options}"


@pytest.fixture(scope="module")
def vits(tmp_path_factory) -> dict[str, str]:
    """cl, mim and control: 2 blocks, 4 heads, 4×4 tokens of 8 px; big: 4 blocks, 2 heads, 4×4 tokens of 16 px."""
    root = tmp_path_factory.mktemp("models")
    small = dict(img_size=32, patch_size=8, depth=2, num_heads=4)
    specs = {label: _save_vit(root / f"{label}.safetensors", seed, **small)
             for seed, label in enumerate(("cl", "mim", "control"))}  # fmt: skip
    specs["big"] = _save_vit(root / "big.safetensors", 9, img_size=64, patch_size=16, depth=4, num_heads=2)
    return specs


def _flat_folder(root: Path, count: int = 12) -> Path:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    return root


def _analyze(out: Path, data: Path, models: dict[str, str], *extra: str) -> int:
    argv = ["analyze", "--data", f"folder:{data}", "--out", str(out), *extra]
    for label, spec in models.items():
        argv += ["--model", f"{label}={spec}"]
    return main(argv)


def _meta_and_metrics(out: Path) -> tuple[dict, set[str]]:
    data = json.loads((out / "metrics.json").read_text())
    return data["meta"], {row["metric"] for row in data["rows"]}


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------ counts
def test_a_folder_smaller_than_the_default_counts_runs_on_what_it_holds(tmp_path, vits, capsys):
    data = image_folder(tmp_path / "images", classes=3, per_class=8)  # 24 images and one unreadable file
    out = tmp_path / "out"
    assert _analyze(out, data, {"cl": vits["cl"]}, "--metrics", "nmi,linear_probe", *SMALL) == 0
    err = capsys.readouterr().err
    assert ("note: the data holds 25 images, fewer than the 512 test + 2000 probe images asked (--num-images, "
            "--probe-images): using 12 for the metrics and 13 for the probes") in err  # fmt: skip
    meta, metrics = _meta_and_metrics(out)
    assert meta["probe_train_images"] == 13 and meta["num_images"] in (11, 12)  # the unreadable file may be chosen
    assert {"nmi", "linear_probe_top1"} <= metrics


# ------------------------------------------------------------------------------------------ roles
def test_a_control_of_another_architecture_is_refused_before_the_pass(tmp_path, vits, capsys):
    data = image_folder(tmp_path / "images", classes=2, per_class=6)
    out = tmp_path / "out"
    models = {"cl": vits["cl"], "mim": vits["mim"], "random": vits["big"]}
    roles = ["--cl", "cl", "--mim", "mim", "--control", "random"]
    assert _analyze(out, data, models, *roles, *SMALL) == 2
    assert _error_line(capsys.readouterr().err) == (
        "vitscope analyze: error: the control 'random' (vit, 4 blocks, 2 heads, 4×4 tokens of 16×16 px) is not the "
        "architecture of the CL model 'cl' (vit, 2 blocks, 4 heads, 4×4 tokens of 8×8 px): the control must be an "
        "untrained copy of the CL model's architecture"
    )
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize(
    ("roles", "message"),
    [
        (["--cl", "cl", "--mim", "cl"], "--cl and --mim both name 'cl': each role needs its own model"),
        (["--cl", "cl", "--mim", "mim", "--control", "moco"], "--control 'moco' is not one of the models: cl, mim"),
    ],
)
def test_role_labels_must_name_distinct_models(tmp_path, vits, capsys, roles, message):
    data = image_folder(tmp_path / "images", classes=2, per_class=6)
    assert _analyze(tmp_path / "out", data, {"cl": vits["cl"], "mim": vits["mim"]}, *roles, *SMALL) == 2
    assert _error_line(capsys.readouterr().err) == f"vitscope analyze: error: {message}"


def test_claims_refuses_one_model_in_two_roles(tmp_path, capsys):
    out = write_results_dir(tmp_path / "run", make_results(("cl", "mim")), arrays={})
    assert main(["claims", str(out), "--cl", "cl", "--mim", "mim", "--control", "cl"]) == 2
    assert _error_line(capsys.readouterr().err) == (
        "vitscope claims: error: --cl and --control both name 'cl': each role needs its own model"
    )


# ------------------------------------------------------------------------------------------ labels
def test_a_flat_folder_skips_the_analyses_that_need_labels(tmp_path, vits, capsys):
    data = _flat_folder(tmp_path / "flat")
    out = tmp_path / "out"
    assert _analyze(out, data, {"cl": vits["cl"]}, "--num-images", "8", *SMALL) == 0
    assert (f"note: linear_probe, noise, tsne skipped: need images of at least two classes and folder:{data} has "
            "no class labels (a flat folder, no class sub-folders)") in capsys.readouterr().err  # fmt: skip
    meta, metrics = _meta_and_metrics(out)
    assert "nmi" in metrics and not {"linear_probe_top1", "noise_drop"} & metrics
    assert not {"linear_probe", "noise", "tsne"} & set(meta["analyses"])


def test_a_flat_folder_refuses_a_named_probe(tmp_path, vits, capsys):
    data = _flat_folder(tmp_path / "flat")
    assert _analyze(tmp_path / "out", data, {"cl": vits["cl"]}, "--metrics", "nmi,linear_probe", *SMALL) == 2
    assert _error_line(capsys.readouterr().err) == (
        f"vitscope analyze: error: linear_probe cannot run: needs images of at least two classes and folder:{data} "
        "has no class labels (a flat folder, no class sub-folders); leave it out of the analyses"
    )


def test_a_class_of_one_image_stays_in_the_probes_training_with_a_note(tmp_path, vits, capsys):
    data = image_folder(tmp_path / "images", classes=2, per_class=8)
    (data / "solo").mkdir()
    Image.fromarray(np.full((40, 40, 3), 200, dtype=np.uint8)).save(data / "solo" / "only.png")
    out = tmp_path / "out"
    assert _analyze(out, data, {"cl": vits["cl"]}, "--metrics", "linear_probe", "--num-images", "8",
                    "--probe-images", "8", *SMALL) == 0  # fmt: skip
    assert "note: class 'solo' has 1 image(s): kept for the probe's training, not in the test images" in (
        capsys.readouterr().err
    )


def test_without_a_probe_unused_images_replace_unreadable_ones(tmp_path, vits):
    data = image_folder(tmp_path / "images", classes=2, per_class=12)
    (data / "class0" / "broken.png").unlink()
    for cls in ("class0", "class1"):  # half of each class unreadable: every chosen one has a readable stand-in
        for i in range(0, 12, 2):
            (data / cls / f"{i:02d}.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    assert _analyze(out, data, {"cl": vits["cl"]}, "--metrics", "nmi", "--num-images", "12", *SMALL) == 0
    meta, _ = _meta_and_metrics(out)
    assert meta["num_images"] == 12 and meta["skipped"]
    assert all("replaced by another image of its class" in reason for _, reason in meta["skipped"])


# ------------------------------------------------------------------------------------------ flags
@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--noise-norm", "nan", "must be a finite number, got 'nan'"),
        ("--noise-norm", "inf", "must be a finite number, got 'inf'"),
        ("--noise-norm", "-0.5", "must be in [0, ∞), got -0.5"),
        ("--seed", "-1", "must be a non-negative integer (at least 0), got -1"),
        ("--device", "tpu", "unknown device 'tpu'; expected auto, cpu, cuda, cuda:N or mps"),
    ],
)
def test_bad_numbers_and_devices_are_refused_naming_the_flag(tmp_path, capsys, flag, value, message):
    argv = ["analyze", "--model", "random:vit_tiny_patch16_224", "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "flag", "value", "message"),
    [
        ("demo", "--device", "tpu", "unknown device 'tpu'; expected auto, cpu, cuda, cuda:N or mps"),
        ("demo", "--seed", "-3", "must be a non-negative integer (at least 0), got -3"),
        ("capture", "--seed", "-3", "must be a non-negative integer (at least 0), got -3"),
    ],
)
def test_demo_and_capture_refuse_bad_flags_too(tmp_path, capsys, command, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--out" if command == "demo" else "--split", str(tmp_path) if command == "demo" else "test",
              flag, value])  # fmt: skip
    assert exit_info.value.code == 2
    assert f"argument {flag}: {message}" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_refused_before_work(tmp_path, vits, capsys):
    data = image_folder(tmp_path / "images", classes=2, per_class=4)
    assert _analyze(tmp_path / "out", data, {"cl": vits["cl"]}, "--device", "cuda", *SMALL) == 2
    assert _error_line(capsys.readouterr().err) == (
        "vitscope analyze: error: --device cuda: no CUDA device on this machine (use cpu)"
    )


def test_noise_alone_brings_its_probe_and_writes_every_band(tmp_path, vits, capsys):
    data = image_folder(tmp_path / "images", classes=2, per_class=8)
    out = tmp_path / "out"
    assert _analyze(out, data, {"cl": vits["cl"]}, "--metrics", "noise", "--num-images", "8", "--probe-images", "8",
                    "--noise-images", "4", *SMALL) == 0  # fmt: skip
    assert "note: linear_probe added: noise robustness scores the last layer's linear probe" in capsys.readouterr().err
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert sorted(r["band"] for r in rows if r["metric"] == "noise_drop") == [0, 1, 2, 3, 4]


def test_batches_too_small_for_cka_skip_it_with_a_note_or_refuse_it_by_name(tmp_path, vits, capsys):
    data = image_folder(tmp_path / "images", classes=2, per_class=6)
    out = tmp_path / "out"
    models = {"cl": vits["cl"], "mim": vits["mim"]}
    small = ["--num-images", "8", "--probe-images", "4", "--probe-epochs", "2", "--no-report", "--batch-size", "2"]
    assert _analyze(out, data, models, *small) == 0
    assert ("note: cka, localisation skipped: need batches of at least 4 images for the unbiased HSIC of minibatch "
            "CKA (--batch-size 2)") in capsys.readouterr().err  # fmt: skip
    _, metrics = _meta_and_metrics(out)
    assert "nmi" in metrics and not {"cka", "spatial_self_cka"} & metrics
    assert _analyze(tmp_path / "out2", data, models, *small, "--metrics", "nmi,cka") == 2
    assert _error_line(capsys.readouterr().err).startswith(
        "vitscope analyze: error: cka cannot run: needs batches of at least 4 images"
    )


# ------------------------------------------------------------------------------------------ claims
def test_claims_without_metrics_json_do_not_hold_on_missing_evidence(tmp_path, capsys):
    out = write_results_dir(tmp_path / "run", make_results(("cl", "mim")), arrays={})
    (out / "manifest.json").unlink()  # a directory written by hand (a committed run missing a file is refused)
    (out / "metrics.json").unlink()
    assert main(["claims", str(out), "--cl", "cl", "--mim", "mim"]) == 0
    captured = capsys.readouterr()
    assert f"note: {out / 'metrics.json'} is missing: the verdicts rest on metrics.csv alone" in captured.err
    record = json.loads((out / "claims.json").read_text())
    assert record["verdicts"][1]["status"] == "not measured"
    assert " 2  not measured " in captured.out


# ------------------------------------------------------------------------------------------ CLI errors
def test_a_system_error_is_one_line_naming_the_path(tmp_path, capsys):
    out = write_results_dir(tmp_path / "run", make_results(("cl", "mim")), arrays={})
    (out / "manifest.json").unlink()  # a directory written by hand: the file itself is read
    (out / "metrics.json").unlink()
    (out / "metrics.json").mkdir()
    assert main(["claims", str(out), "--cl", "cl", "--mim", "mim"]) == 2
    assert capsys.readouterr().err == f"vitscope claims: error: {out / 'metrics.json'}: Is a directory\n"


@pytest.mark.slow
def test_ctrl_c_ends_with_one_line_and_status_130(tmp_path):
    log = tmp_path / "stderr.txt"
    argv = [sys.executable, "-m", "vitscope", "analyze", "--model", "random:vit_small_patch16_224?img_size=32&"
            "patch_size=8&embed_dim=32&depth=2&num_heads=4", "--data", "fashion-mnist-subset", "--out",
            str(tmp_path / "out"), "--batch-size", "1", "--metrics", "nmi", "--num-images", "1000"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as err:
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env)
        deadline = time.monotonic() + 120
        saves = tmp_path / ".out.partial" / "checkpoint"  # the pass has saved its progress at least once
        while not any(saves.glob("*")) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130
    assert log.read_text().rstrip().splitlines()[-1].startswith("vitscope analyze: interrupted (Ctrl-C); kept in")
