"""Capture for timm transformers: plain ViTs, windowed ViTs (SAM/ViTDet) and hierarchical ones (Swin).

Blocks are ``model.blocks[i]`` (ViT, DeiT, BEiT, EVA, SAM) or ``model.layers[s].blocks[j]`` (Swin, one
stage after another), each with an ``.attn`` module. A block either works on tokens [B, T, C]
(prefix tokens first) or on a channels-last grid [B, H, W, C] (SAM, Swin); a grid is laid out as
tokens [B, H·W, C] in row-major order, its size read off the tensor, so a hierarchical model's depths
each carry their own grid and stride.

Each depth carries its own stride in pixels, read off the model's geometry: the patch embedding's whole
reduction (``feat_ratio``: a hybrid's CNN stride times its patch size; ``embeds`` for NaFlexVit) times the
stage's reduction from ``feature_info`` (Swin: 4, 8, 16, 32 px whatever the image size), and the grid a
block shows is checked against it.

Per block the capture takes:
- attention probabilities from ``attn.attn_drop`` (timm's fused scaled-dot-product attention never
  materialises them, so it is switched off on every attention module while capturing and restored
  afterwards, also when the forward raises). Windowed attention comes per window, [B·W, H, n, n],
  and ``LayerOutput.window`` says the window grid;
- per-head outputs A·V from the input of the output projection (or of the optional norm before it), split
  into the block's own number of heads (a Swin stage's). On the first batch each attention module is run a
  second time with its probabilities replaced by the identity, which gives the values it multiplies them
  with; a module whose read is not one softmax map per head (rows >= 0 summing to 1) whose product with
  those values is the per-head output is refused (DiffAttention's A1 - λ·A2 is, by name, before any pass);
- the residual branches from the outputs of ``drop_path1`` and ``drop_path2``, which every timm block
  adds to its stream (``x = x + drop_path1(...)``, ``x = x + drop_path2(...)``): exact, whatever the
  layer scale or norm placement (pre-norm, post-norm, SAM's windowed branch is un-partitioned first).
  On the first batch the capture checks stream in + attention branch + MLP branch = block output and
  refuses a block layout where it does not hold.

Parallel blocks (``ParallelScalingBlock``, ``ParallelThingsBlock``: attention and MLP side by side on one
input) give their tokens exactly; their attention and branches are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol, SupportsInt, cast

import torch
from torch import Tensor, nn

from vitscope.capture.blocks import BlockCapture, UnsupportedModelError, first_images, first_tensor
from vitscope.capture.layer import LayerOutput, ModelFacts, OnLayer, pair
from vitscope.capture.timm_layout import (
    block_heads,
    block_strides,
    is_parallel,
    patch_embedding,
    patch_stride,
    transformer_blocks,
)

__all__ = ["ViTCapture", "is_vision_transformer", "transformer_blocks", "UnsupportedModelError"]


_Extra = dict[str, Tensor | None]  # the optional tensors of a LayerOutput, by field name


class _FusedAttention(Protocol):
    """A timm attention module with the switch between fused SDPA and explicit probabilities."""

    fused_attn: bool


def is_vision_transformer(model: nn.Module) -> bool:
    return bool(transformer_blocks(model))


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
    "token metrics, CKA and probes work without it: make_capture(model, attention=False, branches=False) "
    "(CLI: --metrics token_cosine,depth_cosine,effective_rank,fourier_high,linear_probe,cka,noise,tsne)"
)
_UNSUPPORTED_ATTENTION = {
    "DiffAttention": "its blocks use differential attention, which weighs each head's values by A1 - λ·A2 of two "
    "softmax maps (rows sum to 1 - λ, entries can be negative) and RMS-normalises the result, so no probability "
    "distribution over tokens weighs the values; the attention metrics are undefined for it",
    "XCA": "its blocks use cross-covariance attention, which attends over channels, not tokens; attention "
    "distance, NMI, entropy and head similarity are undefined for it",
    "TalkingHeadAttn": "its blocks mix the heads' attention after the softmax (talking heads), so what reaches the "
    "values is no probability distribution over tokens; the attention metrics are undefined for it",
}


def _check_supported(model: nn.Module, blocks: list[nn.Module], attention: bool, branches: bool) -> None:
    """Refuse, before any pass, what is known not to be capturable: parallel blocks' attention and branches, and
    the attention of the modules in ``_UNSUPPORTED_ATTENTION``."""
    if (attention or branches) and is_parallel(blocks[0]):
        raise UnsupportedModelError(
            f"{type(model).__name__}: its {type(blocks[0]).__name__}s run attention and MLP side by side on the same "
            "input, so no stream lies between the branches (the residual ratios are undefined) and no attention "
            f"module of its own holds each block's probabilities; {_WITHOUT_ATTENTION}"
        )
    reason = _UNSUPPORTED_ATTENTION.get(type(getattr(blocks[0], "attn", None)).__name__) if attention else None
    if reason is not None:
        raise UnsupportedModelError(f"{type(model).__name__}: {reason}; {_WITHOUT_ATTENTION}")


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
        _check_supported(model, self.blocks, attention, branches)
        self.attention = attention
        self.branches = branches
        self._verified = False
        self._probing = False  # True while an attention module runs again to show its values (first batch)
        self._batch_images = 0  # images in the batch being captured
        self.heads = [block_heads(block) for block in self.blocks]  # per block: Swin stages differ
        self.facts = self._read_facts()

    def _read_facts(self) -> ModelFacts:
        model = self.model
        embed_dim = int(cast(SupportsInt, getattr(model, "embed_dim", 0) or getattr(model, "num_features", 0))) or None
        embed = patch_embedding(model)
        has_cls = getattr(model, "cls_token", None) is not None or bool(getattr(embed, "has_class_token", False))
        if hasattr(model, "num_prefix_tokens"):
            prefix = int(cast(SupportsInt, model.num_prefix_tokens))
        else:
            prefix = int(has_cls) + int(getattr(model, "dist_token", None) is not None)
        if hasattr(model, "cls_attn_blocks") or hasattr(model, "blocks_token_only"):
            prefix, has_cls = 0, False  # XCiT, CaiT: the class token joins after the blocks vitscope reads
        staged = not isinstance(getattr(model, "blocks", None), (nn.Sequential, nn.ModuleList))
        names = {id(module): name for name, module in model.named_modules()}
        layer_names = tuple(names[id(block)] for block in self.blocks)
        self.strides = block_strides(model, layer_names, patch_stride(embed))  # pixels per token, block by block
        return ModelFacts(
            kind="hierarchical" if staged else "vit",
            num_layers=len(self.blocks),
            num_heads=self.heads[0],
            embed_dim=embed_dim,
            num_prefix_tokens=prefix,
            patch_size=self.strides[0],
            has_class_token=has_cls,
            layer_names=layer_names,
            layer_heads=tuple(n for n in self.heads if n is not None) if None not in self.heads else (),
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
        self._batch_images = int(images.shape[0])
        handles: list[torch.utils.hooks.RemovableHandle] = []
        slot: dict[str, Tensor] = {}

        def make_layer(
            depth: int, hidden: Tensor, extra: _Extra | None = None, window: tuple[int, int] | None = None
        ) -> LayerOutput:
            return self._layer(depth, hidden, image_hw, extra or {}, window)

        def on_first_input(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            on_layer(make_layer(0, first_tensor(args, kwargs)))

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
        patch = self.strides[max(depth - 1, 0)]
        fits = {
            (image_hw[0] // patch[0], image_hw[1] // patch[1]),
            (-(-image_hw[0] // patch[0]), -(-image_hw[1] // patch[1])),
        }
        if grid not in fits:
            raise RuntimeError(
                f"{type(self.model).__name__} block {depth}: a {grid[0]}x{grid[1]} grid for input {image_hw} does not "
                f"fit the block's stride of {patch[0]}x{patch[1]} px (expected {' or '.join(map(str, sorted(fits)))})"
            )
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
        window = _window_of(block)

        def block_in(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            slot["stream_in"] = first_tensor(args, kwargs)

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
            handles.extend(self._hook_attention(block, depth, slot))
        handles.append(block.register_forward_hook(block_out))
        return handles

    def _hook_attention(self, block: nn.Module, depth: int, slot: dict[str, Tensor]) -> list:
        """Keep the probabilities (``attn_drop``'s output) and the per-head outputs (the input of ``proj``, or of
        the head norm before it); on the first batch, run the module again with identity probabilities to read
        its values, and check that the probabilities times the values are the per-head outputs."""
        attn_module = cast(nn.Module, block.attn)
        heads = cast(int, self.heads[depth - 1])
        drop = getattr(attn_module, "attn_drop", None)
        if not isinstance(drop, nn.Module) or not heads:
            raise UnsupportedModelError(
                f"{type(attn_module).__name__} (block {depth}) has no attn_drop or num_heads: its attention "
                f"probabilities cannot be read; {_WITHOUT_ATTENTION}"
            )

        def attn_probs(_m: nn.Module, _args: tuple, output: Tensor) -> Tensor | None:
            if self._probing:  # the module multiplies the identity by its values: they reach the head outputs
                return torch.eye(output.shape[-1], dtype=output.dtype, device=output.device).expand_as(output).clone()
            if output.ndim == 3:  # [B·H, n, n] (SAM folds the heads into the batch)
                output = output.reshape(-1, heads, *output.shape[-2:])
            slot["attn"] = output
            return None

        def heads_in(_m: nn.Module, args: tuple) -> None:
            x = args[0]  # [B, T, H*D] (or [B·W, n, H*D], SAM [B, h, w, H*D]), heads concatenated
            split = x.reshape(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)
            slot["values" if self._probing else "head_outputs"] = split

        def verify(module: nn.Module, args: tuple, kwargs: dict, _output: Tensor) -> None:
            if self._verified or self._probing:
                return
            args, kwargs, rows = first_images(args, kwargs, self._batch_images)  # the module, not the data, is checked
            self._probing = True
            try:
                with torch.no_grad():  # forward itself: the module's own hooks (this one) do not run again
                    module.forward(*args, **kwargs)
            finally:
                self._probing = False
            attn, head_outputs = slot.get("attn"), slot.get("head_outputs")
            self.check_attention(
                depth,
                None if attn is None else attn[:rows],
                None if head_outputs is None else head_outputs[:rows],
                slot.pop("values", None),
                heads,
            )

        head_norm = getattr(attn_module, "norm", None)
        target = head_norm if isinstance(head_norm, nn.Module) else cast(nn.Module, attn_module.proj)
        return [
            drop.register_forward_hook(attn_probs),
            target.register_forward_pre_hook(heads_in),
            attn_module.register_forward_hook(verify, with_kwargs=True),
        ]

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
