"""Every metric of :mod:`vitscope.metrics`, streamed over a data set in one forward pass.

Each reducer consumes :class:`~vitscope.capture.LayerOutput` s block by block (see
:mod:`vitscope.analyses.reducer`), reduces them to per-image values at once and keeps only running
moments (count, mean, sum of squared deviations, merged per batch as in Chan et al.) on the
device, in float64 (float32 on MPS, which has no float64). Attention maps and tokens are dropped as
soon as a block is reduced; nothing syncs with the host until :meth:`rows`. Rows follow :mod:`vitscope.results`:

- ``attention_distance``, ``nmi``, ``attention_entropy``: per head (``head`` = 0..H−1) and per layer
  (``head`` empty: the mean over heads), layers 1..L.
- ``token_cosine``, ``effective_rank``, ``fourier_high``: layers 0..L (0 = patch embedding).
- ``head_cosine``, ``residual_ratio_attn``, ``residual_ratio_mlp``: layers 1..L.
- ``depth_cosine``: between depth l−1 and l, reported at layer l = 1..L.
- curves for figures: ``fourier_delta`` (column ``freq``) and ``singular_values`` (column ``index``).

``value`` is the mean over images, ``stderr`` its standard error (sample std / sqrt(n)), ``n`` the
image count. Singular values and effective rank are per group of k images (docs/metrics.md), over the
first ``spectrum_groups`` groups only (default :data:`SPECTRUM_GROUPS`): their stderr is over groups,
their ``n`` the images in them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vitscope.analyses.driver import ModelPass, run_lockstep
from vitscope.analyses.reducer import MomentsReducer, Reducer, tensors_to
from vitscope.capture import LayerOutput, ModelFacts, make_capture
from vitscope.data import SkipCounter
from vitscope.metrics import (
    attention_distance,
    depth_cosine_similarity,
    effective_rank,
    entropy_from_parts,
    fourier_log_amplitude_diagonal,
    head_cosine_similarity,
    image_chunks,
    key_marginal,
    mean_row_kl_to_uniform,
    nmi_from_parts,
    residual_ratio,
    singular_values,
    spatial_attention_for_reduction,
    token_cosine_similarity,
)
from vitscope.metrics.tensors import reduction_dtype
from vitscope.results import Results
from vitscope.runmeta import RunMeta, model_meta, run_versions

__all__ = [
    "SCALAR_METRICS",
    "CURVE_METRICS",
    "ALL_METRICS",
    "ATTENTION_METRICS",
    "BRANCH_METRICS",
    "SPECTRUM_GROUPS",
    "AttentionReducer",
    "TokenCosineReducer",
    "HeadCosineReducer",
    "DepthCosineReducer",
    "SpectrumReducer",
    "FourierReducer",
    "ResidualRatioReducer",
    "check_metrics",
    "metric_reducers",
    "analyze_model",
]

SCALAR_METRICS = (
    "attention_distance",
    "nmi",
    "attention_entropy",
    "token_cosine",
    "head_cosine",
    "depth_cosine",
    "effective_rank",
    "fourier_high",
    "residual_ratio_attn",
    "residual_ratio_mlp",
)
CURVE_METRICS = ("fourier_delta", "singular_values")
ALL_METRICS = SCALAR_METRICS + CURVE_METRICS
ATTENTION_METRICS = ("attention_distance", "nmi", "attention_entropy", "head_cosine")  # need attention capture
BRANCH_METRICS = ("residual_ratio_attn", "residual_ratio_mlp")  # need the residual branches
# Groups of consecutive test images whose spectra give singular_values and effective_rank (docs/metrics.md):
# 32 groups of 2 = 64 images, enough to tell ranks a few units apart (4 images were not) at a cost that is
# small beside the forward pass even for ViT-L (per group and layer, one eigendecomposition of the smaller
# Gram matrix of its 2N × C tokens).
SPECTRUM_GROUPS = 32


class AttentionReducer(MomentsReducer):
    """attention_distance, nmi and attention_entropy from one spatial attention per block.

    Windowed attention (Swin, SAM) is measured within each window, on the window's grid, and averaged
    over an image's windows.

    Ã is built once per block (renormalised, contiguous, float32) and shared by the three metrics;
    the mean row KL to uniform (log N − entropy) is computed once for both NMI and entropy. The attention
    is reduced a few images at a time (:func:`~vitscope.metrics.image_chunks`), so that the passes over
    each chunk run in the cache.
    """

    names = ("attention_distance", "nmi", "attention_entropy")

    def __init__(self, metrics: Iterable[str] | None = None) -> None:
        super().__init__(metrics)
        self._buffers: list[Tensor | None] = [None, None]  # Ã and its logs, reused from chunk to chunk

    def _buffer(self, slot: int, attn: Tensor) -> Tensor:
        """A flat float32 (float64) scratch buffer with room for ``attn``; grown when a larger chunk comes."""
        dtype, size = reduction_dtype(attn), attn.numel()
        buffer = self._buffers[slot]
        if buffer is None or buffer.numel() < size or buffer.dtype != dtype or buffer.device != attn.device:
            buffer = self._buffers[slot] = torch.empty(size, dtype=dtype, device=attn.device)
        return buffer

    def end_batch(self) -> None:
        if any(b is not None and b.device.type != "cpu" for b in self._buffers):
            self._buffers = [None, None]  # a GPU's caching allocator reuses memory anyway: hold none between batches

    def update(self, layer: LayerOutput) -> None:
        if layer.attn is None:
            return
        prefix = layer.num_prefix_tokens if layer.window is None else 0  # windows hold spatial tokens only
        parts = [self._reduce(chunk, prefix, layer) for chunk in image_chunks(layer.attn)]  # the same numbers
        for name, values in zip(("attention_distance", "attention_entropy", "nmi"), zip(*parts)):
            if values[0] is not None:
                self.add_per_head(name, layer.depth, layer.per_image(torch.cat(values)))

    def _reduce(self, attn: Tensor, prefix: int, layer: LayerOutput) -> tuple[Tensor | None, ...]:
        """(distance, entropy, NMI) [b, H] of a chunk of the attention, None where not asked for."""
        probs = spatial_attention_for_reduction(attn, prefix, out=self._buffer(0, attn))
        distance = entropy = nmi = None
        if self.wants("attention_distance"):
            distance = attention_distance(probs, layer.attention_grid, layer.patch_size)
        if self.wants("nmi", "attention_entropy"):
            row_kl = mean_row_kl_to_uniform(probs, self._buffer(1, attn))
            entropy = entropy_from_parts(row_kl, probs.shape[-1])
            if self.wants("nmi"):
                nmi = nmi_from_parts(row_kl, key_marginal(probs))
        return distance, entropy, nmi


class TokenCosineReducer(MomentsReducer):
    """token_cosine: mean cosine between distinct spatial tokens of an image, depths 0..L."""

    names = ("token_cosine",)

    def update(self, layer: LayerOutput) -> None:
        if layer.spatial_tokens.shape[1] >= 2:
            self.add("token_cosine", layer.depth, token_cosine_similarity(layer.spatial_tokens))


class HeadCosineReducer(MomentsReducer):
    """head_cosine: per token, mean cosine between distinct heads' outputs A_h·V_h (over all keys, prefix
    tokens included: what the heads contribute); blocks 1..L."""

    names = ("head_cosine",)

    def update(self, layer: LayerOutput) -> None:
        heads = layer.spatial_head_outputs
        if heads is not None and heads.shape[1] >= 2:
            self.add("head_cosine", layer.depth, layer.per_image(head_cosine_similarity(heads)))


class DepthCosineReducer(MomentsReducer):
    """depth_cosine: cosine of the same spatial token at depth l−1 and l, reported at l.

    Holds a reference to the previous depth's tokens only until the next depth arrives (they are
    the next block's input, so this costs no extra memory).
    """

    names = ("depth_cosine",)

    def __init__(self, metrics: Iterable[str] | None = None) -> None:
        super().__init__(metrics)
        self._previous: tuple[int, Tensor] | None = None

    def begin_batch(self, images: Tensor, labels: Tensor) -> None:
        self._previous = None

    def update(self, layer: LayerOutput) -> None:
        tokens = layer.spatial_tokens
        if self._previous is not None and self._previous[0] == layer.depth - 1:
            previous = self._previous[1]
            if previous.shape == tokens.shape:
                self.add("depth_cosine", layer.depth, depth_cosine_similarity(previous, tokens))
        self._previous = (layer.depth, tokens.detach())

    def end_batch(self) -> None:
        self._previous = None


class SpectrumReducer(MomentsReducer):
    """singular_values and effective_rank of the first ``max_groups`` groups of k consecutive images.

    Groups follow the run-wide image order (``image_offset``): images 0..k−1 are the first group, and
    so on. An incomplete group's images are kept per depth and completed by the next batch, so the
    result does not depend on the batch size; under torchrun a group split between two processes is
    left out (batch sizes that are multiples of k keep every group whole). Once ``max_groups`` groups
    are done, the reducer costs nothing more.
    """

    names = ("effective_rank", "singular_values")

    def __init__(
        self,
        metrics: Iterable[str] | None = None,
        *,
        images_per_group: int = 2,
        max_groups: int | None = SPECTRUM_GROUPS,
    ) -> None:
        super().__init__(metrics)
        if images_per_group < 1:
            raise ValueError(f"images_per_group must be >= 1, got {images_per_group}")
        if max_groups is not None and max_groups < 1:
            raise ValueError(f"max_groups must be >= 1 or None, got {max_groups}")
        self.images_per_group = images_per_group
        self.images_per_sample = images_per_group
        self.max_groups = max_groups
        self._pending: dict[int, tuple[int, Tensor]] = {}  # depth -> (position of its first image, tokens)

    def update(self, layer: LayerOutput) -> None:
        k = self.images_per_group
        start, tokens = self.image_offset, layer.spatial_tokens.detach()
        if self.max_groups is not None:
            limit = self.max_groups * k
            if start >= limit:
                return
            tokens = tokens[: limit - start]
        held = self._pending.pop(layer.depth, None)
        if held is not None and held[0] + held[1].shape[0] == start:  # the rest of a group begun earlier
            start, tokens = held[0], torch.cat([held[1], tokens.to(held[1].dtype)])
        skip = (-start) % k  # images of a group that began in a batch this process did not see
        start, tokens = start + skip, tokens[skip:]
        complete = tokens.shape[0] // k * k
        if complete:
            spectra = singular_values(tokens[:complete], k)  # [G, min(k·N, C)]
            self.add("singular_values", layer.depth, spectra, column="index")
            self.add("effective_rank", layer.depth, effective_rank(spectra))
        if complete < tokens.shape[0]:
            self._pending[layer.depth] = (start + complete, tokens[complete:].clone())

    def snapshot(self) -> Any:
        """The moments and the images of a group not yet complete (depth -> (first position, tokens))."""
        pending = {depth: (start, tokens.detach().cpu()) for depth, (start, tokens) in self._pending.items()}
        return {"moments": self.state(), "pending": pending}

    def restore(self, snapshot: Any, device: str | torch.device = "cpu") -> None:
        self.merge([tensors_to(snapshot["moments"], device)])
        self._pending = {depth: (start, tokens.to(device)) for depth, (start, tokens) in snapshot["pending"].items()}


class FourierReducer(MomentsReducer):
    """fourier_delta (curve over ``freq``) and fourier_high (its last value), depths 0..L.

    Per image: log amplitude along the diagonal, mean over channels, minus its zero-frequency
    value; the mean over images of these curves is the defined curve (the operations after the log are
    linear), and their spread gives the standard errors.
    """

    names = ("fourier_high", "fourier_delta")

    def update(self, layer: LayerOutput) -> None:
        curves = fourier_log_amplitude_diagonal(layer.spatial_tokens, layer.grid)  # [B, m]
        delta = curves - curves[:, :1]
        self.add("fourier_delta", layer.depth, delta, column="freq")
        self.add("fourier_high", layer.depth, delta[:, -1])


class ResidualRatioReducer(MomentsReducer):
    """residual_ratio_attn = ‖stream in‖/‖attention branch‖, residual_ratio_mlp = ‖stream mid‖/‖MLP branch‖."""

    names = ("residual_ratio_attn", "residual_ratio_mlp")

    def update(self, layer: LayerOutput) -> None:
        if layer.stream_in is None or layer.attn_branch is None or layer.mlp_branch is None:
            return
        if self.wants("residual_ratio_attn"):
            self.add("residual_ratio_attn", layer.depth, residual_ratio(layer.stream_in, layer.attn_branch))
        if self.wants("residual_ratio_mlp"):
            stream_mid = layer.stream_mid()
            assert stream_mid is not None
            self.add("residual_ratio_mlp", layer.depth, residual_ratio(stream_mid, layer.mlp_branch))


_FAMILIES: tuple[type[MomentsReducer], ...] = (
    AttentionReducer,
    TokenCosineReducer,
    HeadCosineReducer,
    DepthCosineReducer,
    SpectrumReducer,
    FourierReducer,
    ResidualRatioReducer,
)
_TRANSFORMER_ONLY = (AttentionReducer, HeadCosineReducer, ResidualRatioReducer)


def check_metrics(metrics: Iterable[str] | None) -> set[str]:
    if metrics is None:
        return set(ALL_METRICS)
    if isinstance(metrics, str):
        raise TypeError(f"metrics must be a list of names, not the string {metrics!r}")
    asked = set(metrics)
    unknown = sorted(asked - set(ALL_METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {list(ALL_METRICS)}")
    return asked


def metric_reducers(
    facts: ModelFacts,
    metrics: Iterable[str] | None = None,
    *,
    images_per_group: int = 2,
    spectrum_groups: int | None = SPECTRUM_GROUPS,
) -> list[Reducer]:
    """The reducers that compute ``metrics`` (default: all of :data:`ALL_METRICS`) for a model.

    Attention, head and residual metrics are left out for models without transformer blocks.
    Add other reducers (probes, CKA) to the returned list to share the same forward pass.
    """
    asked = check_metrics(metrics)
    reducers: list[Reducer] = []
    for family in _FAMILIES:
        names = asked & set(family.names)
        if not names or (facts.kind == "cnn" and family in _TRANSFORMER_ONLY):
            continue
        if family is SpectrumReducer:
            reducers.append(SpectrumReducer(names, images_per_group=images_per_group, max_groups=spectrum_groups))
        else:
            reducers.append(family(names))
    return reducers


def analyze_model(
    model: nn.Module,
    loader: Iterable,
    *,
    label: str,
    metrics: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    images_per_group: int = 2,
    spectrum_groups: int | None = SPECTRUM_GROUPS,
    extra_reducers: Sequence[Reducer] = (),
    progress: str | None = "metrics",
) -> Results:
    """All asked metrics of ``model`` over ``loader`` in one forward pass per batch.

    Args:
        model: a timm-style ViT (or a CNN: token metrics only); put in eval mode and moved to ``device``.
        loader: yields :class:`~vitscope.data.Batch` (``make_loader``), (images, labels) or tensors.
        label: the ``model`` column of the rows.
        metrics: names from :data:`ALL_METRICS`; default all.
        dtype: autocast dtype on CUDA (bf16/fp16); reductions still run in float32.
        extra_reducers: more reducers (probes, CKA) fed by the same pass; their rows are appended.
    """
    asked = check_metrics(metrics)
    model = model.to(device).eval()
    capture = make_capture(
        model, attention=bool(asked & set(ATTENTION_METRICS)), branches=bool(asked & set(BRANCH_METRICS))
    )
    reducers = metric_reducers(
        capture.facts, asked, images_per_group=images_per_group, spectrum_groups=spectrum_groups
    ) + list(extra_reducers)
    skips = SkipCounter()
    passed = ModelPass(label, capture, reducers)
    seen = run_lockstep([passed], loader, device=device, dtype=dtype, skips=skips, progress=progress)
    if seen == 0:
        raise ValueError(f"{label}: the loader yielded no images ({skips.report()})")
    run_meta = RunMeta(
        models={label: model_meta(passed, model, images=seen)},
        num_images=seen,
        skipped=[list(item) for item in skips.skipped],
        metrics=[m for m in ALL_METRICS if m in asked],
        config={"images_per_group": images_per_group, "spectrum_groups": spectrum_groups},
        versions=run_versions(),
        device=str(device),
    )
    results = Results(meta=run_meta.as_dict())
    for reducer in reducers:
        results.extend(reducer.rows(label))
    return results
