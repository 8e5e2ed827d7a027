"""A run's metadata has one shape, whoever wrote it: analyze_model's saved results render, and older runs
(``"models": [label]``) are read back."""

from __future__ import annotations

import json

import torch

from tests.support.models import tiny_vit
from vitscope.analyses import analyze_model
from vitscope.report import render_report
from vitscope.report.series import ResultView
from vitscope.results import Results
from vitscope.rundir import save_run
from vitscope.runmeta import RunMeta, models_of


def _analyzed() -> Results:
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    loader = [(images[:4], torch.arange(4)), (images[4:], torch.arange(4, 6))]
    return analyze_model(tiny_vit(), loader, label="vit", progress=None, spectrum_groups=None)


def test_analyze_model_writes_the_suites_model_entry_and_its_saved_run_renders(tmp_path):
    results = _analyzed()
    info = results.meta["models"]["vit"]  # tiny_vit: 32 px, patch 8 (4×4 grid), 2 blocks, 4 heads, CLS
    assert (info["kind"], info["num_layers"], info["num_heads"], info["grid"]) == ("vit", 2, 4, [4, 4])
    assert info["attention_keys"] == [None, 16, 16] and info["images"] == 6 and results.meta["num_images"] == 6
    save_run(tmp_path / "run", results)
    page = render_report(tmp_path / "run", svg=False).read_text()
    saved = json.loads((tmp_path / "run/metrics.json").read_text())["meta"]
    assert saved["models"]["vit"]["grid"] == [4, 4] and "No input files were skipped." in page
    assert ResultView(Results(results.rows, saved)).num_spatial_tokens("vit") == 16


def test_an_older_analyze_model_run_with_models_as_a_list_still_renders(tmp_path):
    results = _analyzed()
    results.meta = {"models": ["vit"], "images": {"vit": 6}, "skipped": {"vit": 0}, "metrics": ["nmi"]}
    save_run(tmp_path / "run", results)
    page = render_report(tmp_path / "run", svg=False).read_text()
    assert "No input files were skipped." in page
    view = ResultView(results)
    assert view.models() == ["vit"] and view.model_meta("vit") == {"grids": [], "windows": [], "attention_keys": []}
    assert view.num_layers("vit") == 2  # from the rows, as the list says nothing more


def test_run_meta_reads_back_what_it_wrote_and_keeps_later_keys():
    results = _analyzed()
    results.meta["roles"] = {"cl": "vit"}
    again = RunMeta.from_dict(json.loads(json.dumps(results.meta)))
    assert again.as_dict() == results.meta
    assert again.extra == {"roles": {"cl": "vit"}} and again.models["vit"].num_heads == 4
    assert models_of({"models": ["a", "b"]}).keys() == {"a", "b"} and models_of({}) == {}
