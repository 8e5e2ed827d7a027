"""Capture for timm transformers: plain ViTs, windowed ViTs (SAM/ViTDet) and hierarchical ones (Swin).

Blocks are ``model.blocks[i]`` (ViT, DeiT, BEiT, EVA, SAM) or ``model.layers[s].blocks[j]`` (Swin, one
stage after another), each with an ``.attn`` module. A block either works on tokens [B, T, C]
(prefix tokens first) or on a channels-last grid [B, H, W, C] (SAM, Swin); a grid is laid out as
tokens [B, H·W, C] in row-major order, its size read off the tensor, so a hierarchical model's depths
each carry their own grid and stride.

Per block the capture takes:
- attention probabilities from ``attn.attn_drop`` (timm's fused scaled-dot-product attention never
  materialises them, so it is switched off on every attention module while capturing and restored
  afterwards, also when the forward raises). Windowed attention comes per window, [B·W, H, n, n],
  and ``LayerOutput.window`` says the window grid;
- per-head outputs A·V from the input of the output projection (or of the optional norm before it);
- the residual branches from the outputs of ``drop_path1`` and ``drop_path2``, which every timm block
  adds to its stream (``x = x + drop_path1(...)``, ``x = x + drop_path2(...)``): exact, whatever the
  layer scale or norm placement (pre-norm, post-norm, SAM's windowed branch is un-partitioned first).
  On the first batch the capture checks stream in + attention branch + MLP branch = block output and
  refuses a block layout where it does not hold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol, SupportsInt, cast

import torch
from torch import Tensor, nn

from vitscope.capture.blocks import BlockCapture, UnsupportedModelError
from vitscope.capture.layer import LayerOutput, ModelFacts, OnLayer, pair

__all__ = ["ViTCapture", "is_vision_transformer", "transformer_blocks", "UnsupportedModelError"]


_Extra = dict[str, Tensor | None]  # the optional tensors of a LayerOutput, by field name


class _FusedAttention(Protocol):
    """A timm attention module with the switch between fused SDPA and explicit probabilities."""

    fused_attn: bool


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The attention blocks in forward order: ``model.blocks`` or, stage by stage, ``model.layers[s].blocks``."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) and hasattr(blocks[0], "attn"):
        return list(blocks)
    layers = getattr(model, "layers", None)
    if isinstance(layers, (nn.Sequential, nn.ModuleList)):
        staged = [block for layer in layers for block in getattr(layer, "blocks", ())]
        if staged and all(hasattr(block, "attn") for block in staged):
            return staged
    return []


def is_vision_transformer(model: nn.Module) -> bool:
    return bool(transformer_blocks(model))


def _first_tensor(args: tuple, kwargs: dict) -> Tensor:
    """The hidden states a block is called with, positionally or as ``x=``."""
    if args:
        return args[0]
    if "x" in kwargs:
        return kwargs["x"]
    raise RuntimeError("block called without hidden states")


def _as_tokens(x: Tensor) -> Tensor:
    """[B, T, C] as it is; a channels-last grid [B, H, W, C] as tokens [B, H·W, C]."""
    return x.flatten(1, 2) if x.ndim == 4 else x


def _window_of(block: nn.Module) -> tuple[int, int] | None:
    """The attention window of a block (Swin ``window_size`` pair, SAM ``window_size`` int, 0 = global)."""
    size = getattr(block, "window_size", None)
    if size is None or size == 0:
        return None
    return pair(cast("int | tuple[int, int]", size))


_WITHOUT_ATTENTION = (
    "Token metrics, CKA and probes work without attention: make_capture(model, attention=False, branches=False) "
    "(CLI: --metrics token_cosine,depth_cosine,effective_rank,fourier_high,linear_probe,cka,noise,tsne)"
)
_UNSUPPORTED_ATTENTION = {
    "XCA": "its blocks use cross-covariance attention, which attends over channels, not tokens; attention "
    "distance, NMI, entropy and head similarity are undefined for it.",
    "TalkingHeadAttn": "its blocks mix the heads' attention after the softmax (talking heads), so what reaches the "
    "values is no probability distribution over tokens; the attention metrics are undefined for it.",
}


def _check_supported(model: nn.Module, blocks: list[nn.Module]) -> None:
    reason = _UNSUPPORTED_ATTENTION.get(type(blocks[0].attn).__name__)
    if reason is not None:
        raise UnsupportedModelError(f"{type(model).__name__}: {reason} {_WITHOUT_ATTENTION}")


class ViTCapture(BlockCapture):
    """Capture for timm transformers (see the module docstring).

    Args:
        model: the transformer.
        attention: capture attention probabilities and per-head outputs (needs non-fused attention).
        branches: capture the residual stream entering each block and both branch outputs.
    """

    def __init__(self, model: nn.Module, *, attention: bool = True, branches: bool = True) -> None:
        super().__init__(model)
        self.blocks = transformer_blocks(model)
        if not self.blocks:
            raise TypeError(
                f"{type(model).__name__} has no `blocks[i].attn` or `layers[s].blocks[j].attn`: use FeatureCapture"
            )
        if attention:
            _check_supported(model, self.blocks)
        self.attention = attention
        self.branches = branches
        self._verified = False
        self.facts = self._read_facts()

    def _read_facts(self) -> ModelFacts:
        model = self.model
        attn0 = cast(nn.Module, self.blocks[0].attn)
        num_heads = int(cast(SupportsInt, attn0.num_heads))
        embed_dim = int(cast(SupportsInt, getattr(model, "embed_dim", 0) or getattr(model, "num_features", 0))) or None
        has_cls = getattr(model, "cls_token", None) is not None
        if hasattr(model, "num_prefix_tokens"):
            prefix = int(cast(SupportsInt, model.num_prefix_tokens))
        else:
            prefix = int(has_cls) + int(getattr(model, "dist_token", None) is not None)
        if hasattr(model, "cls_attn_blocks") or hasattr(model, "blocks_token_only"):
            prefix, has_cls = 0, False  # XCiT, CaiT: the class token joins after the blocks vitscope reads
        patch_embed = cast(nn.Module, model.patch_embed)
        patch = pair(cast("int | tuple[int, int]", patch_embed.patch_size))
        staged = not isinstance(getattr(model, "blocks", None), (nn.Sequential, nn.ModuleList))
        return ModelFacts(
            kind="hierarchical" if staged else "vit",
            num_layers=len(self.blocks),
            num_heads=num_heads,
            embed_dim=embed_dim,
            num_prefix_tokens=prefix,
            patch_size=patch,
            has_class_token=has_cls,
            layer_names=tuple(name for name, module in model.named_modules() if any(module is b for b in self.blocks)),
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

    def run(self, images: Tensor, on_layer: OnLayer, *, grad: bool = False) -> Tensor:
        """One forward pass; ``on_layer`` sees depth 0..L in order. Returns the model's output."""
        image_hw = (int(images.shape[-2]), int(images.shape[-1]))
        handles: list[torch.utils.hooks.RemovableHandle] = []
        slot: dict[str, Tensor] = {}

        def make_layer(
            depth: int, hidden: Tensor, extra: _Extra | None = None, window: tuple[int, int] | None = None
        ) -> LayerOutput:
            return self._layer(depth, hidden, image_hw, extra or {}, window)

        def on_first_input(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            on_layer(make_layer(0, _first_tensor(args, kwargs)))

        handles.append(self.blocks[0].register_forward_pre_hook(on_first_input, with_kwargs=True))
        for depth, block in enumerate(self.blocks, start=1):
            handles.extend(self._hook_block(block, depth, slot, on_layer, make_layer))

        with self.hooked_pass(handles, slot, grad=grad), self._unfused_attention():
            return self.model(images)

    def _layer(
        self, depth: int, hidden: Tensor, image_hw: tuple[int, int], extra: _Extra, window: tuple[int, int] | None
    ) -> LayerOutput:
        """A LayerOutput from a block's hidden states: tokens [B, T, C], or a channels-last grid [B, H, W, C]
        (SAM, Swin) laid out as tokens with the grid and stride it shows."""
        if hidden.ndim == 3:
            return self.token_layer(depth, hidden, image_hw, extra, window=window)
        if hidden.ndim != 4:
            raise RuntimeError(
                f"block {depth} of {type(self.model).__name__} gave hidden states of shape {tuple(hidden.shape)}; "
                "expected tokens [B, T, C] or a channels-last grid [B, H, W, C]"
            )
        grid = (int(hidden.shape[1]), int(hidden.shape[2]))
        patch = (image_hw[0] // grid[0], image_hw[1] // grid[1])
        return LayerOutput(
            depth,
            _as_tokens(hidden),
            grid,
            0,
            patch,
            attn=extra.get("attn"),
            head_outputs=extra.get("head_outputs"),
            stream_in=extra.get("stream_in"),
            attn_branch=extra.get("attn_branch"),
            mlp_branch=extra.get("mlp_branch"),
            window=window,
        )

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
        window = _window_of(block)

        def block_in(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            slot["stream_in"] = _first_tensor(args, kwargs)

        def attn_probs(_m: nn.Module, _args: tuple, output: Tensor) -> None:
            if output.ndim == 3:  # [B·H, n, n] (SAM folds the heads into the batch)
                output = output.reshape(-1, cast(int, self.facts.num_heads), *output.shape[-2:])
            slot["attn"] = output

        def heads_in(_m: nn.Module, args: tuple) -> None:
            x = args[0]  # [B, T, H*D] (or [B·W, n, H*D]), heads concatenated
            heads = cast(int, self.facts.num_heads)
            slot["head_outputs"] = x.reshape(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)

        def block_out(_m: nn.Module, _args: tuple, output: Tensor) -> None:
            extra: _Extra = {}
            if self.attention:
                extra.update(attn=slot.pop("attn", None), head_outputs=slot.pop("head_outputs", None))
            if self.branches:
                extra.update(self._branches(depth, slot, output, window))
            slot.clear()
            layer = make_layer(depth, output, extra, window if self.attention else None)
            del extra
            on_layer(layer)

        if self.branches:
            handles.append(block.register_forward_pre_hook(block_in, with_kwargs=True))
            handles.extend(self._hook_branches(block, depth, slot))
        if self.attention:
            drop = getattr(attn_module, "attn_drop", None)
            if not isinstance(drop, nn.Module):
                raise UnsupportedModelError(
                    f"{type(attn_module).__name__} (block {depth}) has no attn_drop: its attention probabilities "
                    "cannot be read"
                )
            handles.append(drop.register_forward_hook(attn_probs))
            head_norm = getattr(attn_module, "norm", None)
            target = head_norm if isinstance(head_norm, nn.Module) else cast(nn.Module, attn_module.proj)
            handles.append(target.register_forward_pre_hook(heads_in))
        handles.append(block.register_forward_hook(block_out))
        return handles

    @staticmethod
    def _hook_branches(block: nn.Module, depth: int, slot: dict[str, Tensor]) -> list:
        """Keep what each residual branch adds: the outputs of ``drop_path1`` and ``drop_path2``, or of a
        single ``drop_path`` used for both (CaiT), attention first."""
        first, second = getattr(block, "drop_path1", None), getattr(block, "drop_path2", None)
        if isinstance(first, nn.Module) and isinstance(second, nn.Module):

            def keep(name: str) -> Callable[[nn.Module, tuple, Tensor], None]:
                return lambda _m, _args, output: slot.__setitem__(name, output)

            return [first.register_forward_hook(keep("attn_branch")), second.register_forward_hook(keep("mlp_branch"))]
        shared = getattr(block, "drop_path", None)
        if isinstance(shared, nn.Module):

            def keep_in_turn(_m: nn.Module, _args: tuple, output: Tensor) -> None:
                slot["mlp_branch" if "attn_branch" in slot else "attn_branch"] = output

            return [shared.register_forward_hook(keep_in_turn)]
        raise UnsupportedModelError(
            f"{type(block).__name__} (block {depth}) has no drop_path1/drop_path2 (or drop_path): its residual "
            "branches cannot be read; residual ratios are not defined for this block (capture with branches=False)"
        )

    def _branches(self, depth: int, slot: dict[str, Tensor], output: Tensor, window: tuple[int, int] | None) -> _Extra:
        """stream in, attention branch and MLP branch as tokens [B, T, C], checked on the first batch."""
        stream_in, attn_branch, mlp_branch = slot.get("stream_in"), slot.get("attn_branch"), slot.get("mlp_branch")
        if stream_in is None or attn_branch is None or mlp_branch is None:
            return {}
        if attn_branch.shape[0] != stream_in.shape[0] and window is not None:  # SAM: still partitioned in windows
            from timm.models.vision_transformer_sam import window_unpartition

            _, h, w, _ = stream_in.shape
            padded = (-(-h // window[0]) * window[0], -(-w // window[1]) * window[1])
            attn_branch = window_unpartition(attn_branch, window[0], (h, w), padded)
        stream_in, attn_branch, mlp_branch = _as_tokens(stream_in), _as_tokens(attn_branch), _as_tokens(mlp_branch)
        self.check_branches(depth, stream_in, attn_branch, mlp_branch, _as_tokens(output))
        return {"stream_in": stream_in, "attn_branch": attn_branch, "mlp_branch": mlp_branch}
