"""Model loading (placeholder until the loaders land): ``timm:NAME`` with random weights."""
from __future__ import annotations

from typing import Any

import timm
from torch import nn


def load_model(spec: str, **options: Any) -> nn.Module:
    kind, _, name = spec.partition(":")
    if kind not in ("timm", "random") or not name:
        raise ValueError(f"model spec {spec!r}: expected timm:NAME")
    return timm.create_model(name, pretrained=False, **options).eval()
