"""vitscope: what do Vision Transformers learn?

Pipeline: model loading (:mod:`vitscope.models`) → capture (:mod:`vitscope.capture`: one forward pass
yields every block's attention and tokens) → streaming analyses (:mod:`vitscope.analyses`, built on the
pure metric functions of :mod:`vitscope.metrics`) → results directory (:mod:`vitscope.results`) → report
(:mod:`vitscope.report`). Pretraining (:mod:`vitscope.pretrain`) sits beside it; :mod:`vitscope.data`
feeds both; :mod:`vitscope.commands` are the CLI.
"""

from vitscope.analyses import AnalysisConfig, analyze
from vitscope.capture import Capture, FeatureCapture, LayerOutput, ModelFacts, ViTCapture, make_capture
from vitscope.models import load_model

__version__ = "0.1.0"

__all__ = [
    "Capture",
    "FeatureCapture",
    "LayerOutput",
    "ModelFacts",
    "ViTCapture",
    "make_capture",
    "load_model",
    "AnalysisConfig",
    "analyze",
    "__version__",
]
