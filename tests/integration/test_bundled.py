"""The shipped models: cards complete, weights load strictly, and `vitscope demo` runs end to end."""

from __future__ import annotations

import csv
import json

import torch

from tests.support.results import make_results, write_results_dir
from vitscope import load_model
from vitscope.cli import main
from vitscope.models import cards as bundled
from vitscope.report.claims import ClaimVerdict, summary_line

NAMES = ("moco", "simmim", "mae", "hybrid")
CARD_KEYS = {
    "arch",
    "arch_kwargs",
    "method",
    "command",
    "seed",
    "steps",
    "wall_time_s",
    "hardware",
    "final_loss",
    "linear_probe_top1",
}


def test_every_bundled_model_has_a_complete_card_and_small_weights():
    assert set(NAMES) <= set(bundled.available())
    for name in NAMES:
        model = bundled.find(name)
        assert set(model.card) >= CARD_KEYS, name
        assert model.card["command"].startswith("vitscope pretrain") and f"--method {name}" in model.card["command"]
        assert model.weights.stat().st_size <= 10 * 2**20
        probe = model.card["linear_probe_top1"]
        assert len(probe["cls"]) == model.arch_kwargs["depth"] + 1  # depths 0..L


def test_bundled_models_load_strictly_and_differ():
    outputs = {}
    images = torch.randn(2, 3, 28, 28)
    for name in NAMES:
        model = load_model(f"bundled:{name}")  # strict: every encoder weight comes from the file
        assert model.vitscope_load_report.complete
        with torch.no_grad():
            outputs[name] = model(images)
    assert not torch.allclose(outputs["moco"], outputs["simmim"])


def test_demo_runs_end_to_end_with_the_random_control(tmp_path, capsys):
    out = write_results_dir(tmp_path / "demo", make_results(("cl", "mim")), arrays={})  # an earlier run to replace
    earlier = json.loads((out / "manifest.json").read_text())["run_id"]
    code = main(
        [
            "demo",
            "--out",
            str(out),
            "--data",
            "fashion-mnist-subset",
            "--num-images",
            "20",
            "--probe-images",
            "20",
            "--noise-images",
            "10",
            "--batch-size",
            "10",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    lines = printed.splitlines()
    assert printed.count("Attention collapse") == 1  # one table, a line per finding
    assert "of 7 hold" in lines[-1] and lines[-1].endswith(f"; report: {out / 'report.html'}")  # the summary last
    assert lines[-2].startswith("with mae as MIM: ") and "of 7 hold" in lines[-2]  # all seven findings again
    saved = json.loads((out / "claims.json").read_text())
    assert saved["roles"]["mim"] == "simmim"  # the saved verdict stays
    (with_mae,) = saved["others"]  # the verdict with MAE as MIM saved beside it, the other roles the same
    assert with_mae["roles"] == {**saved["roles"], "mim": "mae"} and len(with_mae["verdicts"]) == 7
    assert summary_line([ClaimVerdict(**v) for v in with_mae["verdicts"]]) in lines[-2]
    assert "The same findings with CL = <b>moco</b>, MIM = <b>mae</b>" in (out / "report.html").read_text()
    with open(out / "metrics.csv", newline="") as fh:
        models = {row["model"] for row in csv.DictReader(fh)}
    assert models == {"moco", "simmim", "mae", "hybrid", "random"}  # the earlier run replaced whole
    assert (out / "claims.json").is_file() and (out / "report.html").is_file()
    assert json.loads((out / "manifest.json").read_text())["run_id"] not in (earlier, None)
    assert main(["demo", "--out", str(out), "--resume"]) == 0  # nothing to continue: said so, the run kept
    assert "already holds a finished demo run" in capsys.readouterr().out
