"""Results directories from real runs of `vitscope analyze`: tiny random models, real files, the real CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vitscope.cli import main

TINY_VIT = "random:vit_small_patch16_224?img_size=32&patch_size=8&embed_dim=32&depth=3&num_heads=4"
MODELS = {
    "cl": TINY_VIT + "&seed=1",
    "mim": TINY_VIT + "&seed=2",
    "control": TINY_VIT + "&seed=3",
    "hybrid": TINY_VIT + "&seed=4",
    "resnet": "random:resnet18",
    "swin": "random:swin_tiny_patch4_window7_224?img_size=32&embed_dim=16&depths=(2,2)&num_heads=(2,4)&window_size=4",
}
ROLES = {"cl": "cl", "mim": "mim", "control": "control", "hybrid": "hybrid"}
_RENDERED: list[Path] = []


def image_folder(root: Path, classes: int = 4, per_class: int = 12, size: int = 40) -> Path:
    """Class folders of random-texture PNGs (each class its own mean colour) and one unreadable file."""
    rng = np.random.default_rng(0)
    for k in range(classes):
        folder = root / f"class{k}"
        folder.mkdir(parents=True)
        base = rng.integers(40, 215, 3)
        for i in range(per_class):
            pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    (root / "class0" / "broken.png").write_text("not an image")
    return root


def analyze_run(out: Path, data: Path, models: dict[str, str], roles: dict[str, str] | None = None,
                extra: tuple[str, ...] = ()) -> Path:  # fmt: skip
    """`vitscope analyze` on ``models`` over ``data`` (small counts), report and claims included."""
    argv = ["analyze", "--data", f"folder:{data}", "--out", str(out), "--num-images", "24", "--probe-images", "20",
            "--noise-images", "8", "--batch-size", "8", "--probe-epochs", "5", *extra]  # fmt: skip
    for label, spec in models.items():
        argv += ["--model", f"{label}={spec}"]
    for role, label in (roles or {}).items():
        argv += [f"--{role}", label]
    assert main(argv) == 0
    return out


def rendered_report_dir(tmp_path_factory) -> Path:
    """A real run's results directory, with claims.json, figures and report.html, made once per session:
    four tiny ViTs in the roles of CL, MIM, control and hybrid, a ResNet-18 and a Swin."""
    if _RENDERED and (_RENDERED[0] / "report.html").exists():
        return _RENDERED[0]
    root = tmp_path_factory.mktemp("real_report")
    out = analyze_run(root / "run", image_folder(root / "images"), MODELS, ROLES)
    _RENDERED[:] = [out]
    return out
