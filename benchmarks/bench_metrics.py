"""Benchmark: the one-pass metric suite against a bare forward pass and against the naive way.

    python benchmarks/bench_metrics.py [--quick] [--images 64] [--repeats 2]

In one run, for timm's vit_small_patch16_224 at 224 px with random weights (``--quick``: a 4-block
model at 112 px, for a smoke test), it prints:

1. suite / forward: wall time of :func:`vitscope.metrics.analyze_model` (every metric, one forward
   pass) over the time of a bare forward pass of the same model with the same non-fused attention
   (target ≤ 1.25);
2. naive / suite: the same metrics the way the reference notebooks (naver-ai/cl-vs-mim) compute
   them, one forward pass per metric keeping every layer, attention copied to numpy and the distance
   matrix rebuilt with a Python N² loop per layer, over the one-pass suite (target ≥ 4);
3. peak memory (RSS high-water mark VmHWM, measured in a fresh subprocess each) of the suite over 64 and
   over 8× as many images in batches of 64 (target: within 10 %).

Timings are the minimum over ``--repeats`` runs. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np
import timm
import torch

from vitscope.analyses import analyze_model
from vitscope.capture import ViTCapture
from vitscope.data import Batch


def build_model(quick: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if quick:
        return timm.create_model("vit_small_patch16_224", pretrained=False, img_size=112, depth=4).eval()
    return timm.create_model("vit_small_patch16_224", pretrained=False).eval()


def random_batches(num_images: int, batch_size: int, image_size: int, seed: int = 0) -> Iterator[Batch]:
    """Seeded random images, generated batch by batch (so the data set itself takes no memory)."""
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, num_images, batch_size):
        size = min(batch_size, num_images - start)
        images = torch.randn(size, 3, image_size, image_size, generator=generator)
        yield Batch(images, torch.zeros(size, dtype=torch.long))


def best_time(function: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def bare_forward(model: torch.nn.Module, images: torch.Tensor) -> None:
    """The model's forward with timm's fused attention switched off, as while capturing."""
    saved = [(block.attn, block.attn.fused_attn) for block in model.blocks]
    for attn, _ in saved:
        attn.fused_attn = False
    try:
        with torch.no_grad():
            model(images)
    finally:
        for attn, value in saved:
            attn.fused_attn = value


# --------------------------------------------------------------------------- the naive reference way
def notebook_distance_matrix(patch_size: int, num_patches: int, length: int) -> np.ndarray:
    """Rebuilt on every call with a Python N² loop, as in the reference notebook."""
    matrix = np.zeros((num_patches, num_patches))
    for i in range(num_patches):
        for j in range(num_patches):
            if i == j:
                continue
            xi, yi = int(i / length), i % length
            xj, yj = int(j / length), j % length
            matrix[i, j] = patch_size * np.linalg.norm([xi - xj, yi - yj])
    return matrix


def notebook_spatial(attn: torch.Tensor) -> np.ndarray:
    attn = attn[:, :, 1:, 1:] + 1e-32
    return (attn / attn.sum(dim=-1, keepdim=True)).cpu().float().numpy()


def naive_suite(model: torch.nn.Module, images: torch.Tensor, groups: int = 2) -> dict[str, list]:
    """Every metric with its own forward pass that keeps all layers, reduced in numpy."""
    capture = ViTCapture(model)
    patch = capture.facts.patch_size[0]
    out: dict[str, list] = {}

    def layers():
        return capture.collect(images)  # one forward pass, every layer kept (cloned)

    out["attention_distance"] = []
    for layer in layers()[1:]:
        attn = notebook_spatial(layer.attn)
        n = attn.shape[-1]
        distance = notebook_distance_matrix(patch, n, int(math.sqrt(n)))
        out["attention_distance"].append((attn * distance[None, None]).sum(-1).mean(-1).mean(0))
    out["nmi"] = []
    for layer in layers()[1:]:
        attn = torch.from_numpy(notebook_spatial(layer.attn))
        b, h, q, _k = attn.shape
        pq = torch.full((b, h, q), 1.0 / q)
        pk = (attn * pq[..., None]).sum(-2)
        mi = (attn * pq[..., None] * torch.log(attn / pk[:, :, None, :])).sum((-2, -1))
        eq, ek = -(pq * pq.log()).sum(-1), -(pk * pk.log()).sum(-1)
        out["nmi"].append((mi / torch.sqrt(eq * ek)).mean(0).numpy())
    out["attention_entropy"] = []
    for layer in layers()[1:]:
        attn = notebook_spatial(layer.attn)
        out["attention_entropy"].append((-(attn * np.log(attn)).sum(-1).mean(-1)).mean(0))
    out["token_cosine"] = []
    for layer in layers():
        tokens = layer.spatial_tokens.numpy().astype(np.float64)
        unit = tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)
        gram = unit @ unit.transpose(0, 2, 1)  # [B, N, N]
        n = gram.shape[-1]
        out["token_cosine"].append(((gram.sum((-2, -1)) - n) / (n * (n - 1))).mean())
    out["head_cosine"] = []
    for layer in layers()[1:]:
        heads = layer.spatial_head_outputs.numpy().astype(np.float64)  # [B, H, N, D]
        unit = heads / np.linalg.norm(heads, axis=-1, keepdims=True)
        gram = np.einsum("bhnd,bgnd->bnhg", unit, unit)
        h = gram.shape[-1]
        out["head_cosine"].append(((gram.sum((-2, -1)) - h) / (h * (h - 1))).mean())
    out["depth_cosine"] = []
    kept = layers()
    for before, after in itertools.pairwise(kept):
        a, b = before.spatial_tokens.numpy(), after.spatial_tokens.numpy()
        cosine = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        out["depth_cosine"].append(cosine.mean())
    out["singular_values"] = []
    for layer in layers():
        tokens = layer.spatial_tokens.numpy()
        spectra = [
            np.linalg.svd(tokens[2 * g : 2 * g + 2].reshape(-1, tokens.shape[-1]), compute_uv=False)
            for g in range(groups)
        ]
        out["singular_values"].append(np.mean(spectra, axis=0))
    out["fourier"] = []
    for layer in layers():
        tokens = layer.spatial_tokens
        b, n, c = tokens.shape
        h = int(math.sqrt(n))
        maps = tokens.transpose(1, 2).reshape(b, c, h, h)
        amplitude = (torch.fft.fft2(maps).abs() + 1e-6).log()
        amplitude = torch.roll(amplitude, shifts=(h // 2, h // 2), dims=(2, 3)).mean(dim=(0, 1))
        diagonal = amplitude.diag()[h // 2 :]
        out["fourier"].append((diagonal - diagonal[0]).numpy())
    out["residual_ratio"] = []
    for layer in layers()[1:]:
        stream, attn_branch = layer.stream_in.numpy(), layer.attn_branch.numpy()
        mid, mlp_branch = stream + attn_branch, layer.mlp_branch.numpy()
        norm = lambda x: np.linalg.norm(x.reshape(len(x), -1), axis=-1)  # noqa: E731
        out["residual_ratio"].append(((norm(stream) / norm(attn_branch)).mean(), (norm(mid) / norm(mlp_branch)).mean()))
    return out


# ----------------------------------------------------------------------------------- peak memory
def peak_memory_child(num_images: int, batch_size: int, quick: bool) -> None:
    """Run the suite over ``num_images`` and print the RSS high-water mark (MiB) as JSON."""
    model = build_model(quick)
    size = model.patch_embed.img_size[0]
    analyze_model(model, random_batches(num_images, batch_size, size), label="bench", progress=None)
    print(json.dumps({"images": num_images, "peak_mib": peak_rss_mib()}))


def peak_rss_mib() -> float:
    """This process's RSS high-water mark. VmHWM belongs to the address space made at exec, whereas
    getrusage's ru_maxrss of a forked child starts from the parent's peak."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_memory(num_images: int, batch_size: int, quick: bool) -> float:
    command = [sys.executable, __file__, "--child-images", str(num_images), "--batch-size", str(batch_size)]
    if quick:
        command.append("--quick")
    # A fixed mmap threshold makes glibc hand freed tensors back to the OS, so the high-water mark
    # follows live memory rather than how the heap happened to be reused.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    result = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return float(json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4-block model at 112 px (smoke test)")
    parser.add_argument("--images", type=int, default=64, help="images per timed pass (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs; the minimum is kept")
    parser.add_argument("--memory-factor", type=int, default=8, help="peak memory: images × this vs images")
    parser.add_argument("--child-images", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # show each result as soon as it is measured
    if args.child_images is not None:
        peak_memory_child(args.child_images, args.batch_size, args.quick)
        return 0

    model = build_model(args.quick)
    size = model.patch_embed.img_size[0]
    images = next(random_batches(args.images, args.images, size)).images
    print(
        f"model vit_small_patch16_224{' (quick: 4 blocks)' if args.quick else ''}, {size} px, "
        f"{args.images} images, {torch.get_num_threads()} threads, random weights"
    )
    bare_forward(model, images[:2])  # warm-up

    def suite() -> None:
        analyze_model(model, [Batch(images, torch.zeros(len(images), dtype=torch.long))], label="bench", progress=None)

    forward_s = best_time(lambda: bare_forward(model, images), args.repeats)
    suite_s = best_time(suite, args.repeats)
    naive_s = best_time(lambda: naive_suite(model, images), 1)
    print(f"bare forward (non-fused attention): {forward_s:8.2f} s")
    print(
        f"one-pass metric suite:              {suite_s:8.2f} s   suite / forward = {suite_s / forward_s:5.2f}"
        f"   (target <= 1.25)"
    )
    print(
        f"naive way (one pass per metric):    {naive_s:8.2f} s   naive / suite   = {naive_s / suite_s:5.2f}"
        f"   (target >= 4)"
    )

    small = peak_memory(args.images, args.batch_size, args.quick)
    large = peak_memory(args.images * args.memory_factor, args.batch_size, args.quick)
    print(f"peak RSS, {args.images} images:  {small:8.1f} MiB")
    print(
        f"peak RSS, {args.images * args.memory_factor} images: {large:8.1f} MiB   "
        f"ratio = {large / small:5.3f}   (target within 10 %)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
