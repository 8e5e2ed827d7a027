"""Training you can watch: the per-token suite and a kNN probe on a fixed held-out batch, every N steps.

Every ``track_every`` optimizer steps (and once before the first, the untrained control) rank 0 measures
the encoder in eval mode under ``torch.no_grad`` with vitscope's own capture and reducers
(:func:`vitscope.analyses.analyze_model`): attention distance, NMI, attention entropy, token cosine,
effective rank (every pair of images) and the high-frequency Fourier Δ, per block and as the mean over
the early (first third) and late (last third) blocks; plus a kNN probe (cosine, k = 20) on held-out
labelled images and the spread of their embeddings. The held-out images are a stratified, seeded
subset of the data's test split, the same at every measurement and on resume.

The measurement never changes the training trajectory: the RNG states (CPU and CUDA) and every
module's train/eval flag are restored afterwards, and nothing trained is touched (same weights with
and without tracking, bit for bit on CPU).

Each measurement is one ``log.jsonl`` record (``"kind": "track"``, see :func:`Tracker.measure`) and
scalars in TensorBoard event files under ``RUN/tensorboard/`` (``torch.utils.tensorboard``; skipped with
a one-line note when the ``tensorboard`` package is missing: ``pip install vitscope[track]``), where
the step records' loss, learning rate and gradient norm go too (``train/``; fine-tuning's top-1:
``eval/``). Warnings (in the record and on the progress bar; not for the untrained control) name the
metric and the threshold:

- attention near uniform: a late-block head whose mean row entropy is at least
  :data:`UNIFORM_ENTROPY_SHARE` × log N (N spatial keys), when at least half the late heads are;
- embedding spread collapsed: :func:`embedding_spread` below :data:`SPREAD_FLOOR`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitscope.pretrain.curves import log_points

__all__ = [
    "TRACK_METRICS",
    "TRACK_KIND",
    "TENSORBOARD_DIR",
    "UNIFORM_ENTROPY_SHARE",
    "SPREAD_FLOOR",
    "held_out_images",
    "preserved_training_state",
    "measure_encoder",
    "embedding_spread",
    "knn_top1",
    "Tracker",
]

TRACK_METRICS = ("attention_distance", "nmi", "attention_entropy", "token_cosine", "effective_rank", "fourier_high")
TRACK_KIND = "track"  # the "kind" of a measurement's log.jsonl record
TENSORBOARD_DIR = "tensorboard"
UNIFORM_ENTROPY_SHARE = 0.98  # a head whose entropy is ≥ this share of log N attends (nearly) uniformly
SPREAD_FLOOR = 0.05  # embedding_spread below this: the embeddings have collapsed towards one direction
KNN_K = 20


def held_out_images(data: str, count: int, seed: int, size: int, mean: tuple, std: tuple) -> tuple[Tensor, Tensor]:
    """A stratified, seeded subset of ``data``'s test split, as the encoder reads it: (float [n, 3, size, size]
    normalised with ``mean``/``std``, int64 labels [n], −1 where unlabelled)."""
    from vitscope.pretrain import augment
    from vitscope.pretrain.batches import load_images

    raw, labels = load_images(data, "test", count, seed, size)
    images = augment.to_float_rgb(raw)
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return augment.normalize(images, mean, std), labels


@contextmanager
def preserved_training_state(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside; afterwards every module's train flag and the RNG states
    (CPU, and CUDA when initialised) are as they were."""
    flags = [(module, module.training) for module in model.modules()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for module, flag in flags:
            module.training = flag
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def embedding_spread(features: Tensor) -> float:
    """Spread of L2-normalised embeddings [n, d]: the mean over dimensions of their standard deviation
    across images, × √d. About 1 for embeddings spread over the sphere, 0 when they all point one way
    (the collapse measure of lightly's ``std_of_l2_normalized``, rescaled)."""
    normed = F.normalize(features.double(), dim=-1)
    return float(normed.std(dim=0).mean() * math.sqrt(features.shape[-1]))


def knn_top1(features: Tensor, labels: Tensor, k: int = KNN_K) -> float | None:
    """kNN top-1 (cosine, majority of k) of the odd-numbered images against the even-numbered ones;
    None when the images are unlabelled or fewer than 4."""
    from sklearn.neighbors import KNeighborsClassifier

    if len(labels) < 4 or int(labels.min()) < 0:
        return None
    x, y = features.double().cpu().numpy(), labels.cpu().numpy()
    bank, query = np.arange(0, len(y), 2), np.arange(1, len(y), 2)
    knn = KNeighborsClassifier(n_neighbors=min(k, len(bank)), metric="cosine")
    knn.fit(x[bank], y[bank])
    return float((knn.predict(x[query]) == y[query]).mean())


def _pooled(encoder: nn.Module, images: Tensor, batch_size: int, dtype: torch.dtype | None) -> Tensor:
    """The encoder's pooled, normed embedding (timm: ``forward_head(pre_logits=True)``) of each image, [n, C]."""
    out = []
    device = next(encoder.parameters()).device
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            tokens = encoder.forward_features(x)  # type: ignore[operator]
            out.append(encoder.forward_head(tokens, pre_logits=True).float())  # type: ignore[operator]
    return torch.cat(out)


def _block_ranges(depth: int) -> dict[str, range]:
    third = max(1, depth // 3)
    return {"early": range(1, third + 1), "late": range(depth - third + 1, depth + 1)}


def summarise(rows: list[dict], depth: int) -> dict[str, float]:
    """``{metric}/block{l}`` for blocks 1..L and ``{metric}/early``, ``{metric}/late`` (means over the
    first and last third of the blocks) from :func:`analyze_model` rows (layer means, head empty)."""
    per_layer: dict[str, dict[int, float]] = {}
    for row in rows:
        if row["head"] is None and row["metric"] in TRACK_METRICS and row.get("freq") is None:
            per_layer.setdefault(row["metric"], {})[int(row["layer"])] = float(row["value"])
    summary: dict[str, float] = {}
    for metric in TRACK_METRICS:
        values = per_layer.get(metric, {})
        for name, blocks in _block_ranges(depth).items():
            present = [values[b] for b in blocks if b in values]
            if present:
                summary[f"{metric}/{name}"] = sum(present) / len(present)
        for block in range(1, depth + 1):
            if block in values:
                summary[f"{metric}/block{block}"] = values[block]
    return summary


def _uniform_heads(rows: list[dict], depth: int, num_keys: int) -> tuple[int, int]:
    """(near-uniform heads, heads) over the late blocks: entropy ≥ UNIFORM_ENTROPY_SHARE · log N."""
    late = _block_ranges(depth)["late"]
    heads = [
        float(r["value"])
        for r in rows
        if r["metric"] == "attention_entropy" and r["head"] is not None and int(r["layer"]) in late
    ]
    limit = UNIFORM_ENTROPY_SHARE * math.log(num_keys)
    return sum(h >= limit for h in heads), len(heads)


def measure_encoder(
    encoder: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    metric_images: int,
    dtype: torch.dtype | None = None,
) -> tuple[dict[str, float], list[str]]:
    """The tracked values of a timm ViT on held-out images, and the warnings they raise.

    Args:
        encoder: a timm VisionTransformer (classifier head or none); left as it was found.
        images: normalised held-out images [n, 3, H, W]; the first ``metric_images`` feed the per-token
            suite, all of them the kNN probe and the embedding spread.
        labels: int64 [n] (−1: unlabelled, no kNN).
    """
    from vitscope.analyses import analyze_model

    device = next(encoder.parameters()).device
    depth = len(encoder.blocks)  # type: ignore[arg-type]
    grid = cast("tuple[int, int]", encoder.patch_embed.grid_size)  # type: ignore[union-attr]
    num_keys = int(grid[0]) * int(grid[1])
    with preserved_training_state(encoder):
        results = analyze_model(
            encoder,
            [(images[:metric_images], labels[:metric_images])],
            label="track",
            metrics=list(TRACK_METRICS),
            device=device,
            dtype=dtype if device.type == "cuda" else None,
            spectrum_groups=None,
            progress=None,
        )
        features = _pooled(encoder, images, 256, dtype if device.type == "cuda" else None)
    rows = [dict(row) for row in results.rows]
    values = summarise(rows, depth)
    values["embedding_spread"] = embedding_spread(features)
    knn = knn_top1(features, labels)
    if knn is not None:
        values["knn_top1"] = knn
    uniform, heads = _uniform_heads(rows, depth, num_keys)
    values["uniform_heads/late"] = uniform / max(heads, 1)
    warnings = []
    if heads and uniform * 2 >= heads:
        limit = UNIFORM_ENTROPY_SHARE * math.log(num_keys)
        warnings.append(
            f"attention near uniform: {uniform}/{heads} late-block heads have attention_entropy ≥ "
            f"{UNIFORM_ENTROPY_SHARE}·log N = {limit:.3f} nats"
        )
    if values["embedding_spread"] < SPREAD_FLOOR:
        warnings.append(
            f"embedding collapse: embedding_spread {values['embedding_spread']:.4f} < {SPREAD_FLOOR} "
            "(the embeddings point nearly one way)"
        )
    return values, warnings


def _summary_line(done: int, values: dict[str, float]) -> str:
    parts = [f"track after {done} steps:"]
    if "knn_top1" in values:
        parts.append(f"kNN top-1 {values['knn_top1']:.3f}")
    for key, label in (("attention_entropy/late", "late entropy"), ("effective_rank/late", "late eff. rank")):
        if key in values:
            parts.append(f"{label} {values[key]:.3f}")
    parts.append(f"spread {values['embedding_spread']:.3f}")
    return " ".join(parts[:1]) + " " + ", ".join(parts[1:])


class Tracker:
    """Rank 0's measurements during a run (see the module docstring); ``out`` is the run directory."""

    def __init__(
        self,
        encoder: nn.Module,
        out: Path,
        *,
        every: int,
        data: str,
        seed: int,
        mean: tuple,
        std: tuple,
        steps_per_epoch: int,
        start: int,
        images: int = 64,
        probe_images: int = 512,
        dtype: torch.dtype | None = None,
    ) -> None:
        size = int(encoder.patch_embed.img_size[0])  # type: ignore[index, union-attr]
        self.encoder, self.out, self.every, self.dtype = encoder, out, every, dtype
        self.metric_images = images
        self.steps_per_epoch = steps_per_epoch
        self.images, self.labels = held_out_images(data, max(images, probe_images), seed, size, mean, std)
        self.writer = _summary_writer(out / TENSORBOARD_DIR, purge_step=start + 1 if start else None)
        self.logged = {p["trained_steps"] for p in log_points(out)}  # measured before a resume: not repeated
        self.alert: str | None = None  # the last measurement's warnings, short, for the progress bar
        self.measurements, self.seconds = 0, 0.0  # this process's measurements and their time

    def due(self, done: int) -> bool:
        """Measure before the first step (the untrained control) and every ``every`` steps, unless the
        run's log already holds that measurement (a resumed run)."""
        return done % self.every == 0 and done not in self.logged

    def measure(self, done: int) -> tuple[dict[str, Any], str, list[str]]:
        """One measurement after ``done`` steps: its log.jsonl record (``step`` = done − 1, as the step
        records; ``trained_steps`` = done; ``metrics``; ``warnings``; ``seconds`` it took), a one-line
        summary and the warnings, each as a line."""
        tick = time.perf_counter()
        values, warnings = measure_encoder(
            self.encoder, self.images, self.labels, metric_images=self.metric_images, dtype=self.dtype
        )
        seconds = time.perf_counter() - tick
        self.measurements, self.seconds = self.measurements + 1, self.seconds + seconds
        if done == 0:
            warnings = []  # untrained: attention is near uniform by construction
        record = {
            "step": done - 1,
            "kind": TRACK_KIND,
            "trained_steps": done,
            "epoch": done / self.steps_per_epoch,
            "metrics": values,
            "warnings": warnings,
            "seconds": seconds,
        }
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"track/{key}", value, done)
            self.writer.add_scalar("track/seconds", seconds, done)
            self.writer.flush()
        self.alert = "; ".join(w.split(":")[0] for w in warnings) or None
        lines = [f"warning after {done} steps: {w}" for w in warnings]
        return record, _summary_line(done, values), lines

    def log_step(self, done: int, record: dict[str, Any], prefix: str = "train") -> None:
        """The scalars of a step record (loss, lr, grad_norm, ...) under ``train/``; fine-tuning's
        evaluation (top1) under ``eval/``."""
        if self.writer is None:
            return
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{key}", value, done)

    def overhead(self, step_seconds: float) -> str:
        """One line: the measurements' time as a share of the training steps' time."""
        return (
            f"tracking: {self.measurements} measurements took {self.seconds:.1f} s, "
            f"{100 * self.seconds / step_seconds:.1f} % of the {step_seconds:.1f} s of training steps"
        )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _summary_writer(path: Path, purge_step: int | None) -> Any:
    """A TensorBoard writer, or None (with a one-line note) when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print(
            "note: tensorboard is not installed; tracking goes to log.jsonl only (pip install 'vitscope[track]')",
            file=sys.stderr,
        )
        return None
    return SummaryWriter(str(path), purge_step=purge_step)
