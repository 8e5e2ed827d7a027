"""Minibatch CKA, streamed: layer × layer similarity within a model and across two models.

Over many examples, :class:`CKAAccumulator` is the minibatch CKA of Nguyen et al. (2021): per minibatch
of b examples the unbiased HSIC₁ estimator of Song et al. (2012) (:mod:`vitscope.metrics.cka`),
averaged over minibatches; CKA = mean HSIC₁(K, L) / sqrt(mean HSIC₁(K, K) · mean HSIC₁(L, L)). Memory
is one [La, Lb] matrix, whatever the number of images.

Efficient form. HSIC₁(K, L) = ⟨U(K), U(L)⟩ / (b(b − 3)), where U is the "U-centring" of a Gram matrix.
So per batch each layer's Gram matrix is U-centred, scaled by 1/sqrt(b(b − 3)) and flattened;
stacking the layers gives an (L, b²) matrix and one matmul ``U_a @ U_bᵀ`` gives every layer pair's
HSIC₁. No per-pair Python loop, no host sync per pair.

Per-example features of a layer: see :func:`vitscope.analyses.features.pooled_features` (``gap`` by
default, ``tokens``, ``cls``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from vitscope.analyses.features import FEATURE_KINDS, FeatureKind, pooled_features
from vitscope.analyses.reducer import Reducer, to_cpu
from vitscope.capture import Capture, LayerOutput
from vitscope.metrics.cka import Kernel, as_2d, check_kernel, grams, unbiased_centre
from vitscope.progress import progress_bar
from vitscope.results import Row, make_row

__all__ = [
    "CKAAccumulator",
    "CKAReducer",
    "CrossModelCKA",
    "CKASide",
    "cka_rows",
    "cross_model_cka",
]


class CKAAccumulator:
    """Minibatch CKA (Nguyen et al. 2021) between two lists of layers, accumulated batch by batch.

    ``update(feats_a, feats_b)`` takes, for one batch of b examples, features of layers a₁..a_La and
    b₁..b_Lb of the same examples (a list of [b, ...] tensors, or one [L, b, d] tensor); with
    ``feats_b=None`` the a-layers are compared with themselves. ``matrix()`` gives the [La, Lb] CKA.
    Batches of fewer than 4 examples cannot be used by the unbiased estimator and are skipped (with a
    warning). Everything stays on the features' device; nothing is synchronised with the host.

    Args:
        kernel: ``linear`` or ``rbf`` (RBF bandwidth from each batch's median distance).
        rbf_threshold: RBF bandwidth as a fraction of the median distance.
        dtype: dtype of the Gram matrices and the sums (float64 by default: U-centring subtracts large
            numbers).
    """

    def __init__(
        self, kernel: Kernel = "linear", *, rbf_threshold: float = 1.0, dtype: torch.dtype = torch.float64
    ) -> None:
        check_kernel(kernel)
        self.kernel = kernel
        self.rbf_threshold = rbf_threshold
        self.dtype = dtype
        self.num_batches = 0
        self.num_examples = 0
        self.skipped_batches = 0
        self._xy: Tensor | None = None  # Σ_batches HSIC₁(K_i, L_j)  [La, Lb]
        self._xx: Tensor | None = None  # Σ_batches HSIC₁(K_i, K_i)  [La]
        self._yy: Tensor | None = None  # Σ_batches HSIC₁(L_j, L_j)  [Lb]

    # -- per batch ---------------------------------------------------------------------------
    def centred_grams(self, feats: Sequence[Tensor] | Tensor) -> Tensor:
        """[L, b²]: each layer's U-centred Gram matrix, flattened and scaled by 1/sqrt(b(b − 3)),
        so that ``ua @ ub.T`` is HSIC₁ of every layer pair."""
        grams = self._gram_stack(feats)
        b = grams.shape[-1]
        return unbiased_centre(grams).flatten(1) / math.sqrt(b * (b - 3))

    def _gram_stack(self, feats: Sequence[Tensor] | Tensor) -> Tensor:
        if isinstance(feats, Tensor):
            if feats.ndim < 3:
                raise ValueError(f"features as one tensor must be [L, b, ...], got shape {tuple(feats.shape)}")
            return grams(feats.flatten(2).to(self.dtype), self.kernel, self.rbf_threshold)
        if len(feats) == 0:
            raise ValueError("no layers given")
        sizes = {f.shape[0] for f in feats}
        if len(sizes) != 1:
            raise ValueError(f"all layers must hold the same examples; batch sizes {sorted(sizes)}")
        return torch.stack([grams(as_2d("features", f).to(self.dtype), self.kernel, self.rbf_threshold) for f in feats])

    def update(self, feats_a: Sequence[Tensor] | Tensor, feats_b: Sequence[Tensor] | Tensor | None = None) -> None:
        """Add one batch: features of the same b examples for every a-layer (and b-layer)."""
        b = _batch_size(feats_a)
        if feats_b is not None and _batch_size(feats_b) != b:
            raise ValueError(f"feats_a and feats_b must hold the same examples: {b} vs {_batch_size(feats_b)}")
        if b < 4:
            self._skip(b)
            return
        ua = self.centred_grams(feats_a)
        ub = None if feats_b is None else self.centred_grams(feats_b)
        self.update_centred(ua, ub)

    def update_centred(self, ua: Tensor, ub: Tensor | None = None) -> None:
        """Add one batch given :meth:`centred_grams` of both sides (``ub=None``: a against itself)."""
        if ub is not None and ub.shape[1] != ua.shape[1]:
            raise ValueError(f"centred Gram matrices of different batch sizes: {ua.shape[1]} vs {ub.shape[1]} entries")
        xx = ua.square().sum(dim=1)
        if ub is None:
            xy, yy = ua @ ua.T, xx
        else:
            xy, yy = ua @ ub.T, ub.square().sum(dim=1)
        if self._xy is None or self._xx is None or self._yy is None:  # the first batch (all three are set together)
            self._xy, self._xx, self._yy = xy, xx, yy
        else:
            if xy.shape != self._xy.shape:
                raise ValueError(f"layer count changed between batches: {tuple(self._xy.shape)} -> {tuple(xy.shape)}")
            self._xy, self._xx, self._yy = self._xy + xy, self._xx + xx, self._yy + yy
        self.num_batches += 1
        self.num_examples += math.isqrt(ua.shape[1])

    def skip_batch(self, batch_size: int) -> None:
        """Record a batch too small for the unbiased estimator."""
        self._skip(batch_size)

    def _skip(self, b: int) -> None:
        self.skipped_batches += 1
        warnings.warn(f"CKA: skipped a batch of {b} examples (the unbiased HSIC needs at least 4)", stacklevel=3)

    # -- across processes ----------------------------------------------------------------------
    def state(self) -> dict:
        """The sums and counts (CPU tensors), for :meth:`merge`."""
        return {"xy": to_cpu(self._xy), "xx": to_cpu(self._xx), "yy": to_cpu(self._yy), "batches": self.num_batches,
                "examples": self.num_examples, "skipped": self.skipped_batches}  # fmt: skip

    def merge(self, states: list[dict]) -> None:
        """Add other processes' sums: the minibatch estimate over all their batches and ours."""
        for state in states:
            if state["xy"] is None:
                self.skipped_batches += state["skipped"]
                continue
            xy, xx, yy = (state[key].to(self.dtype) for key in ("xy", "xx", "yy"))
            if self._xy is None or self._xx is None or self._yy is None:
                self._xy, self._xx, self._yy = xy, xx, yy
            else:
                device = self._xy.device
                self._xy, self._xx, self._yy = (
                    self._xy + xy.to(device),
                    self._xx + xx.to(device),
                    self._yy + yy.to(device),
                )
            self.num_batches += state["batches"]
            self.num_examples += state["examples"]
            self.skipped_batches += state["skipped"]

    # -- results -----------------------------------------------------------------------------
    def hsic(self) -> tuple[Tensor, Tensor, Tensor]:
        """Mean HSIC₁ over batches: (a×b [La, Lb], a×a diagonal [La], b×b diagonal [Lb])."""
        if self._xy is None or self._xx is None or self._yy is None:
            raise RuntimeError("CKA: no batch of at least 4 examples was accumulated")
        return self._xy / self.num_batches, self._xx / self.num_batches, self._yy / self.num_batches

    def matrix(self) -> Tensor:
        """CKA [La, Lb] (float64, on CPU). A layer with zero self-HSIC (constant features) gives NaN."""
        xy, xx, yy = self.hsic()
        denom = torch.sqrt(torch.outer(xx, yy))
        return (xy / denom).double().cpu()


def _batch_size(feats: Sequence[Tensor] | Tensor) -> int:
    if isinstance(feats, Tensor):
        return int(feats.shape[1])
    if len(feats) == 0:
        raise ValueError("no layers given")
    return int(feats[0].shape[0])


def cka_rows(
    matrix: Tensor,
    model: str,
    other_model: str,
    layers: Sequence[int],
    other_layers: Sequence[int],
    n: int | None = None,
) -> list[Row]:
    """Tidy rows (metric ``cka``) of a [len(layers), len(other_layers)] CKA matrix."""
    if tuple(matrix.shape) != (len(layers), len(other_layers)):
        raise ValueError(f"CKA matrix {tuple(matrix.shape)} does not match {len(layers)} × {len(other_layers)} layers")
    values = matrix.tolist()
    return [
        make_row(model, "cka", layer, values[i][j], n=n, other_model=other_model, other_layer=other)
        for i, layer in enumerate(layers)
        for j, other in enumerate(other_layers)
    ]


# ------------------------------------------------------------------------------------- reducers
class _BatchGrams:
    """Collects one batch's U-centred Gram matrices depth by depth, for one model."""

    def __init__(self, accumulator: CKAAccumulator, features: FeatureKind, depths: Sequence[int] | None) -> None:
        if features not in FEATURE_KINDS:
            raise ValueError(f"features must be one of {FEATURE_KINDS}, not {features!r}")
        self.accumulator = accumulator
        self.features = features
        self.wanted = None if depths is None else set(depths)
        self.depths: list[int] = []  # depths of the rows, fixed by the first batch
        self._grams: list[Tensor] = []
        self._seen: list[int] = []
        self.batch_size = 0

    def begin(self, batch_size: int) -> None:
        self._grams, self._seen, self.batch_size = [], [], batch_size

    def add(self, layer: LayerOutput) -> None:
        if self.batch_size < 4 or (self.wanted is not None and layer.depth not in self.wanted):
            return
        feats = pooled_features(layer, self.features).detach()
        self._grams.append(self.accumulator.centred_grams([feats])[0])
        self._seen.append(layer.depth)

    def finish(self) -> Tensor | None:
        """[L, b²] for the batch, or None when the batch is too small (recorded as skipped)."""
        if self.batch_size < 4:
            self.accumulator.skip_batch(self.batch_size)
            return None
        if not self._grams:
            raise RuntimeError("CKA: the capture fed no layer for this batch")
        if not self.depths:
            self.depths = list(self._seen)
        elif self._seen != self.depths:
            raise RuntimeError(f"CKA: depths changed between batches: {self.depths} -> {self._seen}")
        stacked = torch.stack(self._grams)
        self._grams = []
        return stacked


class CKAReducer(Reducer):
    """Layer × layer minibatch CKA of one model with itself (rows: model vs the same model).

    Args:
        features: ``gap`` (default), ``tokens`` or ``cls`` (see :func:`~vitscope.analyses.features.pooled_features`).
        kernel: ``linear`` or ``rbf``.
        depths: depths to include (default all the capture yields).
    """

    def __init__(
        self,
        features: FeatureKind = "gap",
        kernel: Kernel = "linear",
        *,
        depths: Sequence[int] | None = None,
        rbf_threshold: float = 1.0,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.accumulator = CKAAccumulator(kernel, rbf_threshold=rbf_threshold, dtype=dtype)
        self._batch = _BatchGrams(self.accumulator, features, depths)

    @property
    def depths(self) -> list[int]:
        return self._batch.depths

    def begin_batch(self, images: Tensor, labels: Tensor) -> None:
        self._batch.begin(int(images.shape[0]))

    def update(self, layer: LayerOutput) -> None:
        self._batch.add(layer)

    def end_batch(self) -> None:
        grams = self._batch.finish()
        if grams is not None:
            self.accumulator.update_centred(grams)

    def matrix(self) -> Tensor:
        return self.accumulator.matrix()

    def state(self) -> dict:
        return {"accumulator": self.accumulator.state(), "depths": self.depths}

    def merge(self, states: list[dict]) -> None:
        self.accumulator.merge([state["accumulator"] for state in states])
        self._batch.depths = self._batch.depths or next((s["depths"] for s in states if s["depths"]), [])

    def rows(self, model: str) -> list[Row]:
        if self.accumulator.num_batches == 0:
            return []
        return cka_rows(self.matrix(), model, model, self.depths, self.depths, self.accumulator.num_examples)


class CKASide(Reducer):
    """One model's half of a :class:`CrossModelCKA`: a Reducer that hands each batch to the pair."""

    def __init__(self, pair: CrossModelCKA, side: str, features: FeatureKind, depths: Sequence[int] | None) -> None:
        self.pair = pair
        self.side = side
        self._batch = _BatchGrams(pair.accumulator, features, depths)
        self._labels: Tensor | None = None
        self._index = 0

    @property
    def depths(self) -> list[int]:
        return self._batch.depths

    def begin_batch(self, images: Tensor, labels: Tensor) -> None:
        self._batch.begin(int(images.shape[0]))
        self._labels, self._index = labels.detach(), self.batch_index

    def update(self, layer: LayerOutput) -> None:
        self._batch.add(layer)

    def end_batch(self) -> None:
        grams = None if self._batch.batch_size < 4 else self._batch.finish()
        self.pair._submit(self.side, grams, self._batch.batch_size, self._labels, self._index)

    def rows(self, model: str) -> list[Row]:
        """Side ``a`` gives the pair's rows (``model`` = its name); side ``b`` gives none."""
        return self.pair.rows(model_a=model) if self.side == "a" else []

    def state(self) -> dict | None:
        """Side ``a`` carries the pair's sums and both sides' depths; side ``b`` nothing."""
        if self.side != "a":
            return None
        return {"accumulator": self.pair.accumulator.state(), "depths": (self.depths, self.pair.side_b.depths)}

    def merge(self, states: list[dict | None]) -> None:
        found = [state for state in states if state is not None]
        self.pair.accumulator.merge([state["accumulator"] for state in found])
        for side, k in ((self.pair.side_a, 0), (self.pair.side_b, 1)):
            side._batch.depths = side._batch.depths or next((s["depths"][k] for s in found if s["depths"][k]), [])


class CrossModelCKA:
    """Minibatch CKA of every layer of model A against every layer of model B on the same images.

    Use ``side_a`` as one of model A's reducers and ``side_b`` as one of model B's, and run both
    captures on each batch (A then B, or B then A): when both sides have handed in a batch, the pair
    calls ``accumulator.update`` once. A ViT against a CNN works the same way (a CNN's stages come as
    tokens from :class:`vitscope.capture.FeatureCapture`). Rows: model A's layer against
    ``other_model`` = model B's layer.
    """

    def __init__(
        self,
        name_a: str,
        name_b: str,
        *,
        features: FeatureKind = "gap",
        features_b: FeatureKind | None = None,
        kernel: Kernel = "linear",
        depths_a: Sequence[int] | None = None,
        depths_b: Sequence[int] | None = None,
        rbf_threshold: float = 1.0,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.name_a, self.name_b = name_a, name_b
        self.accumulator = CKAAccumulator(kernel, rbf_threshold=rbf_threshold, dtype=dtype)
        self.side_a = CKASide(self, "a", features, depths_a)
        self.side_b = CKASide(self, "b", features_b or features, depths_b)
        self._pending: dict[str, tuple[Tensor | None, int, Tensor | None, int]] = {}

    def _submit(self, side: str, grams: Tensor | None, batch_size: int, labels: Tensor | None, index: int = 0) -> None:
        name = self.name_a if side == "a" else self.name_b
        other = self.name_b if side == "a" else self.name_a
        if side in self._pending:
            raise RuntimeError(
                f"CKA {self.name_a} vs {self.name_b}: {name} handed in two batches before {other} "
                "handed in one; run both models' captures on every batch"
            )
        self._pending[side] = (grams, batch_size, labels, index)
        if len(self._pending) < 2:
            return
        (ga, ba, la, ia), (gb, bb, lb, ib) = self._pending["a"], self._pending["b"]
        self._pending.clear()
        differ = ba != bb or ia != ib
        if la is not None and lb is not None and la.device.type == lb.device.type == "cpu":  # no device sync
            differ = differ or not torch.equal(la, lb)
        if differ:
            raise RuntimeError(
                f"CKA {self.name_a} vs {self.name_b}: the two models saw different batches "
                f"({ba} vs {bb} images, batch {ia} vs {ib}, or different labels)"
            )
        if ga is None or gb is None:
            self.accumulator.skip_batch(ba)
            return
        self.accumulator.update_centred(ga, gb.to(ga.device))

    def matrix(self) -> Tensor:
        """[La, Lb] CKA (float64, CPU)."""
        return self.accumulator.matrix()

    def rows(self, model_a: str | None = None) -> list[Row]:
        if self.accumulator.num_batches == 0:
            return []
        return cka_rows(
            self.matrix(),
            model_a or self.name_a,
            self.name_b,
            self.side_a.depths,
            self.side_b.depths,
            self.accumulator.num_examples,
        )


def cross_model_cka(
    capture_a: Capture,
    capture_b: Capture,
    batches,
    *,
    name_a: str = "a",
    name_b: str = "b",
    features: FeatureKind = "gap",
    kernel: Kernel = "linear",
    device: str | torch.device = "cpu",
    progress: str | None = "cka",
) -> CrossModelCKA:
    """Run both captures on every batch and return the filled :class:`CrossModelCKA`."""
    pair = CrossModelCKA(name_a, name_b, features=features, kernel=kernel)
    for batch in progress_bar(batches, desc=progress, unit="batch", enabled=progress is not None):
        if len(batch.images) == 0:
            continue
        images, labels = batch.images.to(device), batch.labels.to(device)
        for capture, side in ((capture_a, pair.side_a), (capture_b, pair.side_b)):
            side.begin_batch(images, labels)
            capture.run(images, side.update)
            side.end_batch()
    return pair
