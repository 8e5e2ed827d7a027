"""Benchmark: 12 × 12 cross-model minibatch CKA over 512 and 4096 images.

1. Memory: each size runs in a fresh subprocess that generates the features batch by batch (nothing
   pre-stored) and feeds ``CKAAccumulator``; it reports wall time and its RSS high-water mark
   (``ru_maxrss``). Streaming means 8× the images should cost about the same memory.
2. Peer: on the same 4096-image features (stored, as the peer needs them), vitscope's accumulator
   against ckatorch's minibatch CKA (``ckatorch.core.cka_batch``, one call per layer pair), timing and
   the largest absolute difference. Skipped with a message when ckatorch is not installed
   (``pip install ckatorch``; it is no dependency of vitscope).

Run: ``python benchmarks/bench_cka.py`` (prints the numbers of one run).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from vitscope.analyses.cka import CKAAccumulator

LAYERS = 12
BATCH = 64
DIM_A = 384  # ViT-S width
DIMS_B = [64, 64, 128, 128, 256, 256, 512, 512, 1024, 1024, 2048, 2048]  # CNN-like widths
LATENT = 16


def mixing(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return (
        [torch.randn(LATENT, DIM_A, generator=g) for _ in range(LAYERS)],
        [torch.randn(LATENT, d, generator=g) for d in DIMS_B],
    )


def batch_features(
    index: int, maps: tuple[list[torch.Tensor], list[torch.Tensor]]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Features of batch ``index`` for both models: a shared latent plus layer-dependent noise."""
    g = torch.Generator().manual_seed(1000 + index)
    z = torch.randn(BATCH, LATENT, generator=g)
    feats_a = [z @ w + (0.2 + 0.3 * i) * torch.randn(BATCH, w.shape[1], generator=g) for i, w in enumerate(maps[0])]
    feats_b = [
        torch.relu(z @ w) + (1.5 - 0.1 * i) * torch.randn(BATCH, w.shape[1], generator=g) for i, w in enumerate(maps[1])
    ]
    return feats_a, feats_b


def worker(num_images: int) -> dict:
    maps = mixing()
    acc = CKAAccumulator()
    start = time.perf_counter()
    for index in range(num_images // BATCH):
        acc.update(*batch_features(index, maps))
    matrix = acc.matrix()
    seconds = time.perf_counter() - start
    return {
        "images": num_images,
        "seconds": seconds,
        "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "checksum": float(matrix.sum()),
    }


def compare_with_peer(num_images: int) -> None:
    try:
        from ckatorch.core import cka_batch
    except ImportError as err:
        print(f"peer comparison skipped: ckatorch not importable ({err}); `pip install ckatorch` to run it")
        return
    maps = mixing()
    batches = [batch_features(i, maps) for i in range(num_images // BATCH)]
    start = time.perf_counter()
    acc = CKAAccumulator()
    for feats_a, feats_b in batches:
        acc.update(feats_a, feats_b)
    ours = acc.matrix()
    ours_s = time.perf_counter() - start
    stacked_a = [torch.stack([b[0][i] for b in batches]) for i in range(LAYERS)]  # [num_batches, b, d]
    stacked_b = [torch.stack([b[1][j] for b in batches]) for j in range(LAYERS)]
    start = time.perf_counter()
    peer = torch.zeros(LAYERS, LAYERS, dtype=torch.float64)
    for i in range(LAYERS):
        for j in range(LAYERS):
            peer[i, j] = cka_batch(stacked_a[i], stacked_b[j])
    peer_s = time.perf_counter() - start
    print(f"peer ckatorch {_version('ckatorch')}, {num_images} images, 12x12, batch {BATCH}:")
    print(f"  vitscope CKAAccumulator : {ours_s:7.3f} s (one (L, b²) matmul per batch)")
    print(f"  ckatorch cka_batch      : {peer_s:7.3f} s (one call per layer pair)  -> {peer_s / ours_s:.1f}x")
    difference = float((ours - peer).abs().max())
    print(f"  max |difference|        : {difference:.2e}  (CKA range {float(ours.min()):.3f}..{float(ours.max()):.3f})")


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 4096])
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; 12 x 12 layers, batch {BATCH}, float64 Grams")
    results = []
    for size in args.sizes:
        out = subprocess.run(
            [sys.executable, __file__, "--worker", str(size)], capture_output=True, text=True, check=True
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(result)
        print(f"  {size:5d} images: {result['seconds']:7.3f} s, peak RSS {result['maxrss_mib']:7.1f} MiB")
    if len(results) >= 2:
        ratio = results[-1]["maxrss_mib"] / results[0]["maxrss_mib"]
        verdict = "within" if abs(ratio - 1) <= 0.10 else "NOT within"
        print(f"  peak RSS ratio {results[-1]['images']}/{results[0]['images']} images: {ratio:.3f} ({verdict} 10%)")
    compare_with_peer(max(args.sizes))


if __name__ == "__main__":
    main()
