"""Image folders on disk for tests: a few real images per class, and files that are not images."""

from __future__ import annotations

import numpy as np
from PIL import Image


def make_folder(root):
    """Two classes (cat, dog) of three 40 px JPEGs each, a truncated JPEG and a text file named .png."""
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / cls / f"{i}.jpg")
    good = (root / "cat" / "0.jpg").read_bytes()
    (root / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "dog" / "notes.png").write_text("this is not an image")
