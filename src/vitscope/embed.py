"""Token-level pictures of a representation: t-SNE of tokens, SVD projection across a block, and
spatial localisation (Raghu et al.).

- :func:`token_tsne`: 2-D t-SNE (scikit-learn, seeded) of the spatial tokens of a few images of a few
  classes at one depth; the paper's figure colours by class with one marker per image.
- :func:`svd_projection`: tokens of depth l − 1 and depth l projected onto the top-2 right singular
  vectors of depth l − 1's tokens, to show how block l moves the tokens.
- :class:`SpatialLocalisation`: for each token position p of a deep layer, its CKA over images with
  the patch embedding (depth 0) at every position q, as an [N, h, w] grid per p. A model that keeps
  spatial information peaks at q = p. Streamed with the minibatch unbiased HSIC of
  :mod:`vitscope.metrics.cka`, vectorised over positions (one [N, b²] × [b², N] matmul per batch).

The t-SNE and SVD outputs are dicts of numpy arrays ready to plot: ``points`` [M, 2], ``image_id`` [M],
``label`` [M], ``token`` [M] (position in the grid).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from vitscope.capture import Capture, LayerOutput
from vitscope.data import Batch
from vitscope.metrics.cka import CKAAccumulator
from vitscope.metrics.stream import Reducer, run_reducers
from vitscope.results import Row, make_row
from vitscope.runtime import single_threaded

__all__ = ["pick_examples", "spatial_tokens_at", "token_tsne", "svd_projection", "SpatialLocalisation",
           "spatial_localisation"]

Points = dict[str, np.ndarray]


def pick_examples(labels: Sequence[int] | np.ndarray, *, num_classes: int = 3, per_class: int = 6,
                  seed: int = 0) -> np.ndarray:
    """Indices of ``per_class`` images from each of ``num_classes`` classes (seeded choice), sorted by class."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels[labels >= 0])
    if len(classes) < num_classes:
        raise ValueError(f"asked for {num_classes} classes, the labels hold {len(classes)}")
    chosen = np.sort(rng.choice(classes, size=num_classes, replace=False))
    picked = []
    for cls in chosen:
        members = np.flatnonzero(labels == cls)
        if len(members) < per_class:
            raise ValueError(f"class {cls} has {len(members)} images, fewer than per_class={per_class}")
        picked.append(np.sort(rng.choice(members, size=per_class, replace=False)))
    return np.concatenate(picked)


@torch.no_grad()
def spatial_tokens_at(capture: Capture, images: Tensor, depths: Sequence[int]) -> dict[int, Tensor]:
    """Spatial tokens [B, N, C] (float32, CPU) of the given depths, from one forward pass."""
    wanted = set(depths)
    kept: dict[int, Tensor] = {}

    def keep(layer: LayerOutput) -> None:
        if layer.depth in wanted:
            kept[layer.depth] = layer.spatial_tokens.detach().float().cpu().clone()

    capture.run(images, keep)
    missing = sorted(wanted - set(kept))
    if missing:
        raise ValueError(f"the capture yielded no depth {missing}")
    return kept


def _token_index(num_images: int, num_tokens: int, labels: Tensor | np.ndarray) -> dict[str, np.ndarray]:
    labels = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels)
    if len(labels) != num_images:
        raise ValueError(f"{num_images} images but {len(labels)} labels")
    return {"image_id": np.repeat(np.arange(num_images), num_tokens),
            "label": np.repeat(labels, num_tokens),
            "token": np.tile(np.arange(num_tokens), num_images)}


def token_tsne(capture: Capture, images: Tensor, labels: Tensor | np.ndarray, depth: int, *,
               perplexity: float = 20.0, seed: int = 0, max_iter: int = 1000,
               method: str = "barnes_hut") -> Points:
    """t-SNE of the spatial tokens of ``images`` at ``depth``: points [B·N, 2] plus indices.

    ``method`` is scikit-learn's (``barnes_hut`` or ``exact``, the latter for a few hundred tokens).
    """
    from sklearn.manifold import TSNE

    tokens = spatial_tokens_at(capture, images, [depth])[depth]
    b, n, c = tokens.shape
    flat = tokens.reshape(b * n, c).double().numpy()
    if perplexity >= len(flat):
        raise ValueError(f"perplexity {perplexity} must be below the number of tokens {len(flat)}")
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", max_iter=max_iter,
                random_state=seed, method=method)
    with single_threaded():  # a few hundred points: threads only spin (4x slower on a busy 2-core machine)
        points = tsne.fit_transform(flat).astype(np.float32)
    return {"points": points, **_token_index(b, n, labels)}


