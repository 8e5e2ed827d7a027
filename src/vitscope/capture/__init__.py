"""One forward pass, every block: attention, tokens, per-head outputs and residual branches.

A :class:`Capture` wraps a model. ``capture.run(images, on_layer)`` runs one forward pass and calls
``on_layer(LayerOutput)`` once per depth, in order: depth 0 is the patch embedding (the first block's
input, position embedding and prefix tokens included), depths 1..L are the blocks' outputs. Each
``LayerOutput`` is built inside that block's forward hook and released as soon as ``on_layer``
returns, so a consumer that reduces and drops its tensors keeps peak memory at one block's worth,
not the model's.

Transformers (timm ``VisionTransformer``, DeiT, ``Beit``, ``Eva`` and anything with ``blocks[i].attn``
in timm's layout) give attention probabilities [B, H, T, T], per-head outputs A·V [B, H, T, D] (before
the output projection, over all keys) and the residual branches. timm's fused scaled-dot-product attention never
materialises the probabilities, so it is switched off on every attention module while capturing and
restored afterwards, also when the forward raises.

Other models (a timm ResNet, any model with ``feature_info``) give per-stage feature maps, laid out as
tokens [B, h·w, C] with no prefix, so that the same consumers (CKA, GAP probes) work on both.

Modules: :mod:`.layer` (what a depth yields, the :class:`Capture` interface), :mod:`.vit`
(transformers), :mod:`.features` (CNN stages), :mod:`.auto` (:func:`make_capture` picks one).
"""

from vitscope.capture.auto import make_capture
from vitscope.capture.features import FeatureCapture
from vitscope.capture.hf import HFCapture
from vitscope.capture.layer import Capture, LayerOutput, ModelFacts, OnLayer, spatial_attention
from vitscope.capture.openclip import OpenCLIPCapture
from vitscope.capture.vit import ViTCapture, is_vision_transformer

__all__ = [
    "ModelFacts",
    "LayerOutput",
    "OnLayer",
    "Capture",
    "ViTCapture",
    "FeatureCapture",
    "OpenCLIPCapture",
    "HFCapture",
    "make_capture",
    "is_vision_transformer",
    "spatial_attention",
]
