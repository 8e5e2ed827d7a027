"""Capture for CNNs and other non-transformers: per-stage feature maps laid out as tokens [B, h·w, C]."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from vitscope.capture.layer import Capture, LayerOutput, ModelFacts, OnLayer

__all__ = ["FeatureCapture"]


class FeatureCapture(Capture):
    """Capture for CNNs and other non-transformers: per-stage feature maps as tokens [B, h·w, C].

    Stages are taken from timm's ``feature_info`` (module names and strides) when the model has it,
    else from ``module_names``.
    """

    def __init__(self, model: nn.Module, module_names: list[str] | None = None) -> None:
        super().__init__(model)
        strides: list[int] = []
        if module_names is None:
            info = getattr(model, "feature_info", None)
            if not info:
                raise TypeError(
                    f"{type(model).__name__} has neither transformer blocks nor timm feature_info; "
                    "pass module_names= to FeatureCapture"
                )
            entries = list(info) if not hasattr(info, "get_dicts") else info.get_dicts()
            module_names = [entry["module"] for entry in entries]
            strides = [int(entry.get("reduction", 1)) for entry in entries]
        modules = dict(model.named_modules())
        missing = [name for name in module_names if name not in modules]
        if missing:
            raise KeyError(f"modules not found in {type(model).__name__}: {missing}")
        self.module_names = list(module_names)
        self.strides = strides or [1] * len(module_names)
        self.facts = ModelFacts(
            kind="cnn",
            num_layers=len(module_names),
            num_heads=None,
            embed_dim=None,
            num_prefix_tokens=0,
            patch_size=(self.strides[-1], self.strides[-1]),
            has_class_token=False,
            layer_names=tuple(module_names),
        )

    def _as_tokens(
        self, depth: int, output: Tensor, image_hw: tuple[int, int], stride: int
    ) -> tuple[Tensor, tuple[int, int]]:
        """A stage's output as tokens [B, h·w, C] and its grid: [B, C, H, W] maps, or tokens [B, N, C] (LeViT)
        whose N fits the stage's stride. Anything else is an error, not a guess."""
        sizes = {(-(-image_hw[0] // stride), -(-image_hw[1] // stride)), (image_hw[0] // stride, image_hw[1] // stride)}
        name = self.module_names[depth - 1]
        if output.ndim == 4 and (int(output.shape[2]), int(output.shape[3])) in sizes:
            return output.flatten(2).transpose(1, 2), (int(output.shape[2]), int(output.shape[3]))
        if output.ndim == 3:
            for grid in sorted(sizes):
                if grid[0] * grid[1] == output.shape[1]:
                    return output, grid
        raise RuntimeError(
            f"{name} gave shape {tuple(output.shape)}; for input {image_hw} and stride {stride} vitscope expects "
            f"feature maps [B, C, H, W] or tokens [B, N, C] on a grid of {sorted(sizes)}"
        )

    def run(self, images: Tensor, on_layer: OnLayer, *, grad: bool = False) -> Tensor:
        modules = dict(self.model.named_modules())
        handles = []

        image_hw = (int(images.shape[-2]), int(images.shape[-1]))

        def make_hook(depth: int, stride: int) -> Callable:
            def hook(_m: nn.Module, _args: tuple, output: Tensor) -> None:
                tokens, grid = self._as_tokens(depth, output, image_hw, stride)
                on_layer(LayerOutput(depth, tokens, grid, 0, (stride, stride)))

            return hook

        for depth, (name, stride) in enumerate(zip(self.module_names, self.strides), start=1):
            handles.append(modules[name].register_forward_hook(make_hook(depth, stride)))
        context = torch.enable_grad() if grad else torch.no_grad()
        try:
            with context:
                return self.model(images)
        finally:
            for handle in handles:
                handle.remove()
