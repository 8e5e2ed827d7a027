"""Capture for timm-style transformers: ``model.blocks[i]`` with ``.attn`` inside.

Gives attention probabilities [B, H, T, T], per-head outputs A·V [B, H, T, D] (before the output
projection) and the residual branches. timm's fused scaled-dot-product attention never materialises
the probabilities, so it is switched off on every attention module while capturing and restored
afterwards, also when the forward raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol, SupportsInt, cast

import torch
from torch import Tensor, nn

from vitscope.capture.layer import Capture, LayerOutput, ModelFacts, OnLayer, pair

__all__ = ["ViTCapture", "is_vision_transformer"]


def is_vision_transformer(model: nn.Module) -> bool:
    blocks = getattr(model, "blocks", None)
    return isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) > 0 and hasattr(blocks[0], "attn")


class _FusedAttention(Protocol):
    """A timm attention module with the switch between fused SDPA and explicit probabilities."""

    fused_attn: bool


def _first_tensor(args: tuple, kwargs: dict) -> Tensor:
    """The hidden states a block is called with, positionally or as ``x=``."""
    if args:
        return args[0]
    if "x" in kwargs:
        return kwargs["x"]
    raise RuntimeError("block called without hidden states")


class ViTCapture(Capture):
    """Capture for timm-style transformers: ``model.blocks[i]`` with ``.attn`` inside.

    Args:
        model: the transformer.
        attention: capture attention probabilities and per-head outputs (needs non-fused attention).
        branches: capture the residual stream entering each block and both branch outputs.
    """

    def __init__(self, model: nn.Module, *, attention: bool = True, branches: bool = True) -> None:
        super().__init__(model)
        if not is_vision_transformer(model):
            raise TypeError(f"{type(model).__name__} has no `blocks[i].attn`: use FeatureCapture for it")
        self.attention = attention
        self.branches = branches
        blocks = model.blocks
        assert isinstance(blocks, (nn.Sequential, nn.ModuleList))  # checked by is_vision_transformer
        self.blocks: list[nn.Module] = list(blocks)
        self.facts = self._read_facts()

    def _read_facts(self) -> ModelFacts:
        model = self.model
        attn0 = cast(nn.Module, self.blocks[0].attn)
        num_heads = int(cast(SupportsInt, attn0.num_heads))
        embed_dim = int(getattr(model, "embed_dim", 0) or getattr(model, "num_features", 0)) or None
        has_cls = getattr(model, "cls_token", None) is not None
        if hasattr(model, "num_prefix_tokens"):
            prefix = int(cast(SupportsInt, model.num_prefix_tokens))
        else:
            prefix = int(has_cls) + int(getattr(model, "dist_token", None) is not None)
        patch_embed = cast(nn.Module, model.patch_embed)
        patch = pair(cast("int | tuple[int, int]", patch_embed.patch_size))
        return ModelFacts(
            kind="vit",
            num_layers=len(self.blocks),
            num_heads=num_heads,
            embed_dim=embed_dim,
            num_prefix_tokens=prefix,
            patch_size=patch,
            has_class_token=has_cls,
            layer_names=tuple(f"blocks.{i}" for i in range(len(self.blocks))),
        )

    @contextmanager
    def _unfused_attention(self) -> Iterator[None]:
        """Switch timm's fused attention off on every block while capturing; always restore it."""
        saved: list[tuple[_FusedAttention, bool]] = []
        try:
            if self.attention:
                for block in self.blocks:
                    attn = block.attn
                    if hasattr(attn, "fused_attn"):
                        fused = cast(_FusedAttention, attn)
                        saved.append((fused, fused.fused_attn))
                        fused.fused_attn = False
            yield
        finally:
            for fused, value in saved:
                fused.fused_attn = value

    def _layer_scale(self, block: nn.Module, which: int) -> Callable[[Tensor], Tensor]:
        module = getattr(block, f"ls{which}", None)
        if isinstance(module, nn.Module):
            return module
        gamma = getattr(block, f"gamma_{which}", None)
        if isinstance(gamma, Tensor):
            return lambda x: gamma * x
        return lambda x: x

    def run(self, images: Tensor, on_layer: OnLayer, *, grad: bool = False) -> Tensor:
        """One forward pass; ``on_layer`` sees depth 0..L in order. Returns the model's output."""
        grid = self.facts.grid_for((images.shape[-2], images.shape[-1]))
        prefix = self.facts.num_prefix_tokens
        handles: list[torch.utils.hooks.RemovableHandle] = []
        slot: dict[str, Tensor] = {}

        def make_layer(depth: int, tokens: Tensor, **extra: Tensor | None) -> LayerOutput:
            expected = prefix + grid[0] * grid[1]
            if tokens.shape[1] != expected:
                raise RuntimeError(
                    f"block {depth}: {tokens.shape[1]} tokens, expected {prefix} prefix + "
                    f"{grid[0]}x{grid[1]} grid = {expected} for input {tuple(images.shape[-2:])}"
                )
            return LayerOutput(
                depth, tokens, grid, prefix, self.facts.patch_size, **extra, has_class_token=self.facts.has_class_token
            )

        def on_first_input(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            on_layer(make_layer(0, _first_tensor(args, kwargs)))

        handles.append(self.blocks[0].register_forward_pre_hook(on_first_input, with_kwargs=True))
        for depth, block in enumerate(self.blocks, start=1):
            handles.extend(self._hook_block(block, depth, slot, on_layer, make_layer))

        context = torch.enable_grad() if grad else torch.no_grad()
        try:
            with self._unfused_attention(), context:
                return self.model(images)
        finally:
            for handle in handles:
                handle.remove()
            slot.clear()

    def _hook_block(
        self,
        block: nn.Module,
        depth: int,
        slot: dict[str, Tensor],
        on_layer: OnLayer,
        make_layer: Callable[..., LayerOutput],
    ) -> list:
        handles = []
        attn_module = cast(nn.Module, block.attn)
        ls1 = self._layer_scale(block, 1)

        def block_in(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            slot["stream_in"] = _first_tensor(args, kwargs)

        def attn_probs(_m: nn.Module, _args: tuple, output: Tensor) -> None:
            slot["attn"] = output

        def heads_in(_m: nn.Module, args: tuple) -> None:
            x = args[0]  # [B, T, H*D], heads concatenated
            b, t, _ = x.shape
            heads = self.facts.num_heads
            slot["head_outputs"] = x.reshape(b, t, heads, -1).transpose(1, 2)

        def attn_out(_m: nn.Module, _args: tuple, output: Tensor) -> None:
            slot["attn_branch"] = ls1(output)

        def block_out(_m: nn.Module, _args: tuple, output: Tensor) -> None:
            extra: dict[str, Tensor | None] = {
                "attn": slot.pop("attn", None),
                "head_outputs": slot.pop("head_outputs", None),
            }
            stream_in = slot.pop("stream_in", None)
            attn_branch = slot.pop("attn_branch", None)
            if self.branches and stream_in is not None and attn_branch is not None:
                extra.update(stream_in=stream_in, attn_branch=attn_branch, mlp_branch=output - stream_in - attn_branch)
            layer = make_layer(depth, output, **extra)
            del extra, stream_in, attn_branch
            on_layer(layer)

        if self.branches:
            handles.append(block.register_forward_pre_hook(block_in, with_kwargs=True))
            handles.append(attn_module.register_forward_hook(attn_out))
        if self.attention:
            drop = getattr(attn_module, "attn_drop", None)
            if drop is None:
                raise TypeError(f"blocks.{depth - 1}.attn has no attn_drop: cannot read attention probabilities")
            handles.append(drop.register_forward_hook(attn_probs))
            # A·V of all heads is the input of the output projection (or of the optional norm before it).
            head_norm = getattr(attn_module, "norm", None)
            target = head_norm if isinstance(head_norm, nn.Module) else cast(nn.Module, attn_module.proj)
            handles.append(target.register_forward_pre_hook(heads_in))
        handles.append(block.register_forward_hook(block_out))
        return handles
