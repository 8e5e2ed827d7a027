"""vitscope: what do Vision Transformers learn?

Pipeline: model loading (``vitscope.models``) → capture (``vitscope.capture``: one forward pass yields
every block's attention and tokens) → metrics (``vitscope.metrics``: pure tensor functions and
streaming reducers) → report (``vitscope.report``). Pretraining (``vitscope.pretrain``) sits beside it.
"""
from vitscope.capture import Capture, FeatureCapture, LayerOutput, ModelFacts, ViTCapture, make_capture

__version__ = "0.1.0"


def load_model(spec: str, **options):  # noqa: ANN001, ANN201 - thin re-export, typed in vitscope.models
    """Load a model from a spec string (``timm:NAME``, ``mae:PATH``, ...); see :mod:`vitscope.models`."""
    from vitscope.models import load_model as _load_model

    return _load_model(spec, **options)


__all__ = ["Capture", "FeatureCapture", "LayerOutput", "ModelFacts", "ViTCapture", "make_capture", "load_model"]
