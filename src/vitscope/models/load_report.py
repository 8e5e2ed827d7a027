"""What a load did: the model built, and every checkpoint key that was dropped, missing or unused."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from vitscope.models.safe_load import CheckpointError

__all__ = ["LoadReport", "CheckpointMismatchError", "WeightsNotFoundError", "mismatch_message", "summarize_keys"]

logger = logging.getLogger("vitscope.models")


class CheckpointMismatchError(CheckpointError):
    """The checkpoint does not fit the model: missing, unexpected or differently shaped weights."""


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights are not on this machine (vitscope never downloads at run time)."""


@dataclass
class LoadReport:
    """Attached to every loaded model as ``model.vitscope_load_report``.

    Attributes:
        spec: the spec string the model was loaded from.
        source: ``timm``, ``random``, ``moco-v3``, ``mae``, ``simmim``, ``dino``, ``beit``, ``file``, ``bundled``.
        path: the weights file read (None for random init).
        arch: the timm model name created; ``arch_kwargs`` the keyword arguments it was created with.
        loaded: number of model tensors filled from the checkpoint.
        missing: model weights the checkpoint did not provide (left at random init).
        unexpected: checkpoint weights the model has no place for (not loaded).
        mismatched: ``"key: checkpoint (shape) vs model (shape)"`` for weights that could not be loaded.
        dropped: checkpoint weights deliberately left out (momentum encoder, predictor, decoder, lm_head...).
        resized: position embeddings / bias tables interpolated to the model's grid.
        notes: anything else worth knowing (metadata entries ignored, which encoder was taken...).
    """

    spec: str
    source: str
    path: str | None = None
    arch: str = ""
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when every model weight came from the checkpoint and every checkpoint weight was used."""
        return not (self.missing or self.unexpected or self.mismatched)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"{self.spec}: {self.arch} {self.arch_kwargs}"]
        if self.path:
            lines.append(f"  weights: {self.path} ({self.loaded} tensors loaded)")
        for name in ("missing", "unexpected", "mismatched"):
            keys = getattr(self, name)
            if keys:
                lines.append(f"  {name} ({len(keys)}): {', '.join(keys[:12])}{' ...' if len(keys) > 12 else ''}")
        if self.dropped:
            lines.append(f"  dropped ({len(self.dropped)}): {summarize_keys(self.dropped)}")
        lines.extend(f"  resized: {item}" for item in self.resized)
        lines.extend(f"  note: {item}" for item in self.notes)
        return "\n".join(lines)

    def log(self) -> None:
        level = logging.INFO if self.complete else logging.WARNING
        logger.log(level, "%s", self.summary())


def summarize_keys(keys: list[str], depth: int = 2) -> str:
    """``['a.b.c', 'a.b.d', 'x.y']`` -> ``'a.b.* (2), x.y (1)'``: long key lists, grouped by prefix."""
    groups = Counter(".".join(key.split(".")[:depth]) for key in keys)
    return ", ".join(f"{prefix}{'.*' if count > 1 else ''} ({count})" for prefix, count in groups.items())


def mismatch_message(
    header: str,
    *,
    mismatched: Sequence[str],
    missing: Sequence[str],
    unexpected: Sequence[str] = (),
    where: str = "model",
    advice: str,
) -> str:
    """The text of a :class:`CheckpointMismatchError`: ``header``, a line for each kind of key that does not
    fit (the first 15 named), then ``advice`` — what to fix, or ``strict=False`` to load what fits."""

    def listing(keys: Sequence[str]) -> str:
        return "; ".join(keys[:15]) + (f"; ... ({len(keys) - 15} more)" if len(keys) > 15 else "")

    parts = [header]
    if mismatched:
        parts.append(f"  shape mismatch ({len(mismatched)}): {listing(mismatched)}")
    if missing:
        parts.append(f"  missing from the checkpoint, would stay random ({len(missing)}): {listing(missing)}")
    if unexpected:
        parts.append(f"  in the checkpoint but not in the {where} ({len(unexpected)}): {listing(unexpected)}")
    parts.append(f"  {advice}")
    return "\n".join(parts)
