"""Pretraining (MoCo v3, SimMIM, MAE, hybrid) and fine-tuning of timm ViTs.

- :mod:`vitscope.pretrain.objectives` — the objectives and their losses;
- :mod:`vitscope.pretrain.augment` — batched, seeded augmentations;
- :mod:`vitscope.pretrain.trainer` — the training loop, checkpoints, resume, DDP;
- :mod:`vitscope.pretrain.finetune` — end-to-end fine-tuning for classification.
"""
