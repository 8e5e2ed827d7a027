"""`vitscope analyze` end to end: two tiny models on a tiny image set, every file, values = Python API."""

from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest

from tests.support.images import make_folder
from vitscope.analyses import AnalysisConfig, analyze
from vitscope.cli import main

TINY = "random:vit_small_patch16_224?img_size=32&patch_size=8&embed_dim=32&depth=2&num_heads=4"
MODELS = {"cl": TINY + "&seed=1", "mim": TINY + "&seed=2"}
SMALL = dict(num_images=24, probe_train_images=24, noise_images=8, batch_size=8, probe_epochs=3)
SMALL.update(tsne_classes=2, tsne_per_class=2, attention_images=2)
EXPECTED_METRICS = {
    "attention_distance",
    "nmi",
    "attention_entropy",
    "token_cosine",
    "head_cosine",
    "depth_cosine",
    "effective_rank",
    "fourier_high",
    "residual_ratio_attn",
    "residual_ratio_mlp",
    "linear_probe_top1",
    "noise_drop",
    "cka",
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    data = root / "images"
    make_folder(data)  # 6 readable images in 2 classes, 2 unreadable files
    for cls in ("cat", "dog"):  # more images so that both splits have some of each class
        for i in range(3, 24):
            (data / cls / f"{i}.jpg").write_bytes((data / cls / "1.jpg").read_bytes())
    out = root / "out"
    argv = [
        "analyze",
        "--data",
        f"folder:{data}",
        "--out",
        str(out),
        "--num-images",
        "24",
        "--probe-images",
        "24",
        "--noise-images",
        "8",
        "--batch-size",
        "8",
        "--probe-epochs",
        "3",
        "--attention-images",
        "2",
        "--cl",
        "cl",
        "--mim",
        "mim",
    ]
    for label, spec in MODELS.items():
        argv += ["--model", f"{label}={spec}"]
    assert main(argv) == 0
    return out, data


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_analyze_writes_every_file(run_dir):
    out, _ = run_dir
    for name in ("metrics.csv", "metrics.json", "arrays.npz", "claims.json", "report.html"):
        assert (out / name).is_file(), name
    rows = read_csv(out / "metrics.csv")
    assert {"model", "metric", "layer", "head", "value"} <= set(rows[0])
    assert {row["metric"] for row in rows} >= EXPECTED_METRICS
    assert {row["model"] for row in rows} == {"cl", "mim"}
    layers = {int(row["layer"]) for row in rows if row["metric"] == "token_cosine"}
    assert layers == {0, 1, 2}  # layer 0 = patch embedding, blocks 1..L
    cross = [row for row in rows if row["metric"] == "cka" and row["model"] == "cl" and row["other_model"] == "mim"]
    assert len(cross) == 9  # 3 x 3 depths
    meta = json.loads((out / "metrics.json").read_text())["meta"]
    assert len(meta["skipped"]) == 2 and meta["models"]["cl"]["num_layers"] == 2
    assert {"versions", "seed", "wall_time_s", "data", "num_images"} <= set(meta)
    figures = {p.stem for p in (out / "figures").glob("*.png")}
    assert {"attention_distance", "nmi", "linear_probe", "noise_robustness", "cka"} <= figures
    assert {p.stem for p in (out / "figures").glob("*.svg")} == figures
    with np.load(out / "arrays.npz") as arrays:
        assert arrays["cl/attention_rows"].shape == (2, 2, 4, 16, 16)  # --attention-images, blocks, heads, N, N
        assert arrays["cl/attention_blocks"].tolist() == [1, 2]
        assert arrays["example_image"].shape == (3, 32, 32)  # the static figure's three images
        assert arrays["example_images"].shape == (2, 32, 32, 3)


def test_analyze_csv_equals_python_api(run_dir):
    out, data = run_dir
    api = analyze(MODELS, f"folder:{data}", AnalysisConfig(**SMALL))
    key = ("model", "metric", "layer", "head", "feature", "band", "freq", "index", "other_model", "other_layer")

    def norm(value):
        return "" if value is None else str(value)

    expected = {tuple(norm(row.get(k)) for k in key): row["value"] for row in api.results.rows}
    got = {tuple(row[k] for k in key): float(row["value"]) for row in read_csv(out / "metrics.csv")}
    assert set(got) == set(expected)
    for k, value in expected.items():
        assert math.isclose(got[k], value, rel_tol=1e-6, abs_tol=1e-9), k


def test_analyze_bad_inputs_name_the_problem(tmp_path, capsys):
    assert main(["analyze", "--model", "x=nonsense", "--data", "fashion-mnist-subset", "--out", str(tmp_path)]) == 2
    assert "nonsense" in capsys.readouterr().err
    assert (
        main(["analyze", "--model", f"a={TINY}", "--data", f"folder:{tmp_path / 'none'}", "--out", str(tmp_path)]) == 2
    )
    assert "none" in capsys.readouterr().err
    assert (
        main(
            [
                "analyze",
                "--model",
                f"a={TINY}",
                "--data",
                "fashion-mnist-subset",
                "--metrics",
                "nmi,bogus",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "bogus" in capsys.readouterr().err


def explorer_data(page: str) -> dict:
    found = re.search(r'<script type="application/json" id="explorer-data">(.*?)</script>', page, re.S)
    assert found
    return json.loads(found.group(1))


def test_report_explorer_cap_is_a_flag(run_dir, capsys):
    out, _ = run_dir
    before = explorer_data((out / "report.html").read_text())
    assert [(m["label"], m["count"], m["heads"]) for m in before["models"]] == [("cl", 2, 4), ("mim", 2, 4)]
    per_image = 2 * 4 * 16 * 16  # blocks × heads × N² bytes of one model's maps of one image
    assert main(["report", str(out), "--no-svg", "--explorer-mb", str(2 * per_image / 2**20)]) == 0
    capped = explorer_data((out / "report.html").read_text())
    assert [(m["label"], m["count"], m["heads"]) for m in capped["models"]] == [("cl", 1, 4), ("mim", 1, 4)]
    with pytest.raises(SystemExit):
        main(["report", str(out), "--explorer-mb", "0"])
    assert "argument --explorer-mb: must be in (0, ∞), got 0" in capsys.readouterr().err


def test_spectrum_groups_flag_sets_the_images_behind_the_rank(run_dir, tmp_path):
    out, data = run_dir
    by_default = [r for r in read_csv(out / "metrics.csv") if r["metric"] == "effective_rank" and r["model"] == "cl"]
    assert {int(r["n"]) for r in by_default} == {24}  # 12 groups of 2 ≤ the default 32 groups: every image
    assert json.loads((out / "metrics.json").read_text())["meta"]["config"]["spectrum_groups"] == 32
    few = tmp_path / "few"
    argv = ["analyze", "--data", f"folder:{data}", "--out", str(few), "--num-images", "24", "--batch-size", "5",
            "--metrics", "effective_rank,singular_values", "--model", f"cl={MODELS['cl']}"]  # fmt: skip
    assert main([*argv, "--spectrum-groups", "3"]) == 0
    rows = [r for r in read_csv(few / "metrics.csv") if r["metric"] == "effective_rank"]
    assert rows and {int(r["n"]) for r in rows} == {6}  # the first 3 groups, one of them split between batches
    api = analyze({"cl": MODELS["cl"]}, f"folder:{data}", AnalysisConfig(num_images=24, batch_size=24,
                  analyses=["effective_rank"], spectrum_groups=3)).results  # fmt: skip
    for row in rows:  # batch size 5 splits group 3 (images 4, 5); one batch of 24 gives the same ranks
        (expected,) = api.select(metric="effective_rank", model="cl", layer=int(row["layer"]))
        assert float(row["value"]) == pytest.approx(expected["value"], rel=1e-6)
    assert main([*argv, "--spectrum-groups", "all", "--overwrite", "--num-images", "10"]) == 0
    rows = [r for r in read_csv(few / "metrics.csv") if r["metric"] == "effective_rank"]
    assert rows and {int(r["n"]) for r in rows} == {10}
    with pytest.raises(ValueError, match="spectrum_groups"):
        AnalysisConfig(spectrum_groups=0)
