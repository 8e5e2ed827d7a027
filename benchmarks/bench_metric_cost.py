"""Benchmark: what each per-token metric family costs inside one analysed batch, by torch.profiler.

    python benchmarks/bench_metric_cost.py [--model vit_small_patch16_224] [--precision fp32|bf16]
                                           [--batch-size 64] [--metrics a,b,...] [--repeats 3]

One random-weight timm model, one batch of random 224-px images: the batch runs once to warm up (the
first batch also checks the model), then ``--repeats`` times under torch.profiler with each reducer's
``update`` wrapped in a ``record_function``. It prints, per reducer family, the seconds per batch and
the share of the bare forward pass (the same batch through ``forward_features`` with fused attention
off, timed in the same process), then the ATen ops that take the most time. Medians over the repeats;
the machine is noisy, so read shares, not seconds. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from vitscope.analyses.driver import ModelPass, _run_one
from vitscope.analyses.moments import ALL_METRICS, metric_reducers
from vitscope.capture import LayerOutput, make_capture
from vitscope.data import Batch
from vitscope.models import load_model


def bare_seconds(model: torch.nn.Module, images: torch.Tensor, dtype: torch.dtype | None) -> float:
    capture = make_capture(model)
    with torch.no_grad(), capture._unfused_attention(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        start = time.perf_counter()
        model.forward_features(images)
        return time.perf_counter() - start


def labelled(update: Callable[[LayerOutput], None], label: str) -> Callable[[LayerOutput], None]:
    """``update`` inside a profiler range named ``label``."""

    def timed(layer: LayerOutput) -> None:
        with record_function(label):
            update(layer)

    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--metrics", default=",".join(ALL_METRICS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model(f"random:{args.model}").eval()
    images = torch.randn(args.batch_size, 3, 224, 224)
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    capture = make_capture(model)
    reducers = metric_reducers(capture.facts, args.metrics.split(","))
    for reducer in reducers:
        reducer.update = labelled(reducer.update, f"reducer:{type(reducer).__name__}")  # type: ignore[method-assign]
    passed = ModelPass("m", capture, reducers)
    batch = Batch(images, torch.zeros(args.batch_size, dtype=torch.long))
    _run_one(passed, batch, (0, 0), "cpu", dtype)  # warm-up; the first batch also checks the model
    bare_seconds(model, images, dtype)
    per_family: dict[str, list[float]] = defaultdict(list)
    bare, whole = [], []
    for _ in range(args.repeats):
        bare.append(bare_seconds(model, images, dtype))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            _run_one(passed, batch, (1, args.batch_size), "cpu", dtype)  # past the first spectrum groups
            whole.append(time.perf_counter() - start)
        for event in prof.key_averages():
            if event.key.startswith("reducer:"):
                per_family[event.key.removeprefix("reducer:")].append(event.cpu_time_total / 1e6)
    forward = statistics.median(bare)
    print(f"{args.model} {args.precision}, batch {args.batch_size}, {torch.get_num_threads()} thread(s): bare forward "
          f"{forward:.2f} s, capture + reducers {statistics.median(whole):.2f} s (under the profiler)")  # fmt: skip
    print(f"{'reducer':28s} {'s/batch':>8s} {'of forward':>10s}")
    total = 0.0
    for family, seconds in sorted(per_family.items(), key=lambda item: -statistics.median(item[1])):
        median = statistics.median(seconds)
        total += median
        print(f"{family:28s} {median:8.3f} {100 * median / forward:9.1f} %")
    print(f"{'all reducers':28s} {total:8.3f} {100 * total / forward:9.1f} %")


if __name__ == "__main__":
    main()