def svd_projection(capture: Capture, images: Tensor, labels: Tensor | np.ndarray, depth: int, *,
                   center: bool = True) -> dict[str, Points | np.ndarray]:
    """Tokens of depth ``depth − 1`` ("before") and ``depth`` ("after") on the top-2 right singular
    vectors of the "before" tokens (all images' spatial tokens stacked, [B·N, C]).

    ``center`` subtracts the mean of the "before" tokens from both (the same shift, so the two
    pictures stay comparable). Also returns ``singular_values`` of the "before" tokens.
    """
    if depth < 1:
        raise ValueError(f"depth must be ≥ 1 (a block), got {depth}")
    tokens = spatial_tokens_at(capture, images, [depth - 1, depth])
    before, after = tokens[depth - 1], tokens[depth]
    b, n, c = before.shape
    x0 = before.reshape(b * n, c).double()
    x1 = after.reshape(b * n, -1).double()
    if x1.shape[1] != c:
        raise ValueError(f"depths {depth - 1} and {depth} differ in width ({c} vs {x1.shape[1]})")
    offset = x0.mean(dim=0, keepdim=True) if center else torch.zeros(1, c, dtype=torch.float64)
    _, sigma, vh = torch.linalg.svd(x0 - offset, full_matrices=False)
    basis = vh[:2].T  # [C, 2]
    index = _token_index(b, n, labels)
    return {"before": {"points": ((x0 - offset) @ basis).float().numpy(), **index},
            "after": {"points": ((x1 - offset) @ basis).float().numpy(), **index},
            "singular_values": sigma.numpy()}


# ------------------------------------------------------------------------------ spatial localisation
class SpatialLocalisation(Reducer):
    """CKA over images between each position of a deep layer and every position of depth 0.

    Args:
        depth: the deep layer (default: the last depth the capture yields).
        dtype: accumulation dtype.
    """

    def __init__(self, depth: int | None = None, *, dtype: torch.dtype = torch.float64) -> None:
        self.depth = depth
        self.accumulator = CKAAccumulator("linear", dtype=dtype)
        self.grid: tuple[int, int] | None = None
        self.measured_depth: int | None = None
        self._batch_size = 0
        self._base: Tensor | None = None  # depth 0, [N, b²]
        self._deep: Tensor | None = None  # chosen depth, [N, b²] (or its tokens when depth is None)
        self._deep_depth: int | None = None

    def _centred(self, layer: LayerOutput) -> Tensor:
        per_position = layer.spatial_tokens.detach().transpose(0, 1)  # [N, b, C]
        return self.accumulator.centred_grams(per_position)

    def begin_batch(self, images: Tensor, labels: Tensor) -> None:
        self._batch_size = int(images.shape[0])
        self._base = self._deep = None
        self._deep_depth = None

    def update(self, layer: LayerOutput) -> None:
        if self._batch_size < 4:
            return
        if layer.depth == 0:
            self._base = self._centred(layer)
            if self.grid is None:
                self.grid = layer.grid
        elif self.depth is None:  # keep the latest depth's tokens; centred at end_batch
            self._deep, self._deep_depth = layer.spatial_tokens.detach().clone(), layer.depth
        elif layer.depth == self.depth:
            self._deep, self._deep_depth = self._centred(layer), layer.depth

    def end_batch(self) -> None:
        if self._batch_size < 4:
            self.accumulator.skip_batch(self._batch_size)
            return
        if self._base is None or self._deep is None:
            raise RuntimeError(f"spatial localisation: the capture fed no depth 0 or no depth {self.depth}")
        deep = self._deep
        if self.depth is None:
            deep = self.accumulator.centred_grams(deep.transpose(0, 1))
        if deep.shape[0] != self._base.shape[0]:
            raise RuntimeError(f"depth {self._deep_depth} has {deep.shape[0]} positions, depth 0 has {self._base.shape[0]}")
        self.measured_depth = self._deep_depth
        self.accumulator.update_centred(deep, self._base)
        self._base = self._deep = None

    def maps(self) -> np.ndarray:
        """[N, h, w]: for each deep position p (row-major), CKA with depth 0 at every grid cell."""
        if self.grid is None:
            raise RuntimeError("spatial localisation: no batch accumulated")
        h, w = self.grid
        return self.accumulator.matrix().reshape(-1, h, w).numpy()

    def rows(self, model: str) -> list[Row]:
        """Summary rows at the deep layer: ``spatial_self_cka`` (mean CKA of a position with itself)
        and ``spatial_peak_hit`` (fraction of positions whose best match is their own position)."""
        if self.accumulator.num_batches == 0:
            return []
        matrix = self.accumulator.matrix()
        n = self.accumulator.num_examples
        own = matrix.diagonal()
        hits = (matrix.argmax(dim=1) == torch.arange(matrix.shape[0])).double().mean()
        return [make_row(model, "spatial_self_cka", self.measured_depth, float(own.mean()), n=n),
                make_row(model, "spatial_peak_hit", self.measured_depth, float(hits), n=n)]


def spatial_localisation(capture: Capture, batches: Iterable[Batch], *, depth: int | None = None,
                         device: str | torch.device = "cpu", progress: str | None = "localisation") -> np.ndarray:
    """Run :class:`SpatialLocalisation` over ``batches``; returns the [N, h, w] maps."""
    reducer = SpatialLocalisation(depth)
    run_reducers(capture, batches, [reducer], device=device, progress=progress)
    return reducer.maps()
