"""Per-example features of one depth: what probes and CKA compare across images."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from vitscope.capture import LayerOutput

__all__ = ["FeatureKind", "FEATURE_KINDS", "pooled_features"]

FeatureKind = Literal["gap", "tokens", "cls"]
FEATURE_KINDS = ("gap", "tokens", "cls")


def pooled_features(layer: LayerOutput, kind: FeatureKind | str = "gap") -> Tensor:
    """Per-example features of one depth, [B, d].

    ``gap``: mean of the spatial tokens (d = C); ``tokens``: spatial tokens flattened (d = N·C);
    ``cls``: the class token (d = C; only for models that have one: register tokens are not).
    """
    if kind == "gap":
        return layer.spatial_tokens.mean(dim=1)
    if kind == "tokens":
        return layer.spatial_tokens.flatten(1)
    if kind == "cls":
        if not layer.has_class_token:
            raise ValueError(f"features='cls': depth {layer.depth} has no class token; use 'gap'")
        return layer.tokens[:, 0]
    raise ValueError(f"features must be one of {FEATURE_KINDS}, not {kind!r}")
