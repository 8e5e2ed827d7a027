"""Figures and the self-contained HTML report: rendered from a real `vitscope analyze` run, and figure
functions checked on hand-made rows whose values are known."""

from __future__ import annotations

import base64
import json
import math
import re

import numpy as np
import pytest
from matplotlib.colors import to_rgba

from tests.support.results import (
    GRID,
    HEAD_SPREAD,
    HEADS,
    PROFILES,
    L,
    cka_rows,
    make_arrays,
    make_results,
    only,
    write_results_dir,
)
from tests.support.runs import rendered_report_dir
from vitscope.report import SECTIONS, render_report
from vitscope.report.figures import (
    build_figures,
    fig_attention_maps,
    fig_cka,
    fig_probe,
    layer_curve,
    model_colors,
    spectrum_limits,
)
from vitscope.report.series import ResultView
from vitscope.results import RunDirectory

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VIT = ("cl", "mim", "control", "hybrid")
EXPECTED_FIGURES = (
    [
        "attention_distance",
        "nmi",
        "attention_entropy",
        "token_cosine",
        "head_cosine",
        "depth_cosine",
        "effective_rank",
        "fourier_high",
        "singular_values",
        "fourier_delta",
        "noise_robustness",
        "linear_probe",
        "tsne",
        "residual_ratio",
    ]
    + ["cka"]  # one grid of every pair
    + [f"localisation_{m}" for m in VIT]
)
ALL_SECTION_IDS = ["summary", "claims"] + [s.id for s in SECTIONS]


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    return rendered_report_dir(tmp_path_factory)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_every_figure_is_written_as_png_and_svg(report_dir):
    figures = report_dir / "figures"
    assert sorted(p.stem for p in figures.glob("*.png")) == sorted(EXPECTED_FIGURES)
    for key in EXPECTED_FIGURES:
        width, height = png_size((figures / f"{key}.png").read_bytes())
        assert width > 200 and height > 150
        assert "<svg" in (figures / f"{key}.svg").read_text()[:2000]


def test_report_has_every_section_and_embeds_every_figure(report_dir):
    page = (report_dir / "report.html").read_text()
    assert re.findall(r'<section id="([^"]+)"', page) == ALL_SECTION_IDS
    sources = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert len(sources) == len(EXPECTED_FIGURES)
    embedded = {base64.b64decode(s) for s in sources}
    on_disk = {(report_dir / "figures" / f"{k}.png").read_bytes() for k in EXPECTED_FIGURES}
    assert embedded == on_disk
    for section in SECTIONS:  # each analysis section explains how to read it, names the paper, shows its figure
        body = page.split(f'<section id="{section.id}">')[1].split("</section>")[0]
        assert "How to read it." in body and "In the papers:" in body and "Not measured" not in body
        assert ('id="explorer"' if section.id == "attention-maps" else "<img") in body


def test_explorer_embeds_the_runs_maps_and_images(report_dir):
    page = (report_dir / "report.html").read_text()
    found = re.search(r'<script type="application/json" id="explorer-data">(.*?)</script>', page, re.S)
    assert found
    data = json.loads(found.group(1))
    arrays = RunDirectory(report_dir).load_arrays()
    assert [m["label"] for m in data["models"]] == ["cl", "mim", "control", "hybrid"]  # Swin: windows; ResNet: none
    for model in data["models"]:
        rows = np.frombuffer(base64.b64decode(model["rows"]), np.uint8)
        np.testing.assert_array_equal(rows, arrays[f"{model['label']}/attention_rows"].ravel())
        peaks = np.frombuffer(base64.b64decode(model["peaks"]), "<f4")
        np.testing.assert_array_equal(peaks, arrays[f"{model['label']}/attention_peaks"].astype(np.float32).ravel())
        assert model["grid"] == [4, 4] and model["blocks"] == [1, 2, 3] and model["heads"] == 4
    pixels = np.frombuffer(base64.b64decode(data["images"]["rgb"]), np.uint8)
    np.testing.assert_array_equal(pixels, arrays["example_images"][: data["models"][0]["count"]].ravel())


def test_report_is_self_contained(report_dir):
    page = (report_dir / "report.html").read_text()
    assert not re.search(r"<(link|iframe)\b", page)
    scripts = re.findall(r"<script\b([^>]*)>", page)
    assert scripts == [' type="application/json" id="explorer-data"', ""]  # the explorer's data and code, inline
    assert not re.search(r"\b(fetch|XMLHttpRequest|import)\s*\(", page)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "url(" not in page


def test_report_shows_the_run_summary_and_the_claims_table(report_dir):
    page = (report_dir / "report.html").read_text()
    meta = RunDirectory(report_dir).load_results().meta
    summary = page.split('<section id="summary">')[1].split("</section>")[0]
    for text in (
        meta["data"],
        "random:resnet18",
        f"torch {meta['versions']['torch']}",
        f"{meta['wall_time_s']:.1f} s",
        "broken.png",
        "4×4",  # the ViTs' grid
        "8×8 → 4×4",  # Swin's two stages
        "windows 4×4",
        "resnet: no attention",
        "swin: hierarchical, attention within windows",
    ):
        assert text in summary, text
    claims = page.split('<section id="claims">')[1].split("</section>")[0]
    saved = json.loads((report_dir / "claims.json").read_text())
    statuses = re.findall(r'<span class="status [a-z -]+">([^<]+)</span>', claims)
    assert statuses == [v["status"] for v in saved["verdicts"]] and len(statuses) == 7
    assert "late attention distance: CL cl" in claims


