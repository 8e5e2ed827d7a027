"""Tiny timm models with random weights, built on the spot (no downloads)."""

from __future__ import annotations

import timm
import torch


def tiny_vit(name: str = "vit_small_patch16_224", **overrides) -> torch.nn.Module:
    """A small random timm ViT (patch 8, 32 px, dim 32, 2 blocks, 4 heads) in eval mode."""
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()
