"""report.html in headless Chromium: every section present and every embedded figure decoded."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from tests.support.runs import rendered_report_dir
from vitscope.report import SECTIONS
from vitscope.results import RunDirectory

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")

# After load, write what the browser sees into the DOM, where --dump-dom prints it.
PROBE = """<script>
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  const summary = {
    sections: Array.from(document.querySelectorAll('section[id]')).map(s => s.id),
    images: images.length,
    widths: images.map(i => (i.complete ? i.naturalWidth : 0)),
    height: document.documentElement.scrollHeight,
  };
  const out = document.createElement('pre');
  out.id = 'vitscope-probe';
  out.textContent = JSON.stringify(summary);
  document.body.appendChild(out);
});
</script>"""


def chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--virtual-time-budget=10000",
    ]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=180)


def png_width(data: bytes) -> int:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big")


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    return rendered_report_dir(tmp_path_factory)


def test_every_section_and_image_renders_in_chromium(report_dir, tmp_path):
    page = (report_dir / "report.html").read_text()
    probed = tmp_path / "report_probe.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"))
    result = chromium(tmp_path, "--dump-dom", probed.as_uri())
    found = re.search(r'<pre id="vitscope-probe">(.*?)</pre>', result.stdout, re.S)
    assert found, f"no probe output; chromium stderr: {result.stderr[-2000:]}"
    summary = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert summary["sections"] == ["summary", "claims"] + [s.id for s in SECTIONS]
    figures = sorted((report_dir / "figures").glob("*.png"))
    assert summary["images"] == len(figures) > 0
    # every image decoded, at the pixel width of the PNG embedded for it (in page order)
    embedded = re.findall(r'<figure id="fig-([^"]+)">', page)
    expected = [png_width((report_dir / "figures" / f"{key}.png").read_bytes()) for key in embedded]
    assert summary["widths"] == expected
    assert all(width > 0 for width in summary["widths"])


def test_screenshot_of_the_report(report_dir, tmp_path):
    shot = tmp_path / "report.png"
    result = chromium(
        tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", (report_dir / "report.html").as_uri()
    )
    assert shot.exists(), f"no screenshot; chromium stderr: {result.stderr[-2000:]}"
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=float)
    assert pixels.shape == (2400, 1280, 3)
    header = pixels[:60, :, :].mean(axis=(0, 1))  # the dark blue page header (#1f3b57)
    np.testing.assert_allclose(header, [0x1F, 0x3B, 0x57], atol=25)
    assert pixels.std() > 20  # text, tables and figures, not a blank page


# Drive the attention explorer as a user would (click a patch, choose a head, a block, an image, hide a
# model) and record what every canvas shows after each step.
DRIVE = """<script>
window.addEventListener('load', () => {
  const canvases = () => Array.from(document.querySelectorAll('#ex-panels canvas.ex-map'));
  const drawn = () => Object.fromEntries(canvases().map(c => [c.dataset.model, c.toDataURL()]));
  const captions = () => Array.from(document.querySelectorAll('#ex-panels .ex-caption')).map(c => c.textContent);
  const choose = (id, value, kind) => {
    const control = document.getElementById(id);
    control.value = value;
    control.dispatchEvent(new Event(kind));
  };
  const steps = {labels: canvases().map(c => c.dataset.model)};
  steps.start = drawn();
  steps.startCaptions = captions();
  const first = canvases()[0], box = first.getBoundingClientRect();
  first.dispatchEvent(new MouseEvent('click', {bubbles: true, clientX: box.left + 0.1 * box.width,
                                               clientY: box.top + 0.9 * box.height}));
  steps.query = drawn();
  steps.queryCaptions = captions();
  choose('ex-head', '1', 'change');
  steps.head = drawn();
  steps.headCaptions = captions();
  choose('ex-block', '1', 'input');
  steps.block = drawn();
  choose('ex-image', '1', 'change');
  steps.image = drawn();
  steps.imageCaptions = captions();
  const shared = document.getElementById('ex-shared');
  shared.checked = true;
  shared.dispatchEvent(new Event('change'));
  steps.shared = drawn();
  const toggle = document.querySelector('.ex-toggle input');
  toggle.checked = false;
  toggle.dispatchEvent(new Event('change'));
  steps.hidden = Array.from(document.querySelectorAll('#ex-panels .ex-panel'))
    .filter(p => p.style.display === 'none').map(p => p.querySelector('canvas').dataset.model);
  const out = document.createElement('pre');
  out.id = 'vitscope-explorer';
  out.textContent = JSON.stringify(steps);
  document.body.appendChild(out);
});
</script>"""


@pytest.fixture(scope="module")
def explorer_steps(report_dir, tmp_path_factory) -> dict:
    """What the DRIVE script saw: the report's explorer driven once in real Chromium."""
    tmp_path = tmp_path_factory.mktemp("explorer")
    page = (report_dir / "report.html").read_text()
    driven = tmp_path / "report_driven.html"
    driven.write_text(page.replace("</body>", DRIVE + "</body>"))
    result = chromium(tmp_path, "--window-size=1400,1200", "--dump-dom", driven.as_uri())
    found = re.search(r'<pre id="vitscope-explorer">(.*?)</pre>', result.stdout, re.S)
    assert found, f"no explorer output; chromium stderr: {result.stderr[-2000:]}"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def test_attention_explorer_redraws_for_query_head_block_image_and_model(explorer_steps):
    steps = explorer_steps
    assert steps["labels"] == ["cl", "mim", "control", "hybrid"]  # the ViTs; no global maps for Swin, ResNet
    models = steps["labels"]
    assert len(set(steps["start"].values())) == len(models)  # each model its own map for the same query
    # the query starts at the grid's centre (4×4 grid: patch (2, 2)); the click moves it to the lower left
    assert all("query (2, 2)" in c and "block 3 · mean over heads" in c for c in steps["startCaptions"])
    assert all("query (3, 0)" in c for c in steps["queryCaptions"])
    assert all("head 2" in c for c in steps["headCaptions"])
    for before, after in (("start", "query"), ("query", "head"), ("head", "block"), ("block", "image")):
        changed = [m for m in models if steps[before][m] != steps[after][m]]
        assert changed == models, f"{before} → {after}: only {changed} redrawn differently"
    # one colour scale: every map but the one holding the largest value is drawn darker
    peaks = {m: float(re.search(r"max ([0-9.]+)", c).group(1)) for m, c in zip(models, steps["imageCaptions"])}
    brightest = max(peaks, key=peaks.get)
    assert [m for m in models if steps["shared"][m] != steps["image"][m]] == [m for m in models if m != brightest]
    assert steps["hidden"] == ["cl"]


def test_explorer_query_spread_equals_the_maps_in_arrays_npz(report_dir, explorer_steps):
    """The caption's query spread (block 3, mean over heads, image 1) against numpy on arrays.npz."""
    steps = explorer_steps
    arrays = RunDirectory(report_dir).load_arrays()
    for model, caption in zip(steps["labels"], steps["startCaptions"]):
        rows = arrays[f"{model}/attention_rows"][0, -1].astype(float)  # image 1, last block: [H, N, N]
        attn = (rows / 255 * arrays[f"{model}/attention_peaks"][0, -1].astype(np.float32)[..., None]).mean(axis=0)
        spread = 0.5 * np.abs(attn - attn.mean(axis=0)).sum(axis=1).mean()
        shown = float(re.search(r"query spread ([0-9.]+)", caption).group(1))
        assert shown == pytest.approx(spread, abs=0.006), (model, caption)
