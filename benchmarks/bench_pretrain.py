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

``--per-image`` also times each step with the augmentation done the way reference training code does
it: torchvision ``transforms.v2`` applied image by image (a DataLoader's per-sample transform, here
in the training process, as on a machine with no spare core for workers), the same recipe as
vitscope's batched augmentation; the "batched ×" column is the per-image step time over vitscope's.
Not a test: nothing is asserted. On a shared machine, run it when it is quiet (and compare runs
only with the same --threads).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from unittest import mock

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from torchvision.transforms import v2

from vitscope.io import write_json_atomic
from vitscope.pretrain import augment
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
    mapping: dict = {}
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


@functools.lru_cache(maxsize=8)
def per_image_transform(size: int, spec: augment.ViewSpec, mean: tuple, std: tuple) -> v2.Compose:
    """The recipe of ``spec`` as a torchvision per-image pipeline on a float [3, H, W] image in [0, 1]
    (built once per view recipe, as a DataLoader's transform is)."""
    steps: list = [
        v2.RandomResizedCrop(size, scale=spec.crop.scale, ratio=spec.crop.ratio, antialias=True),
        v2.RandomHorizontalFlip(spec.crop.flip_p),
    ]
    if spec.jitter_p > 0:
        jitter = v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation)
        steps.append(v2.RandomApply([jitter], p=spec.jitter_p))
    if spec.gray_p > 0:
        steps.append(v2.RandomGrayscale(spec.gray_p))
    if spec.blur_p > 0:
        radius = max(1, int(np.ceil(3 * spec.blur_sigma[1])))
        steps.append(v2.RandomApply([v2.GaussianBlur(2 * radius + 1, spec.blur_sigma)], p=spec.blur_p))
    if spec.solarize_p > 0:
        steps.append(v2.RandomSolarize(0.5, p=spec.solarize_p))
    steps.append(v2.Normalize(list(mean), list(std)))
    return v2.Compose(steps)


def per_image_make_view(images, size, spec, generator, mean, std) -> torch.Tensor:
    """Drop-in for ``augment.make_view`` that augments one image at a time with torchvision."""
    transform = per_image_transform(size, spec, tuple(mean), tuple(std))
    return torch.stack([transform(image) for image in images])


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


def _median_step_s(step, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_method(method: str, model_kwargs: dict, batch: int, steps: int, per_image: bool = False) -> dict:
    size = model_kwargs["img_size"]
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch, 28, 28), dtype=np.uint8))
    step = make_step(method, model_kwargs, images)
    step()  # warm-up
    with FlopCounterMode(display=False, custom_mapping=cpu_attention_flop_mapping()) as flops:
        step()
    median = _median_step_s(step, steps)
    extra = {}
    if per_image:  # interleaved with the batched timing's run, on the same model, so load drift hits both
        with mock.patch.object(augment, "make_view", per_image_make_view):  # the objectives call augment.make_view
            step()
            per_image_s = _median_step_s(step, steps)
        extra = {"per_image_step_s": per_image_s, "per_image_images_per_s": batch / per_image_s}
    total_flops = flops.get_total_flops()
    return {
        **extra,
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
    parser.add_argument(
        "--per-image", action="store_true", help="also time torchvision per-image augmentation (the usual way)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_kwargs = TINY if args.tiny else BUNDLED
    peak = matmul_flops_per_s()
    print(f"config {model_kwargs}, batch {args.batch_size}, {torch.get_num_threads()} thread(s)")
    print(f"peak: fp32 2048^3 matmul {peak / 1e9:.1f} GFLOP/s")
    header = f"{'method':>8} {'images/s':>10} {'step ms':>9} {'GFLOP/step':>11} {'GFLOP/s':>9} {'of peak':>8}"
    if args.per_image:
        header += f" {'per-image img/s':>16} {'of peak':>8} {'batched ×':>10}"
    print(header)
    rows = []
    for method in args.methods:
        row = bench_method(method, model_kwargs, args.batch_size, args.steps, per_image=args.per_image)
        row["fraction_of_matmul_peak"] = row["flop_per_s"] / peak
        line = (
            f"{method:>8} {row['images_per_s']:>10.1f} {row['step_s'] * 1e3:>9.1f} {row['flop_per_step'] / 1e9:>11.2f}"
            f" {row['flop_per_s'] / 1e9:>9.2f} {row['fraction_of_matmul_peak']:>8.1%}"
        )
        if args.per_image:
            row["per_image_fraction_of_matmul_peak"] = row["flop_per_step"] / row["per_image_step_s"] / peak
            speedup = row["per_image_step_s"] / row["step_s"]
            line += f" {row['per_image_images_per_s']:>16.1f} {row['per_image_fraction_of_matmul_peak']:>8.1%}"
            line += f" {speedup:>9.2f}x"
        rows.append(row)
        print(line)
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
