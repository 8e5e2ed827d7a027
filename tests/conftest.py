"""Shared test fixtures: tiny timm models and images built on the spot (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

from tests.support.models import tiny_vit

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def vit() -> torch.nn.Module:
    return tiny_vit()
