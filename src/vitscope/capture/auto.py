"""The right capture for a model."""

from __future__ import annotations

from torch import nn

from vitscope.capture.features import FeatureCapture
from vitscope.capture.layer import Capture
from vitscope.capture.vit import ViTCapture, is_vision_transformer

__all__ = ["make_capture"]


def make_capture(model: nn.Module, *, attention: bool = True, branches: bool = True) -> Capture:
    """The right capture for ``model``: :class:`HFCapture` for Hugging Face ``transformers`` models,
    :class:`OpenCLIPCapture` for OpenCLIP visual towers, :class:`ViTCapture` for timm-style
    transformers, else :class:`FeatureCapture` (CNN stages).

    ``attention`` and ``branches`` say what a transformer's capture collects besides its tokens
    (attention probabilities and head outputs; the residual branches); a CNN's stages have neither.
    """
    family = type(model).__module__.split(".")[0]
    if family == "transformers":
        from vitscope.capture.hf import HFCapture

        return HFCapture(model, attention=attention, branches=branches)
    if family == "open_clip":
        from vitscope.capture.openclip import OpenCLIPCapture

        return OpenCLIPCapture(model, attention=attention, branches=branches)
    if is_vision_transformer(model):
        return ViTCapture(model, attention=attention, branches=branches)
    return FeatureCapture(model)
