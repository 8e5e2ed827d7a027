"""Benchmark: the whole analysis suite against a bare forward pass of the same models, one process and torchrun.

    python benchmarks/bench_analyze.py [--images 32] [--batch-size 16] [--device cpu] [--processes 1 2]
                                       [--models vit_base_patch16_224 resnet50] [--repeats 2] [--json PATH]

For ViT-B/16 at 224 px and a ResNet-50 (random weights; ``--models`` to change), on the same Fashion-MNIST
test images in each model's own input pipeline, it times:

1. bare forward: every model's forward pass over the images, batch by batch, with the same non-fused
   attention the capture needs (and, for reference, timm's fused attention);
2. suite pass: ``vitscope.analyses.analyze`` with everything that rides on the one lockstep pass over the
   test images (every per-layer metric, CKA within and across the models, attention maps, spatial
   localisation) — suite / forward is the overhead of measuring everything at once;
3. the same suite pass under ``torchrun --nproc_per_node=P`` for each ``--processes`` value, giving
   images/s and the scaling from 1 to P processes (each process with cores / P threads on a CPU).

It prints ratios measured in one run (the machine is noisy: compare ratios, not seconds). On a GPU
(``--device cuda``) the goal is the suite within 1.3× a bare forward and ≥ 90 % scaling from 1 to 2
processes; on this CPU, within 1.15×. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from vitscope.analyses import ALL_METRICS

PASS_ANALYSES = (*ALL_METRICS, "cka", "attention_maps", "localisation")  # what rides on the one pass


def specs(names: list[str]) -> dict[str, str]:
    return {name.split("_")[0] + str(i): f"random:{name}" for i, name in enumerate(names)}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bare_forward(names: list[str], images: int, batch_size: int, device: str, fused: bool) -> float:
    """Seconds for every model's plain forward over the images (each in its own pipeline)."""
    from vitscope.capture import make_capture
    from vitscope.data import build_transform, make_loader, open_dataset
    from vitscope.models import load_model

    total = 0.0
    for spec in specs(names).values():
        model = load_model(spec).to(device).eval()
        capture = make_capture(model)
        loader = make_loader(open_dataset("fashion-mnist", "test", build_transform(model)), num_images=images,
                             batch_size=batch_size)  # fmt: skip
        batches = [batch.images.to(device) for batch in loader]
        context = capture._unfused_attention() if hasattr(capture, "_unfused_attention") and not fused else None
        with torch.no_grad():
            model(batches[0])  # warm-up
            sync(device)
            start = time.perf_counter()
            if context is not None:
                with context:
                    for x in batches:
                        model(x)
            else:
                for x in batches:
                    model(x)
            sync(device)
            total += time.perf_counter() - start
    return total


def suite_pass(names: list[str], images: int, batch_size: int, device: str) -> tuple[float, float]:
    """(seconds of the lockstep pass, seconds of the whole call) of analyze() with the pass's analyses."""
    from vitscope.analyses import AnalysisConfig, analyze

    config = AnalysisConfig(num_images=images, batch_size=batch_size, device=device, analyses=PASS_ANALYSES)
    start = time.perf_counter()
    output = analyze(specs(names), "fashion-mnist", config)
    whole = time.perf_counter() - start
    if output is None:  # a torchrun rank other than 0
        return 0.0, whole
    return float(output.results.meta["pass_time_s"]), whole


def worker(args: argparse.Namespace) -> None:
    """Under torchrun: one timed suite pass, rank 0 prints JSON."""
    from vitscope.distributed import init_distributed

    env = init_distributed(args.device)
    suite_pass(args.models, args.images, args.batch_size, str(env.device))  # warm-up (caches, allocator)
    pass_s, _ = suite_pass(args.models, args.images, args.batch_size, str(env.device))
    if env.is_main:
        print(json.dumps({"pass_s": pass_s}))


def torchrun_pass(args: argparse.Namespace, processes: int) -> float:
    threads = max(1, (os.cpu_count() or 1) // processes)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               __file__, "--worker", "--images", str(args.images), "--batch-size", str(args.batch_size),
               "--device", args.device, "--models", *args.models]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["pass_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=["vit_base_patch16_224", "resnet50"])
    parser.add_argument("--processes", nargs="*", type=int, default=[1, 2], help="torchrun sizes; none: skip")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"models {args.models}, {args.images} Fashion-MNIST images, batch {args.batch_size}, device {args.device}, "
          f"{torch.get_num_threads()} thread(s)")  # fmt: skip
    rows: dict[str, list[float]] = {"forward": [], "forward_fused": [], "suite_pass": [], "suite_call": []}
    suite_pass(args.models, args.images, args.batch_size, args.device)  # warm-up
    for _ in range(args.repeats):  # interleaved, so that load drifts hit both alike
        rows["forward"].append(bare_forward(args.models, args.images, args.batch_size, args.device, fused=False))
        rows["forward_fused"].append(bare_forward(args.models, args.images, args.batch_size, args.device, fused=True))
        pass_s, call_s = suite_pass(args.models, args.images, args.batch_size, args.device)
        rows["suite_pass"].append(pass_s)
        rows["suite_call"].append(call_s)
    med = {key: statistics.median(values) for key, values in rows.items()}
    print(f"bare forward (non-fused attention): {med['forward']:.2f} s  ({args.images / med['forward']:.2f} img/s)")
    print(f"bare forward (fused attention)    : {med['forward_fused']:.2f} s")
    print(f"suite pass (every per-layer metric, CKA, maps, localisation): {med['suite_pass']:.2f} s"
          f"  ({args.images / med['suite_pass']:.2f} img/s)")  # fmt: skip
    ratio, fused_ratio = med["suite_pass"] / med["forward"], med["suite_pass"] / med["forward_fused"]
    print(f"  suite / bare forward = {ratio:.3f}  (vs fused: {fused_ratio:.3f}); whole call {med['suite_call']:.2f} s")
    scaling = {}
    for processes in args.processes:
        seconds = torchrun_pass(args, processes)
        scaling[processes] = seconds
        speedup = scaling[min(scaling)] / seconds
        efficiency = speedup / (processes / min(scaling))
        print(f"torchrun {processes} process(es): suite pass {seconds:.2f} s, {args.images / seconds:.2f} img/s, "
              f"speed-up {speedup:.2f}x over {min(scaling)}, efficiency {efficiency:.0%}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "seconds": rows, "torchrun": scaling}, indent=2))


if __name__ == "__main__":
    main()
