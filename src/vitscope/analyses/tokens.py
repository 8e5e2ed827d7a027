"""Token-level pictures of a representation: t-SNE of tokens and the SVD projection across a block.

- :func:`token_tsne`: 2-D t-SNE (scikit-learn, seeded) of the spatial tokens of a few images of a few
  classes at one depth; the paper's figure colours by class with one marker per image.
- :func:`svd_projection`: tokens of depth l − 1 and depth l projected onto the top-2 right singular
  vectors of depth l − 1's tokens, to show how block l moves the tokens.

The t-SNE and SVD outputs are dicts of numpy arrays ready to plot: ``points`` [M, 2], ``image_id`` [M],
``label`` [M], ``token`` [M] (position in the grid).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from vitscope.capture import Capture, LayerOutput
from vitscope.runtime import single_threaded

__all__ = ["pick_examples", "spatial_tokens_at", "token_tsne", "svd_projection"]

Points = dict[str, np.ndarray]


def pick_examples(
    labels: Sequence[int] | np.ndarray, *, num_classes: int = 3, per_class: int = 6, seed: int = 0
) -> np.ndarray:
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
    return {
        "image_id": np.repeat(np.arange(num_images), num_tokens),
        "label": np.repeat(labels, num_tokens),
        "token": np.tile(np.arange(num_tokens), num_images),
    }


def token_tsne(
    capture: Capture,
    images: Tensor,
    labels: Tensor | np.ndarray,
    depth: int,
    *,
    perplexity: float = 20.0,
    seed: int = 0,
    max_iter: int = 1000,
    method: str = "barnes_hut",
) -> Points:
    """t-SNE of the spatial tokens of ``images`` at ``depth``: points [B·N, 2] plus indices.

    ``method`` is scikit-learn's (``barnes_hut`` or ``exact``, the latter for a few hundred tokens).
    """
    from sklearn.manifold import TSNE

    tokens = spatial_tokens_at(capture, images, [depth])[depth]
    b, n, c = tokens.shape
    flat = tokens.reshape(b * n, c).double().numpy()
    if perplexity >= len(flat):
        raise ValueError(f"perplexity {perplexity} must be below the number of tokens {len(flat)}")
    tsne = TSNE(
        n_components=2,
        perplexity=perplexity,
        init="pca",
        learning_rate="auto",
        max_iter=max_iter,
        random_state=seed,
        method=method,
    )
    with single_threaded():  # a few hundred points: threads only spin (4x slower on a busy 2-core machine)
        points = tsne.fit_transform(flat).astype(np.float32)
    return {"points": points, **_token_index(b, n, labels)}


def svd_projection(
    capture: Capture, images: Tensor, labels: Tensor | np.ndarray, depth: int, *, center: bool = True
) -> dict[str, Points | np.ndarray]:
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
    return {
        "before": {"points": ((x0 - offset) @ basis).float().numpy(), **index},
        "after": {"points": ((x1 - offset) @ basis).float().numpy(), **index},
        "singular_values": sigma.numpy(),
    }
