"""Each model's own eval transform: the one its loader attached (Hugging Face and OpenCLIP models bring
their own preprocessing), else the one timm's data config describes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "Preprocess",
    "attach_preprocess",
    "model_input_size",
    "build_transform",
    "input_normalisation",
    "MultiView",
    "distinct_views",
]

_ATTRIBUTE = "vitscope_preprocess"


@dataclass(frozen=True)
class Preprocess:
    """How images become a model's input: the eval transform (PIL image -> [3, H, W] tensor), and the
    mean and std it normalises with (to show an input image again)."""

    transform: Callable[[Any], torch.Tensor]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __repr__(self) -> str:  # models with the same pipeline share one view of each image
        return f"Preprocess({self.transform!r}, mean={self.mean}, std={self.std})"


def attach_preprocess(model: torch.nn.Module, preprocess: Preprocess) -> None:
    """Give a model its own preprocessing (loaders of non-timm models call this)."""
    object.__setattr__(model, _ATTRIBUTE, preprocess)


def _attached(model: torch.nn.Module) -> Preprocess | None:
    found = getattr(model, _ATTRIBUTE, None)
    return found if isinstance(found, Preprocess) else None


def model_input_size(model: torch.nn.Module) -> tuple[int, int] | None:
    """The (H, W) a model was built for: timm's ``patch_embed.img_size``, else the ``img_size`` it was
    created with (LeViT and others keep no patch embedding), or None when dynamic or unknown."""
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is None:
        report = getattr(model, "vitscope_load_report", None)
        size = (getattr(report, "arch_kwargs", None) or {}).get("img_size")
    elif getattr(patch_embed, "dynamic_img_size", False):
        return None
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def build_transform(model: torch.nn.Module, input_size: tuple[int, int] | None = None) -> Callable:
    """The model's eval transform: the one its loader attached, else timm's (``resolve_data_config``).

    With timm's, the input size is the one the model was built with (a ViT created with ``img_size=32`` gets 32 px,
    whatever its pretrained config says) unless ``input_size`` overrides it. Small inputs (≤ 64 px)
    are resized without a centre crop, since cropping a 28 px image loses the object.
    """
    from timm.data import create_transform, resolve_data_config

    attached = _attached(model)
    if attached is not None and input_size is None:
        return attached.transform
    config = resolve_data_config({}, model=model)
    size = input_size or model_input_size(model) or tuple(config["input_size"][1:])
    config["input_size"] = (3, int(size[0]), int(size[1]))
    if max(size) <= 64:
        config["crop_pct"] = 1.0
    return create_transform(**config, is_training=False)


def input_normalisation(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) a model's inputs are normalised with."""
    from timm.data import resolve_data_config

    attached = _attached(model)
    if attached is not None:
        return attached.mean, attached.std
    config = resolve_data_config({}, model=model)
    return tuple(config["mean"]), tuple(config["std"])


class MultiView:
    """Apply several transforms to one image: one view per distinct model input pipeline."""

    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Any) -> tuple[Any, ...]:
        return tuple(transform(image) for transform in self.transforms)


def distinct_views(transforms: Sequence[Callable]) -> tuple[list[Callable], list[int]]:
    """The distinct transforms (by their printed form) and, for each input transform, its view index."""
    unique: dict[str, int] = {}
    views: list[Callable] = []
    index = []
    for transform in transforms:
        key = repr(transform)
        if key not in unique:
            unique[key] = len(views)
            views.append(transform)
        index.append(unique[key])
    return views, index
