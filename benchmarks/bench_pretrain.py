"""Benchmark: training throughput of each pretraining objective on this CPU, and its share of peak.

    python benchmarks/bench_pretrain.py [--batch-size 64] [--steps 5] [--threads N] [--tiny] [--json PATH]

For the bundled-model config (vit_tiny_patch16_224 with img_size 28, patch 4, embed_dim 64, depth 6,
4 heads — ``--tiny``: a 2-block 32-dim ViT at 16 px, for a smoke test) and each method (moco,
simmim, mae, hybrid with SimMIM and λ = 0.2), it times whole training steps exactly as the trainer
runs them (batched augmentation and masks from a seeded generator, forward, backward, gradient
clipping, AdamW) on Fashion-MNIST-sized uint8 images, and prints:

1. images/s: batch size over the median step time (after one warm-up step);
2. FLOP/step: counted with ``torch.utils.flop_counter.FlopCounterMode`` over one step (forward and
   backward: matmuls, convolutions, attention), and the achieved FLOP/s = FLOP/step ÷ median time;
3. fraction of peak: achieved FLOP/s ÷ the FLOP/s of a large fp32 matmul (2048³) measured in the
   same run with the same threads — how much of the machine the small model's many small ops use.
Not a test: nothing is asserted. On a shared machine, run it when it is quiet (and compare runs
only with the same --threads).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from vitscope.io import write_json_atomic
from vitscope.pretrain.objectives import ObjectiveConfig, build_objective
from vitscope.pretrain.optim import param_groups

BUNDLED = {"img_size": 28, "patch_size": 4, "embed_dim": 64, "depth": 6, "num_heads": 4}
TINY = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
METHODS = ("moco", "simmim", "mae", "hybrid")


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def cpu_attention_flop_mapping() -> dict:
    """FLOP formulas for the CPU fused-attention kernels, which FlopCounterMode does not count itself."""
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward_flops
    return mapping


def matmul_flops_per_s(n: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of an n×n×n fp32 matmul (2n³ FLOP) over ``repeats`` runs."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def make_step(method: str, model_kwargs: dict, images: torch.Tensor):
    torch.manual_seed(0)
    objective = build_objective("vit_tiny_patch16_224", model_kwargs, ObjectiveConfig(method=method))
    optimizer = torch.optim.AdamW(param_groups(objective, 0.05), lr=1e-4, betas=(0.9, 0.95))
    params = [p for p in objective.parameters() if p.requires_grad]
    counter = {"step": 0}

    def step() -> None:
        generator = torch.Generator().manual_seed(counter["step"])
        counter["step"] += 1
        inputs = objective.prepare(images, generator, 0.99)
        loss = objective(inputs)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        optimizer.step()

    return step


def bench_method(method: str, model_kwargs: dict, batch: int, steps: int) -> dict:
    size = model_kwargs["img_size"]
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch, 28, 28), dtype=np.uint8))
    step = make_step(method, model_kwargs, images)
    step()  # warm-up
    with FlopCounterMode(display=False, custom_mapping=cpu_attention_flop_mapping()) as flops:
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    total_flops = flops.get_total_flops()
    return {
        "method": method,
        "img_size": size,
        "batch": batch,
        "step_s": median,
        "images_per_s": batch / median,
        "flop_per_step": total_flops,
        "flop_per_s": total_flops / median,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--tiny", action="store_true", help="a 2-block 16 px ViT (smoke test)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_kwargs = TINY if args.tiny else BUNDLED
    peak = matmul_flops_per_s()
    print(f"config {model_kwargs}, batch {args.batch_size}, {torch.get_num_threads()} thread(s)")
    print(f"peak: fp32 2048^3 matmul {peak / 1e9:.1f} GFLOP/s")
    print(f"{'method':>8} {'images/s':>10} {'step ms':>9} {'GFLOP/step':>11} {'GFLOP/s':>9} {'of peak':>8}")
    rows = []
    for method in args.methods:
        row = bench_method(method, model_kwargs, args.batch_size, args.steps)
        row["fraction_of_matmul_peak"] = row["flop_per_s"] / peak
        rows.append(row)
        print(
            f"{method:>8} {row['images_per_s']:>10.1f} {row['step_s'] * 1e3:>9.1f} {row['flop_per_step'] / 1e9:>11.2f}"
            f" {row['flop_per_s'] / 1e9:>9.2f} {row['fraction_of_matmul_peak']:>8.1%}"
        )
    # after the rows: the matmul peak again, since a shared machine's load drifts during the run
    peak_after = matmul_flops_per_s()
    print(f"peak after: {peak_after / 1e9:.1f} GFLOP/s")
    if args.json:
        write_json_atomic(
            args.json,
            {
                "config": model_kwargs,
                "threads": torch.get_num_threads(),
                "matmul_flop_per_s": [peak, peak_after],
                "rows": rows,
            },
        )


if __name__ == "__main__":
    main()
