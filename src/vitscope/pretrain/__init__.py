"""Pretraining (MoCo v3, SimMIM, MAE, hybrid) and fine-tuning of timm ViTs.

- :mod:`.objectives` — the objectives and their losses; :mod:`.augment` — batched, seeded augmentations;
- :mod:`.batches` — training images and which of them each step takes;
- :mod:`.optim` — schedules, parameter groups, precision, one clipped step;
- :mod:`.checkpoint` — weights with their card, train state, RNG states, the step log;
- :mod:`.loop` — the one training loop;
- :mod:`.trainer` — a pretraining run; :mod:`.finetuning` — a fine-tuning run;
- :mod:`.tracking` — measurements while a run trains; :mod:`.curves`, :mod:`.curves_plot` — learning curves.
"""

from vitscope.pretrain.finetuning import FinetuneConfig, FinetuneResult, finetune
from vitscope.pretrain.loop import CheckpointWriteFailed, TrainingDiverged, TrainingInterrupted
from vitscope.pretrain.objectives import METHODS, ObjectiveConfig, build_objective
from vitscope.pretrain.trainer import PretrainResult, TrainConfig, pretrain

__all__ = [
    "METHODS",
    "ObjectiveConfig",
    "build_objective",
    "TrainConfig",
    "PretrainResult",
    "pretrain",
    "FinetuneConfig",
    "FinetuneResult",
    "finetune",
    "TrainingDiverged",
    "TrainingInterrupted",
    "CheckpointWriteFailed",
]
