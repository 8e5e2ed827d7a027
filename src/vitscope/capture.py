"""One forward pass, every block: attention, tokens, per-head outputs and residual branches.

A :class:`Capture` wraps a model. ``capture.run(images, on_layer)`` runs one forward pass and calls
``on_layer(LayerOutput)`` once per depth, in order: depth 0 is the patch embedding (the first block's
input, position embedding and prefix tokens included), depths 1..L are the blocks' outputs. Each
``LayerOutput`` is built inside that block's forward hook and released as soon as ``on_layer``
returns, so a consumer that reduces and drops its tensors keeps peak memory at one block's worth,
not the model's.

Transformers (timm ``VisionTransformer``, DeiT, ``Beit``, ``Eva`` and anything with ``blocks[i].attn``
in timm's layout) give attention probabilities [B, H, T, T], per-head outputs Ã·V [B, H, T, D] (before
the output projection) and the residual branches. timm's fused scaled-dot-product attention never
materialises the probabilities, so it is switched off on every attention module while capturing and
restored afterwards, also when the forward raises.

Other models (a timm ResNet, any model with ``feature_info``) give per-stage feature maps, laid out as
tokens [B, h·w, C] with no prefix, so that the same consumers (CKA, GAP probes) work on both.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

__all__ = [
    "ModelFacts",
    "LayerOutput",
    "Capture",
    "ViTCapture",
    "FeatureCapture",
    "make_capture",
    "is_vision_transformer",
    "spatial_attention",
]


@dataclass(frozen=True)
class ModelFacts:
    """What the metrics need to know about a model, independent of the input."""

    kind: str  # "vit" or "cnn"
    num_layers: int  # blocks (ViT) or stages (CNN); depths run 0..num_layers for a ViT
    num_heads: int | None
    embed_dim: int | None
    num_prefix_tokens: int  # CLS + registers + distillation tokens before the spatial tokens
    patch_size: tuple[int, int]  # pixels per token along (rows, cols); a CNN stage's stride
    has_class_token: bool
    layer_names: tuple[str, ...] = field(default=())

    def grid_for(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Token grid (h, w) for an input of ``image_hw`` pixels."""
        return (image_hw[0] // self.patch_size[0], image_hw[1] // self.patch_size[1])


@dataclass
class LayerOutput:
    """Everything one depth of one forward pass yields. Tensors are valid only during the callback.

    Attributes:
        depth: 0 = patch embedding, 1..L = block outputs.
        tokens: residual stream after the block, [B, T, C] with T = P + h·w.
        grid: spatial token grid (h, w); tokens[:, P:] are in row-major order over it.
        num_prefix_tokens: P.
        patch_size: pixels per token along (rows, cols).
        attn: attention probabilities [B, H, T, T] (None at depth 0 and for CNNs).
        head_outputs: per-head Ã·V [B, H, T, D], before the output projection.
        stream_in: residual stream entering the block [B, T, C].
        attn_branch: what the attention branch adds to the stream (layer scale applied) [B, T, C].
        mlp_branch: what the MLP branch adds to the stream [B, T, C].
    """

    depth: int
    tokens: Tensor
    grid: tuple[int, int]
    num_prefix_tokens: int
    patch_size: tuple[int, int]
    attn: Tensor | None = None
    head_outputs: Tensor | None = None
    stream_in: Tensor | None = None
    attn_branch: Tensor | None = None
    mlp_branch: Tensor | None = None

    @property
    def spatial_tokens(self) -> Tensor:
        """[B, N, C]: the tokens without prefix tokens."""
        return self.tokens[:, self.num_prefix_tokens :]

    @property
    def spatial_attn(self) -> Tensor | None:
        """[B, H, N, N]: attention without prefix rows/columns, rows renormalised to sum 1."""
        return None if self.attn is None else spatial_attention(self.attn, self.num_prefix_tokens)

    @property
    def spatial_head_outputs(self) -> Tensor | None:
        """[B, H, N, D]: per-head outputs of the spatial tokens."""
        if self.head_outputs is None:
            return None
        return self.head_outputs[:, :, self.num_prefix_tokens :]

    def stream_mid(self) -> Tensor | None:
        """Residual stream between the attention and MLP branches [B, T, C]."""
        if self.stream_in is None or self.attn_branch is None:
            return None
        return self.stream_in + self.attn_branch


def spatial_attention(attn: Tensor, num_prefix_tokens: int, eps: float = 1e-12) -> Tensor:
    """Drop prefix rows and columns from attention [..., T, T] and renormalise rows to sum 1."""
    spatial = attn[..., num_prefix_tokens:, num_prefix_tokens:]
    return spatial / spatial.sum(dim=-1, keepdim=True).clamp_min(eps)


OnLayer = Callable[[LayerOutput], None]


def is_vision_transformer(model: nn.Module) -> bool:
    blocks = getattr(model, "blocks", None)
    return isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) > 0 and hasattr(blocks[0], "attn")


