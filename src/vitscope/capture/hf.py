"""Capture for Hugging Face ``transformers`` vision encoders built like a ViT (one forward pass, block by block).

Each supported family is described by an explicit :class:`HFLayout` (table :data:`LAYOUTS`): where its
blocks are, which module returns the attention probabilities, which linear layer is the output
projection of the attention (its input is the per-head A·V), which module is the MLP and where the
layer scales live. Nothing is guessed: a model whose encoder class is not in the table is a
``TypeError`` naming it and the supported ones.

Per block [B, T, C] (T = P prefix tokens + h·w spatial tokens, row-major) the capture takes:

- ``stream_in``: the block's input (forward pre-hook on the block); depth 0 is the first block's input,
  so pre-norm models (CLIP's ``pre_layrnorm``) give their normalised embeddings there;
- ``attn`` [B, H, T, T]: under eager attention the attention module returns ``(output, weights)`` and
  the block discards the weights; a forward hook reads them there, so the model never stacks the
  weights of all blocks (as ``output_attentions=True`` would) and each block's are released after its
  callback. Data2VecVision's self-attention returns them only under ``output_attentions``; its
  probabilities are read from the attention-dropout module instead (as timm's ``attn_drop``);
- ``head_outputs`` [B, H, T, D]: the input of the output projection (A·V, heads concatenated),
  reshaped. On the first batch the capture reads the values [B, H, T, D] off the value projection and
  refuses a block whose probabilities are not one softmax map per head (rows >= 0 summing to 1) whose
  product with the values is the per-head output;
- ``attn_branch`` / ``mlp_branch`` [B, T, C]: the attention module's / MLP's output times the block's
  layer scale (Dinov2 ``layer_scale1/2``, BEiT and Data2Vec ``lambda_1/2``); dropout and drop path
  are identities in eval mode. On the first batch the capture checks stream in + both branches =
  block output.

Attention is switched to eager while capturing (``set_attn_implementation("eager")``; Data2VecVision's
SDPA self-attention class is swapped for its eager base class) and restored afterwards, as are the
hooks, also when the forward raises. ViTMAE runs unmasked and in grid order: ``mask_ratio`` is 0 while
capturing and the capture passes ``noise = arange(N)``, whose argsort is the identity (the embeddings
shuffle tokens by argsort(noise) even at ratio 0).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from vitscope.capture.blocks import VERIFY_IMAGES, BlockCapture, UnsupportedModelError
from vitscope.capture.layer import ModelFacts, OnLayer, pair

__all__ = ["HFCapture", "HFLayout", "LAYOUTS", "REFUSED", "find_layout", "supported_classes"]

_DINO_SCALES = ("layer_scale1.lambda1", "layer_scale2.lambda1")
_BEIT_SCALES = ("lambda_1", "lambda_2")


@dataclass(frozen=True)
class HFLayout:
    """Where one family keeps its parts. Paths are dotted attribute paths; block paths are relative to a block.

    Attributes:
        family: a short name (the config's ``model_type``).
        classes: encoder class names this layout describes.
        blocks: the ``nn.ModuleList`` of blocks, relative to the encoder.
        attention: the attention module; its output (or its output[0]) is the attention branch before
            the layer scale.
        probs: the module whose output holds the attention probabilities [B, H, T, T] ...
        probs_index: ... at this index of its output tuple (None: the output itself).
        out_proj: the attention's output projection; its input is A·V, heads concatenated [B, T, H·D].
        v_proj: the value projection; its output is V, heads concatenated [B, T, H·D].
        mlp: the MLP (or its last part); its output is the MLP branch before the layer scale.
        scales: attention and MLP layer scales (a parameter [C], a float or None), or None without.
        class_token: whether token 0 is a class token.
        prefix_tokens: prefix tokens before the grid besides those named in ``prefix_config``.
        prefix_config: a config attribute that adds prefix tokens (register tokens).
        eager_class_at: a module (relative to a block) whose SDPA class is swapped for its eager base
            class while capturing (families that pick the attention class at construction).
        unmasked: ViTMAE: run with mask ratio 0 and identity noise, so that tokens stay in grid order.
    """

    family: str
    classes: tuple[str, ...]
    blocks: str
    attention: str = "attention"
    probs: str = "attention"
    probs_index: int | None = 1
    out_proj: str = "attention.o_proj"
    v_proj: str = "attention.v_proj"
    mlp: str = "mlp"
    scales: tuple[str | None, str | None] = (None, None)
    class_token: bool = True
    prefix_tokens: int = 1
    prefix_config: str | None = None
    eager_class_at: str | None = None
    unmasked: bool = False

    def num_prefix_tokens(self, config: Any) -> int:
        extra = int(getattr(config, self.prefix_config, 0) or 0) if self.prefix_config else 0
        return self.prefix_tokens + extra


LAYOUTS: tuple[HFLayout, ...] = (
    HFLayout("vit", ("ViTModel",), "layers"),
    HFLayout("deit", ("DeiTModel",), "layers", prefix_tokens=2),  # class + distillation token
    HFLayout("vit_mae", ("ViTMAEModel",), "layers", unmasked=True),
    HFLayout("vit_msn", ("ViTMSNModel",), "layers"),
    HFLayout("ijepa", ("IJepaModel",), "layers", class_token=False, prefix_tokens=0),
    HFLayout("dinov2", ("Dinov2Model",), "encoder.layer", scales=_DINO_SCALES),
    HFLayout(
        "dinov2_with_registers",
        ("Dinov2WithRegistersModel",),
        "encoder.layer",
        scales=_DINO_SCALES,
        prefix_config="num_register_tokens",
    ),
    HFLayout(
        "dinov3_vit", ("DINOv3ViTModel",), "model.layer", scales=_DINO_SCALES, prefix_config="num_register_tokens"
    ),
    HFLayout("beit", ("BeitModel",), "layers", scales=_BEIT_SCALES),
    HFLayout(
        "data2vec-vision",
        ("Data2VecVisionModel",),
        "encoder.layer",
        probs="attention.attention.dropout",
        probs_index=None,
        out_proj="attention.output.dense",
        v_proj="attention.attention.value",
        mlp="output",
        scales=_BEIT_SCALES,
        eager_class_at="attention.attention",
    ),
    HFLayout(
        "clip",
        ("CLIPVisionModel",),
        "encoder.layers",
        "self_attn",
        "self_attn",
        out_proj="self_attn.out_proj",
        v_proj="self_attn.v_proj",
    ),
    HFLayout(
        "siglip",
        ("SiglipVisionModel",),
        "encoder.layers",
        "self_attn",
        "self_attn",
        out_proj="self_attn.out_proj",
        v_proj="self_attn.v_proj",
        class_token=False,
        prefix_tokens=0,
    ),
)


# Encoders vitscope knows and cannot capture, with the reason.
REFUSED = {
    "Siglip2VisionModel": "it takes variable-resolution patch sequences (pixel_values [B, N, 3·P·P] with "
    "spatial_shapes and a patch mask), not images on a fixed grid, so vitscope cannot feed or capture it; use a "
    "SigLIP 2 tower from OpenCLIP (open_clip:ViT-B-16-SigLIP2) or timm, which take images",
}


def supported_classes() -> tuple[str, ...]:
    """Every encoder class name :class:`HFCapture` knows."""
    return tuple(name for layout in LAYOUTS for name in layout.classes)


def find_layout(model: nn.Module) -> tuple[nn.Module, HFLayout]:
    """The encoder inside ``model`` (itself, its ``base_model`` or its ``vision_model``) and its layout.

    Raises:
        UnsupportedModelError: an encoder in :data:`REFUSED`, with the reason.
        TypeError: no known encoder class, naming the class and the supported ones.
    """
    candidates = (model, getattr(model, "base_model", None), getattr(model, "vision_model", None))
    for candidate in candidates:
        if isinstance(candidate, nn.Module):
            reason = REFUSED.get(type(candidate).__name__)
            if reason is not None:
                raise UnsupportedModelError(f"{type(candidate).__name__}: {reason}")
            for layout in LAYOUTS:
                if type(candidate).__name__ in layout.classes:
                    return candidate, layout
    raise TypeError(
        f"{type(model).__name__} ({type(model).__module__}) is not a transformers vision encoder vitscope knows; "
        f"supported: {', '.join(supported_classes())} (or a model wrapping one as its base_model / vision_model)"
    )


def _module_at(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def _attribute_at(root: nn.Module, path: str) -> Any:
    value: Any = root
    for name in path.split("."):
        value = getattr(value, name, None)
    return value


def _first(output: Any) -> Tensor:
    """A module's main output: the tensor itself or element 0 of its tuple."""
    return cast(Tensor, output[0] if isinstance(output, (tuple, list)) else output)


def _hidden_states(args: tuple, kwargs: dict) -> Tensor:
    """The hidden states a block is called with, positionally or as ``hidden_states=``."""
    if args:
        return cast(Tensor, args[0])
    if "hidden_states" in kwargs:
        return cast(Tensor, kwargs["hidden_states"])
    raise RuntimeError("block called without hidden states")


def _scaled(x: Tensor, scale: Any) -> Tensor:
    """``x`` times a layer scale [C] (a parameter, a float, or None for none)."""
    if scale is None or (isinstance(scale, float) and scale == 1.0):
        return x
    return x * scale


class HFCapture(BlockCapture):
    """Capture for ``transformers`` ViT-style vision encoders (see the module docstring and :data:`LAYOUTS`).

    Args:
        model: the encoder (``ViTModel``, ``CLIPVisionModel``...) or a model wrapping one
            (``ViTForImageClassification``).
        attention: capture attention probabilities [B, H, T, T] and per-head outputs [B, H, T, D].
        branches: capture the block input and both residual branches [B, T, C].
    """

    def __init__(self, model: nn.Module, *, attention: bool = True, branches: bool = True) -> None:
        super().__init__(model)
        self.encoder, self.layout = find_layout(model)
        self.config: Any = self.encoder.config  # the encoder's PretrainedConfig
        self.blocks: list[nn.Module] = list(cast(nn.ModuleList, _module_at(self.encoder, self.layout.blocks)))
        self.attention = attention
        self.branches = branches
        self._verified = False
        self.facts = self._read_facts()

    def _read_facts(self) -> ModelFacts:
        config = self.config
        return ModelFacts(
            kind="vit",
            num_layers=len(self.blocks),
            num_heads=int(config.num_attention_heads),
            embed_dim=int(config.hidden_size),
            num_prefix_tokens=self.layout.num_prefix_tokens(config),
            patch_size=pair(config.patch_size),
            has_class_token=self.layout.class_token,
            layer_names=tuple(name for name, m in self.model.named_modules() if any(m is b for b in self.blocks)),
        )

    def run(self, images: Tensor, on_layer: OnLayer, *, grad: bool = False) -> Any:
        """One forward pass of ``images`` [B, 3, H, W]; ``on_layer`` sees depths 0..L in order.

        Returns the model's own output (a ``ModelOutput``), as a plain forward gives it.
        """
        image_hw = (int(images.shape[-2]), int(images.shape[-1]))
        slot: dict[str, Tensor] = {}
        handles = self._hooks(image_hw, slot, on_layer)
        with self.hooked_pass(handles, slot, grad=grad), ExitStack() as stack:
            if self.attention:
                stack.enter_context(self._eager_attention())
            kwargs = stack.enter_context(self._unmasked(images)) if self.layout.unmasked else {}
            return self.model(images, **kwargs)

    # -- switches, always restored -------------------------------------------------------------------

    @contextmanager
    def _eager_attention(self) -> Iterator[None]:
        """Eager attention while capturing (the probabilities exist only there); the previous one restored."""
        swapped: list[tuple[nn.Module, type]] = []
        saved = getattr(self.config, "_attn_implementation", None)
        switch = self.layout.eager_class_at is None and saved not in (None, "eager")
        try:
            if switch:
                cast(Any, self.encoder).set_attn_implementation("eager")
            if self.layout.eager_class_at is not None:
                for block in self.blocks:
                    module = _module_at(block, self.layout.eager_class_at)
                    eager = _eager_base(type(module))
                    if eager is not type(module):
                        swapped.append((module, type(module)))
                        module.__class__ = eager
            yield
        finally:
            for module, cls in swapped:
                module.__class__ = cls
            if switch:
                cast(Any, self.encoder).set_attn_implementation(saved)

    @contextmanager
    def _unmasked(self, images: Tensor) -> Iterator[dict[str, Tensor]]:
        """ViTMAE: mask ratio 0 and noise [B, N] = 0..N-1, so every token stays, in grid order."""
        config = self.config
        saved = config.mask_ratio
        h, w = self.facts.grid_for((int(images.shape[-2]), int(images.shape[-1])))
        noise = torch.arange(h * w, device=images.device, dtype=torch.float32).expand(images.shape[0], -1)
        try:
            config.mask_ratio = 0.0
            yield {"noise": noise}
        finally:
            config.mask_ratio = saved

    # -- hooks -----------------------------------------------------------------------------------------

    def _hooks(
        self, image_hw: tuple[int, int], slot: dict[str, Tensor], on_layer: OnLayer
    ) -> list[torch.utils.hooks.RemovableHandle]:
        def first_input(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            on_layer(self.token_layer(0, _hidden_states(args, kwargs), image_hw, {}))

        handles = [self.blocks[0].register_forward_pre_hook(first_input, with_kwargs=True)]
        try:
            for depth, block in enumerate(self.blocks, start=1):
                handles.extend(self._hook_block(block, depth, image_hw, slot, on_layer))
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        return handles

    def _hook_block(
        self, block: nn.Module, depth: int, image_hw: tuple[int, int], slot: dict[str, Tensor], on_layer: OnLayer
    ) -> list[torch.utils.hooks.RemovableHandle]:
        layout = self.layout
        handles = []
        if self.attention:
            handles.append(_module_at(block, layout.probs).register_forward_hook(self._probs_hook(depth, slot)))
            handles.append(_module_at(block, layout.out_proj).register_forward_pre_hook(self._heads_hook(slot)))
            if not self._verified:
                handles.append(_module_at(block, layout.v_proj).register_forward_hook(self._values_hook(slot)))
        if self.branches:
            attn_scale, mlp_scale = (_attribute_at(block, path) if path else None for path in layout.scales)
            handles.append(block.register_forward_pre_hook(_keep_input(slot), with_kwargs=True))
            handles.append(
                _module_at(block, layout.attention).register_forward_hook(_keep(slot, "attn_branch", attn_scale))
            )
            handles.append(_module_at(block, layout.mlp).register_forward_hook(_keep(slot, "mlp_branch", mlp_scale)))

        def block_out(_m: nn.Module, _args: tuple, output: Any) -> None:
            tokens = _first(output)
            extra = {name: slot.pop(name, None) for name in ("attn", "head_outputs")}
            if self.attention and not self._verified:  # the model is checked, on its first images
                heads, keep = cast(int, self.facts.num_heads), VERIFY_IMAGES
                read = (extra["attn"], extra["head_outputs"], slot.pop("values", None))
                attn, head_outputs, values = (None if t is None else t[:keep] for t in read)
                self.check_attention(depth, attn, head_outputs, values, heads)
            if self.branches:
                extra.update(self._branches(depth, slot, tokens))
            slot.clear()
            layer = self.token_layer(depth, tokens, image_hw, extra)
            del extra
            on_layer(layer)

        handles.append(block.register_forward_hook(block_out))
        return handles

    def _probs_hook(self, depth: int, slot: dict[str, Tensor]) -> Callable[[nn.Module, tuple, Any], None]:
        index = self.layout.probs_index

        def keep(_m: nn.Module, _args: tuple, output: Any) -> None:
            probs = output if index is None else output[index]
            if probs is None:
                raise UnsupportedModelError(
                    f"{type(self.encoder).__name__} (block {depth}): the attention module returned no probabilities; "
                    f"its attention implementation ({getattr(self.config, '_attn_implementation', '?')}) "
                    "is not eager. Load it with attn_implementation='eager' or capture with attention=False"
                )
            slot["attn"] = probs

        return keep

    def _values_hook(self, slot: dict[str, Tensor]) -> Callable[[nn.Module, tuple, Tensor], None]:
        heads = cast(int, self.facts.num_heads)

        def keep(_m: nn.Module, _args: tuple, output: Tensor) -> None:
            slot["values"] = output.reshape(output.shape[0], output.shape[1], heads, -1).transpose(1, 2)

        return keep

    def _heads_hook(self, slot: dict[str, Tensor]) -> Callable[[nn.Module, tuple], None]:
        heads = cast(int, self.facts.num_heads)

        def keep(_m: nn.Module, args: tuple) -> None:
            x = args[0]  # [B, T, H·D], heads concatenated
            slot["head_outputs"] = x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

        return keep

    # -- layer outputs ---------------------------------------------------------------------------------

    def _branches(self, depth: int, slot: dict[str, Tensor], output: Tensor) -> dict[str, Tensor | None]:
        """Stream in, attention branch and MLP branch [B, T, C], their sum checked on the first batch."""
        stream_in, attn_branch, mlp_branch = slot.get("stream_in"), slot.get("attn_branch"), slot.get("mlp_branch")
        if stream_in is None or attn_branch is None or mlp_branch is None:
            return {}
        self.check_branches(depth, stream_in, attn_branch, mlp_branch, output, what=f"the {self.layout.family}")
        return {"stream_in": stream_in, "attn_branch": attn_branch, "mlp_branch": mlp_branch}


def _eager_base(cls: type) -> type:
    """The eager class an SDPA attention subclass derives from (``XSdpaSelfAttention`` -> ``XSelfAttention``)."""
    if "Sdpa" not in cls.__name__:
        return cls
    base = cls.__mro__[1]
    if base.__name__ != cls.__name__.replace("Sdpa", ""):
        raise UnsupportedModelError(f"{cls.__name__}: no eager attention class to switch to")
    return base


def _keep_input(slot: dict[str, Tensor]) -> Callable[[nn.Module, tuple, dict], None]:
    def keep(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        slot["stream_in"] = _hidden_states(args, kwargs)

    return keep


def _keep(slot: dict[str, Tensor], name: str, scale: Any) -> Callable[[nn.Module, tuple, Any], None]:
    """Forward hook keeping a branch's output [B, T, C] times its layer scale."""

    def keep(_m: nn.Module, _args: tuple, output: Any) -> None:
        slot[name] = _scaled(_first(output), scale)

    return keep