def test_attention_distance_figure_plots_layer_means_over_per_head_dots():
    view = ResultView(make_results(("cl", "mim")))
    (named,) = layer_curve(
        view,
        model_colors(view.models()),
        "attention_distance",
        "attention_distance",
        "attention-distance",
        "t",
        "y",
        heads=True,
    )
    ax = named.figure.axes[0]
    lines = {line.get_label(): line for line in ax.lines}
    np.testing.assert_allclose(lines["cl"].get_xdata(), np.arange(1, L + 1))
    np.testing.assert_allclose(lines["cl"].get_ydata(), PROFILES["cl"]["attention_distance"])
    dots = ax.collections[0].get_offsets()  # cl's heads come first; hand-made heads are mean ± spread
    assert len(dots) == L * HEADS
    per_layer = np.asarray(dots[:, 1]).reshape(L, HEADS)
    np.testing.assert_allclose(per_layer.mean(axis=1), PROFILES["cl"]["attention_distance"])
    np.testing.assert_allclose(per_layer.max(axis=1) - per_layer.min(axis=1), 2 * HEAD_SPREAD["attention_distance"])
    assert [t.get_text() for t in named.figure.legends[0].get_texts()] == ["cl", "mim"]


def test_entropy_figure_draws_log_n_and_models_keep_their_colour():
    view = ResultView(make_results())
    figures = {f.key: f for f in build_figures(view, {})}
    entropy_ax = figures["attention_entropy"].figure.axes[0]
    reference = [line for line in entropy_ax.lines if line.get_linestyle() == "--"]
    assert len(reference) == 1 and reference[0].get_ydata()[0] == pytest.approx(math.log(16))
    colors = model_colors(view.models())
    for key in ("attention_distance", "token_cosine", "effective_rank"):
        for line in figures[key].figure.axes[0].lines:
            if line.get_label() in colors:
                assert line.get_color() == colors[line.get_label()]


def test_cka_grid_holds_the_hand_made_matrices():
    view = ResultView(make_results(("cl", "resnet")))
    (named,) = fig_cka(view, {}, model_colors(view.models()))
    panels = {ax.get_label(): ax for ax in named.figure.axes if ax.get_label().startswith("cka:")}
    assert sorted(panels) == ["cka:cl:cl", "cka:cl:resnet"]  # one grid; resnet × resnet was not measured
    shown = panels["cka:cl:resnet"].images[0].get_array()
    expected = np.zeros((L + 1, 5))
    for row in cka_rows("cl", "resnet", L, 4):
        expected[row["layer"], row["other_layer"]] = row["value"]
    np.testing.assert_allclose(np.asarray(shown), expected)


def test_roles_keep_their_colour_whatever_the_labels_and_order():
    first = model_colors(["a", "b", "c", "extra"], {"cl": "a", "mim": "b", "control": "c"})
    second = model_colors(["extra", "z", "y"], {"mim": "z", "cl": "y"})
    assert first["a"] == second["y"] == to_rgba("tab:blue") and first["b"] == second["z"] == to_rgba("tab:orange")
    assert first["c"] == to_rgba("tab:gray") and first["extra"] == second["extra"]  # by label, run to run
    assert len(set(model_colors([f"m{i}" for i in range(6)]).values())) == 6


def test_depth_axes_name_the_patch_embedding_only_where_drawn_and_cnns_get_stages():
    results = make_results(("cl", "resnet"))
    figures = {f.key: f.figure for f in build_figures(ResultView(results), {})}
    (distance,) = figures["attention_distance"].axes  # blocks 1..L only: no 0
    assert distance.get_xlabel() == "depth (block)"
    vit_ax, cnn_ax = figures["token_cosine"].axes[:2]  # 0..L; the ResNet on its own stage axis
    assert vit_ax.get_xlabel() == "depth (block; 0 = patch embedding)" and cnn_ax.get_xlabel() == "depth (stage)"
    assert [line.get_label() for line in vit_ax.lines] == ["cl"]
    assert [line.get_label() for line in cnn_ax.lines] == ["resnet"]


def test_singular_value_axis_is_not_squashed_by_a_rank_floor():
    spectra = [np.array([10.0, 3.0, 1.0, 1e-12]), np.array([8.0, 0.5, 0.05, 0.01])]
    assert spectrum_limits(spectra) == (0.005, 20.0)