def _first_tensor(args: tuple, kwargs: dict) -> Tensor:
    """The hidden states a block is called with, positionally or as ``x=``."""
    if args:
        return args[0]
    if "x" in kwargs:
        return kwargs["x"]
    raise RuntimeError("block called without hidden states")


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


class Capture:
    """Base: run one forward pass and hand every depth to ``on_layer``."""

    facts: ModelFacts

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def run(self, images: Tensor, on_layer: OnLayer, *, grad: bool = False) -> Tensor:
        raise NotImplementedError

    def collect(self, images: Tensor) -> list[LayerOutput]:
        """Run and keep every depth's output (detached clones). For tests and small inputs only."""
        kept: list[LayerOutput] = []

        def keep(layer: LayerOutput) -> None:
            cloned = {
                name: (value.detach().clone() if isinstance(value, Tensor) else value)
                for name, value in vars(layer).items()
            }
            kept.append(LayerOutput(**cloned))

        self.run(images, keep)
        return kept


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
        self.blocks: list[nn.Module] = list(model.blocks)
        self.facts = self._read_facts()

    def _read_facts(self) -> ModelFacts:
        model = self.model
        attn0 = self.blocks[0].attn
        num_heads = int(getattr(attn0, "num_heads"))
        embed_dim = int(getattr(model, "embed_dim", 0) or getattr(model, "num_features", 0)) or None
        has_cls = getattr(model, "cls_token", None) is not None
        if hasattr(model, "num_prefix_tokens"):
            prefix = int(model.num_prefix_tokens)
        else:
            prefix = int(has_cls) + int(getattr(model, "dist_token", None) is not None)
        patch = _pair(model.patch_embed.patch_size)
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
        saved: list[tuple[nn.Module, bool]] = []
        try:
            if self.attention:
                for block in self.blocks:
                    attn = block.attn
                    if hasattr(attn, "fused_attn"):
                        saved.append((attn, attn.fused_attn))
                        attn.fused_attn = False
            yield
        finally:
            for attn, value in saved:
                attn.fused_attn = value

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
            return LayerOutput(depth, tokens, grid, prefix, self.facts.patch_size, **extra)

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

    def _hook_block(self, block: nn.Module, depth: int, slot: dict[str, Tensor], on_layer: OnLayer,
                    make_layer: Callable[..., LayerOutput]) -> list:
        handles = []
        attn_module = block.attn
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
                extra.update(stream_in=stream_in, attn_branch=attn_branch,
                             mlp_branch=output - stream_in - attn_branch)
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
            # Ã·V for all heads is the input of the output projection (or of the optional norm before it).
            head_norm = getattr(attn_module, "norm", None)
            target = head_norm if isinstance(head_norm, nn.Module) else attn_module.proj
            handles.append(target.register_forward_pre_hook(heads_in))
        handles.append(block.register_forward_hook(block_out))
        return handles


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

    def run(self, images: Tensor, on_layer: OnLayer, *, grad: bool = False) -> Tensor:
        modules = dict(self.model.named_modules())
        handles = []

        def make_hook(depth: int, stride: int) -> Callable:
            def hook(_m: nn.Module, _args: tuple, output: Tensor) -> None:
                if output.ndim != 4:
                    raise RuntimeError(f"{self.module_names[depth - 1]} gave shape {tuple(output.shape)}, expected [B, C, H, W]")
                b, c, h, w = output.shape
                tokens = output.flatten(2).transpose(1, 2)
                on_layer(LayerOutput(depth, tokens, (h, w), 0, (stride, stride)))

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


def make_capture(model: nn.Module, **options: bool) -> Capture:
    """The right capture for ``model``: :class:`ViTCapture` for transformers, else :class:`FeatureCapture`."""
    if is_vision_transformer(model):
        return ViTCapture(model, **options)
    return FeatureCapture(model)
