"""Benchmark: what the per-token suite costs on top of the model's own forward pass, as whole processes.

    python benchmarks/bench_overhead.py [--images 128] [--batch-size 64] [--repeats 3] [--rows ROW ...]
                                        [--src PATH ...] [--device cpu] [--json PATH]

For each row (model, precision, metrics) it times, in fresh processes over the same folder of random
224-px PNG images:

1. bare: a script that builds the model as `vitscope analyze` does, reads the images through the same
   loader and runs timm's ``forward_features`` with fused attention off (capture needs the probabilities),
   under the same autocast;
2. suite: ``vitscope analyze --no-report --metrics ...`` on the same images, batch and precision.

Runs are interleaved (bare, suite, bare, suite, ...) so that load drifts hit both alike, and each ratio
suite / bare is printed per repeat, with the median and the spread: this machine is noisy, so compare
ratios, not seconds. ``--src`` times the suite of other checkouts' ``src`` directories as well (e.g. the
commit before a change), in the same interleaving. The goal (issue 24): every row at most 1.15.
Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIX = "attention_distance,nmi,attention_entropy,token_cosine,effective_rank,fourier_high"
ROWS = {  # name: (timm model, precision, metrics: all per-token metrics or the six the verdict reads most)
    "vit_s16-fp32-all": ("vit_small_patch16_224", "fp32", "all"),
    "vit_b16-fp32-six": ("vit_base_patch16_224", "fp32", SIX),
    "vit_b16-bf16-six": ("vit_base_patch16_224", "bf16", SIX),
}
REPO = Path(__file__).resolve().parents[1]

BARE = """
import sys, time, torch
from vitscope.capture import make_capture
from vitscope.data import build_transform, make_loader, open_dataset
from vitscope.models import load_model
name, data, images, batch, precision, device = sys.argv[1:7]
model = load_model(f"random:{name}").to(device).eval()
loader = make_loader(open_dataset(f"folder:{data}", "test", build_transform(model)), num_images=int(images),
                     batch_size=int(batch))
with torch.no_grad(), make_capture(model)._unfused_attention(), torch.autocast(
        torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
    for batch in loader:
        model.forward_features(batch.images.to(device))
"""


def image_folder(root: Path, count: int) -> Path:
    """``count`` random 224-px RGB PNGs in two classes (made once, then reused)."""
    import numpy as np
    from PIL import Image

    folder = root / f"random224-{count}"
    if not folder.exists():
        rng = np.random.default_rng(0)
        for i in range(count):
            (folder / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"class{i % 2}" / f"{i:04d}.png")
    return folder


def timed(command: list[str], src: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed:\n{done.stderr[-3000:]}")
    return seconds


def bare_command(row: tuple[str, str, str], data: Path, args: argparse.Namespace) -> list[str]:
    name, precision, _ = row
    return [sys.executable, "-c", BARE, name, str(data), str(args.images), str(args.batch_size), precision, args.device]


def suite_command(row: tuple[str, str, str], data: Path, out: Path, args: argparse.Namespace) -> list[str]:
    name, precision, metrics = row
    from vitscope.analyses import ALL_METRICS

    wanted = ",".join(ALL_METRICS) if metrics == "all" else metrics
    return [sys.executable, "-m", "vitscope", "analyze", "--model", f"m=random:{name}", "--data", f"folder:{data}",
            "--num-images", str(args.images), "--batch-size", str(args.batch_size), "--precision", precision,
            "--device", args.device, "--metrics", wanted, "--no-report", "--overwrite", "--out", str(out)]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=list(ROWS))
    parser.add_argument("--src", nargs="*", default=[], help="other checkouts' src directories to time as well")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sources = {"this": REPO / "src", **{str(path): Path(path) for path in args.src}}
    root = Path(tempfile.gettempdir()) / "vitscope-bench"
    data = image_folder(root, args.images)
    print(f"{args.images} random 224-px images, batch {args.batch_size}, device {args.device}, "
          f"{os.cpu_count()} CPU(s); ratio = suite process / bare forward process")  # fmt: skip
    report: dict[str, dict[str, list[float]]] = {}
    for key in args.rows:
        row = ROWS[key]
        seconds: dict[str, list[float]] = {"bare": [], **{f"suite[{label}]": [] for label in sources}}
        for _ in range(args.repeats):
            seconds["bare"].append(timed(bare_command(row, data, args), REPO / "src"))
            for label, src in sources.items():
                out = root / f"run-{key}"
                seconds[f"suite[{label}]"].append(timed(suite_command(row, data, out, args), src))
        report[key] = seconds
        bare = seconds["bare"]
        print(f"{key}: bare {statistics.median(bare):.1f} s (runs {', '.join(f'{s:.1f}' for s in bare)})")
        for label in sources:
            suite = seconds[f"suite[{label}]"]
            ratios = [s / b for s, b in zip(suite, bare)]
            print(f"  suite[{label}] {statistics.median(suite):.1f} s; suite / bare = "
                  f"{', '.join(f'{r:.2f}' for r in ratios)} (median {statistics.median(ratios):.2f}, "
                  f"spread {min(ratios):.2f}-{max(ratios):.2f})", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "seconds": report}, indent=2))


if __name__ == "__main__":
    main()
