"""The right capture for a model."""

from __future__ import annotations

from torch import nn

from vitscope.capture.features import FeatureCapture
from vitscope.capture.layer import Capture
from vitscope.capture.vit import ViTCapture, is_vision_transformer

__all__ = ["make_capture"]


def make_capture(model: nn.Module, *, attention: bool = True, branches: bool = True) -> Capture:
    """The right capture for ``model``: :class:`ViTCapture` for transformers, else :class:`FeatureCapture`.

    ``attention`` and ``branches`` say what a transformer's capture collects besides its tokens
    (attention probabilities and head outputs; the residual branches); a CNN's stages have neither.
    """
    if is_vision_transformer(model):
        return ViTCapture(model, attention=attention, branches=branches)
    return FeatureCapture(model)