def test_probe_band_is_the_binomial_interval_over_the_rows_n():
    results = make_results(("cl",))
    rows = [r for r in results.rows if r["metric"] == "linear_probe_top1"]
    for r in rows:
        r["value"], r["n"], r["stderr"] = 75.0, 40, None  # as real runs write them: percent, n images
    (named,) = fig_probe(ResultView(results), {}, model_colors(["cl"]))
    band = named.figure.axes[0].collections[0].get_paths()[0].vertices[:, 1]
    p, n, z = 0.75, 40, 1.959964
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)  # the Wilson score interval, by hand
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert band.min() == pytest.approx(100 * (centre - half), abs=1e-3)
    assert band.max() == pytest.approx(100 * (centre + half), abs=1e-3)


def test_attention_maps_mosaic_puts_each_map_in_its_cell():
    arrays = make_arrays(("cl",))
    arrays.pop("example_image")  # without the image a cell is the colour-mapped map alone
    view = ResultView(make_results(("cl",)))
    (named,) = fig_attention_maps(view, arrays, model_colors(["cl"]))
    mosaic = np.asarray(named.figure.axes[0].images[0].get_array())
    cell = 16 * GRID[0]
    pad = max(1, cell // 16)
    maps = arrays["cl/attention_maps"]
    block, query = 4, 2
    top, left = query * (cell + pad), block * (cell + pad)
    # the brightest patch of the map is the brightest (inferno: highest luminance) block of the cell
    luminance = mosaic[top : top + cell, left : left + cell].sum(axis=-1)
    r, c = np.unravel_index(np.argmax(luminance), luminance.shape)
    assert (r // 16, c // 16) == np.unravel_index(np.argmax(maps[block, query]), GRID)
    assert len(named.figure.axes[0].patches) == L * 3  # one query outline per cell


def test_sections_without_data_say_not_measured_and_png_only(tmp_path):
    results = only(make_results(("cl",), meta_models=False), "attention_distance", "token_cosine")
    out = write_results_dir(tmp_path / "run", results, arrays={})
    path = render_report(out, svg=False)
    page = path.read_text()
    for section in ("attention-maps", "tsne", "cka", "noise-robustness", "nmi", "linear-probe"):
        body = page.split(f'<section id="{section}">')[1].split("</section>")[0]
        assert "Not measured in this run." in body and "<img" not in body
    assert re.findall(r'<section id="([^"]+)"', page) == ALL_SECTION_IDS
    assert "Claims not evaluated" in page
    assert not list((out / "figures").glob("*.svg"))
    assert sorted(p.name for p in (out / "figures").glob("*.png")) == ["attention_distance.png", "token_cosine.png"]


def test_report_evaluates_claims_from_roles_in_meta(tmp_path, monkeypatch):
    monkeypatch.setattr(
        "vitscope.report.render.build_figures", lambda view, arrays: []
    )  # the claims table is the point
    results = make_results(("cl", "mim"), drop={("cl", "cka")})
    results.meta["roles"] = {"cl": "cl", "mim": "mim"}
    out = write_results_dir(tmp_path / "run", results, arrays={})
    page = render_report(out, svg=False).read_text()
    claims = page.split('<section id="claims">')[1].split("</section>")[0]
    assert claims.count("status holds") == 6 and claims.count("status not-measured") == 1


def test_load_arrays_roundtrip(tmp_path):
    out = write_results_dir(tmp_path / "run", make_results(("cl",)), arrays=make_arrays(("cl",)))
    arrays = RunDirectory(out).load_arrays()
    assert arrays["cl/attention_maps"].shape == (L, 3, *GRID)
    np.testing.assert_allclose(arrays["cl/attention_maps"].sum(axis=(2, 3)), 1.0, rtol=1e-5)
    assert RunDirectory(tmp_path).load_arrays() == {}


def test_qualified_and_undecided_statuses_are_amber_never_plain_green():
    from vitscope.report.claims import ClaimVerdict
    from vitscope.report.html import _status_class

    def badge(status: str) -> str:
        return _status_class(ClaimVerdict(1, "t", status, "e"))

    assert badge("holds") == "holds"
    assert badge("does not hold") == "does-not-hold"
    assert badge("holds, but CL ≈ untrained") == "holds caveat"
    assert badge("undecided") == "undecided"
    from vitscope.report.html import CSS as css

    # the caveat rule comes after .holds, so its amber wins over the green
    assert css.index(".undecided,.caveat{") > css.index(".holds{")


def test_each_finding_links_the_sections_whose_figures_show_its_evidence():
    from vitscope.report.claims import ClaimsRecord, ClaimVerdict
    from vitscope.report.html import CLAIM_SECTIONS, SECTIONS, claims_section

    ids = {section.id for section in SECTIONS}
    assert set(CLAIM_SECTIONS) == set(range(1, 8))
    assert all(sid in ids for sids in CLAIM_SECTIONS.values() for sid in sids)
    record = ClaimsRecord.from_dict(
        {"roles": {"cl": "a", "mim": "b"}, "verdicts": [ClaimVerdict(5, "t", "holds", "e").to_dict()]}
    )
    html = claims_section(record)
    assert re.findall(r'<a href="#([a-z-]+)">', html) == ["linear-probe"]
