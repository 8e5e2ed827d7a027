"""Load the models researchers have: timm names, official SSL checkpoints, plain files — safely.

``load_model(spec, **options) -> nn.Module`` returns a timm model in eval mode with a
:class:`LoadReport` attached as ``model.vitscope_load_report``. The path a spec takes:
:mod:`.specs` (parse ``KIND:TARGET?k=v``) → :mod:`.load` (one loader per kind) → :mod:`.safe_load`
(read files without running code) → :mod:`.converters` (one converter per checkpoint source, the
architecture read off the tensors' shapes) → :mod:`.build` (create the timm model, adapt and load the
weights strictly) → :mod:`.load_report` (what was loaded, dropped, missing). :mod:`.cards` reads and
writes the model cards beside vitscope's own weights; :mod:`.timm_weights` finds timm's weights in the
local caches.
"""

from vitscope.models.cards import BundledModel, available, find, read_card, write_card
from vitscope.models.load import load_model
from vitscope.models.load_report import CheckpointMismatchError, LoadReport, WeightsNotFoundError
from vitscope.models.safe_load import CheckpointError, UnsafeCheckpointError, read_checkpoint, read_state_dict
from vitscope.models.specs import KINDS, ModelSpec, parse_spec

__all__ = [
    "load_model",
    "parse_spec",
    "ModelSpec",
    "KINDS",
    "LoadReport",
    "CheckpointError",
    "CheckpointMismatchError",
    "UnsafeCheckpointError",
    "WeightsNotFoundError",
    "read_checkpoint",
    "read_state_dict",
    "BundledModel",
    "available",
    "find",
    "read_card",
    "write_card",
]
