"""What a bfloat16 forward pass does to the numbers: every metric under ``--precision bf16`` against fp32.

    python benchmarks/bench_precision.py [--models bundled:simmim bundled:moco] [--data fashion-mnist]
                                         [--images 128] [--precision bf16] [--device cpu]

Runs the per-layer metrics (one lockstep pass: attention, token, spectra, Fourier, residual ratios,
CKA) twice on the same images, once in float32 and once under a bfloat16 autocast forward (the
reductions run in float32/float64 either way), and prints per metric the largest absolute difference,
the largest difference relative to the metric's spread over layers (max − min of the fp32 values), and
the standard error of the fp32 value at that row: a difference well inside the standard error does not
change any reading. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from vitscope.analyses import SCALAR_METRICS, AnalysisConfig, analyze

ANALYSES = (*SCALAR_METRICS, "cka")


def rows(models: list[str], data: str, images: int, precision: str, device: str) -> dict[tuple, tuple]:
    config = AnalysisConfig(num_images=images, batch_size=64, device=device, analyses=ANALYSES, precision=precision)
    output = analyze({spec: spec for spec in models}, data, config)
    assert output is not None
    keyed = {}
    for row in output.results.rows:
        key = tuple((k, row.get(k)) for k in ("model", "metric", "layer", "head", "other_model", "other_layer"))
        keyed[key] = (row["value"], row.get("stderr"))
    return keyed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bundled:simmim", "bundled:moco"])
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    exact = rows(args.models, args.data, args.images, "fp32", args.device)
    low = rows(args.models, args.data, args.images, args.precision, args.device)
    spread: dict[tuple, list[float]] = defaultdict(list)
    for key, (value, _) in exact.items():
        spread[(dict(key)["model"], dict(key)["metric"])].append(value)
    worst: dict[str, tuple[float, float, float]] = {}
    for key, (value, stderr) in exact.items():
        row = dict(key)
        values = spread[(row["model"], row["metric"])]
        scale = max(values) - min(values) or abs(value) or 1.0
        diff = abs(low[key][0] - value)
        if diff / scale >= worst.get(row["metric"], (0.0, 0.0, 0.0))[1]:
            worst[row["metric"]] = (diff, diff / scale, stderr or 0.0)
    print(f"{args.precision} vs fp32, {args.images} images of {args.data}, models {', '.join(args.models)}")
    print(f"{'metric':>22} {'max |diff|':>12} {'of spread':>10} {'fp32 stderr there':>18}")
    for metric in ANALYSES:
        if metric in worst:
            diff, relative, stderr = worst[metric]
            print(f"{metric:>22} {diff:>12.2e} {relative:>10.2%} {stderr:>18.2e}")


if __name__ == "__main__":
    main()
