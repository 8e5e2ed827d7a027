"""One schema for a run's metadata (``Results.meta``, saved in ``metrics.json``).

:func:`model_meta` is the one writer of a model's entry and :class:`RunMeta` the one writer of the whole
record; both :func:`vitscope.analyses.analyze` and :func:`vitscope.analyses.analyze_model` write through
them, so a saved run always has ``"models": {label: {...}}``. :func:`models_of` reads the models back
from any saved run, including older ones that wrote ``"models": [label, ...]``.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from vitscope.analyses.driver import ModelPass

__all__ = ["ModelMeta", "RunMeta", "model_meta", "models_of", "run_versions"]


@dataclass
class ModelMeta:
    """What the report and the claims need to know about one model of a run."""

    kind: str | None = None  # "vit" or "cnn"
    num_layers: int | None = None  # blocks (ViT) or stages (CNN)
    num_heads: int | None = None
    num_prefix_tokens: int | None = None
    patch_size: list[int] | None = None  # pixels per token (rows, cols)
    has_class_token: bool | None = None
    parameters: int | None = None
    spec: str | None = None  # the model spec it was loaded from, when loaded from one
    grid: list[int] | None = None  # the last layer's token grid (h, w)
    grids: list[list[int]] = field(default_factory=list)  # token grid per depth 0..L
    windows: list[list[int] | None] = field(default_factory=list)  # attention window per depth, None if global
    attention_keys: list[int | None] = field(default_factory=list)  # keys per attention row; None at depth 0
    num_tokens: int | None = None  # spatial tokens of the last layer (h·w)
    input_size: list[int] | None = None  # the input's (height, width) in pixels
    images: int | None = None  # images this model saw

    @classmethod
    def from_dict(cls, data: Any) -> ModelMeta:
        """An entry as saved; unknown keys are dropped, a non-dict gives an empty entry."""
        if not isinstance(data, dict):
            return cls()
        known = {f.name for f in fields(cls)}
        kept = {k: v for k, v in data.items() if k in known and v is not None}
        return cls(**kept)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_meta(run: ModelPass, model: nn.Module, *, spec: str | None = None, images: int | None = None) -> ModelMeta:
    """A model's entry from its capture's facts and the layers its pass yielded (``run.layouts``)."""
    facts = run.capture.facts
    depths = sorted(run.layouts)
    grids = [list(run.layouts[d][0]) for d in depths]
    windows = [list(w) if (w := run.layouts[d][1]) else None for d in depths]
    keys: list[int | None] = []
    for depth, grid, window in zip(depths, grids, windows):
        attends = facts.kind != "cnn" and depth > 0
        area = window[0] * window[1] if window else grid[0] * grid[1]
        keys.append(area if attends else None)
    last = grids[-1] if grids else None
    return ModelMeta(
        kind=facts.kind,
        num_layers=facts.num_layers,
        num_heads=facts.num_heads,
        num_prefix_tokens=facts.num_prefix_tokens,
        patch_size=list(facts.patch_size),
        has_class_token=facts.has_class_token,
        parameters=sum(p.numel() for p in model.parameters()),
        spec=spec,
        grid=last,
        grids=grids,
        windows=windows,
        attention_keys=keys,
        num_tokens=last[0] * last[1] if last else None,
        input_size=list(run.image_hw or (0, 0)),
        images=images,
    )


@dataclass
class RunMeta:
    """A run's metadata. Fields a writer does not know stay None and are left out of the saved record;
    keys added later (``roles``, ``run_id``, ``resumed``) and unknown keys of older runs ride in ``extra``."""

    models: dict[str, ModelMeta]
    num_images: int | None = None  # test images seen by every model
    skipped: list[list[str]] = field(default_factory=list)  # [path, reason] of each unreadable file
    analyses: list[str] | None = None  # the suite's analyses (analyze), or
    metrics: list[str] | None = None  # the metric names computed (analyze_model)
    data: str | None = None
    probe_train_images: int | None = None
    noise_images: int | None = None
    config: dict[str, Any] | None = None
    seed: int | None = None
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] | None = None
    device: str | None = None
    processes: int | None = None
    pass_time_s: float | None = None
    wall_time_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The record as saved in ``metrics.json``: models as ``{label: {...}}``, None fields left out."""
        record: dict[str, Any] = {"models": {label: info.as_dict() for label, info in self.models.items()}}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in ("models", "extra") and value is not None:
                record[f.name] = value
        return {**record, **self.extra}

    @classmethod
    def from_dict(cls, meta: dict[str, Any] | None) -> RunMeta:
        """A saved record read back, tolerant of older shapes (``models`` as a list of labels)."""
        meta = dict(meta or {})
        known = {f.name for f in fields(cls)} - {"models", "extra"}
        kept = {k: meta.pop(k) for k in list(meta) if k in known}
        models = models_of({"models": meta.pop("models", None)})
        if not isinstance(kept.get("skipped"), list):  # older analyze_model runs: {label: count}
            kept.pop("skipped", None)
        return cls(models=models, extra=meta, **kept)


def models_of(meta: dict[str, Any] | None) -> dict[str, ModelMeta]:
    """``meta['models']`` as {label: ModelMeta}, in order; a list of labels (older runs) gives empty entries."""
    saved = (meta or {}).get("models") or {}
    if isinstance(saved, dict):
        return {str(label): ModelMeta.from_dict(info) for label, info in saved.items()}
    if isinstance(saved, list):
        return {str(label): ModelMeta() for label in saved}
    return {}


def run_versions() -> dict[str, str]:
    """The versions a run was computed with (vitscope, torch, timm, python)."""
    import timm
    import torch

    import vitscope

    return {
        "vitscope": vitscope.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }
