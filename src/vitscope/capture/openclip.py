"""Capture for OpenCLIP visual towers: ``open_clip.transformer.VisionTransformer`` (and timm towers).

An OpenCLIP ViT tower embeds the image (``conv1`` patches, class token, position embedding, patch
dropout, ``ln_pre``) and runs ``transformer.resblocks[i]``, each a ``ResidualAttentionBlock``::

    x = x + ls_1(attn(ln_1(x)))        # attn: torch nn.MultiheadAttention
    x = x + ls_2(mlp(ln_2(x)))

then pools (class token, mean, or an attentional pooler) and projects. Per block the capture takes:

- tokens: the block's output; depth 0 is the first block's input (everything before the blocks
  applied). Older open_clip versions run the blocks sequence-first ([T, B, C], the attention module's
  ``batch_first`` is False); the capture reads the layout off each block's attention module and always
  hands out batch-first tensors [B, T, C].
- attention probabilities [B, H, T, T]: open_clip calls its ``nn.MultiheadAttention`` with
  ``need_weights=False``, so while capturing a forward pre-hook on that module rewrites the call to
  ``need_weights=True, average_attn_weights=False`` and a forward hook keeps the per-head weights
  torch returns (fast path or not). Hooks, not patches: removing them, also when the forward raises,
  restores the module exactly. The attention output itself is what torch computes either way.
- per-head outputs A·V [B, H, T, D]: torch never calls ``out_proj`` as a module (it applies its weights
  functionally), so they are computed from the returned probabilities and the module's own value
  projection of its value input. On the first batch the capture checks that ``out_proj`` of the
  concatenated heads reproduces the attention output, and refuses the module if it does not.
- residual branches: the outputs of ``ls_1`` and ``ls_2`` (the layer scales, ``nn.Identity`` without
  layer scale), i.e. the attention output and the MLP output with layer scale applied, exactly what
  the block adds to its stream; no subtraction. On the first batch the capture checks stream in +
  attention branch + MLP branch = block output.

The attentional pooler of CoCa-style towers (``attn_pool``) runs after the blocks on learned queries,
not on the token grid: it is left alone (not a depth). The towers in open_clip have one prefix token
(the class token); a tower declaring ``num_prefix_tokens`` (registers) is taken at its word, and the
token count is checked on every depth. Towers built on timm (``TimmModel``, e.g. SigLIP configs) are
captured by :class:`ViTCapture` on their ``trunk`` while the whole tower runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, SupportsInt, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitscope.capture.blocks import BlockCapture, UnsupportedModelError
from vitscope.capture.layer import Capture, ModelFacts, OnLayer, pair
from vitscope.capture.vit import ViTCapture, is_vision_transformer

__all__ = ["OpenCLIPCapture", "openclip_blocks"]

_Slot = dict[str, Tensor]
_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights")


def openclip_blocks(model: nn.Module) -> list[nn.Module]:
    """``model.transformer.resblocks`` as a list; an :class:`UnsupportedModelError` saying why not."""
    name = f"{type(model).__module__}.{type(model).__name__}"
    if isinstance(getattr(model, "visual", None), nn.Module):
        raise UnsupportedModelError(
            f"{name} is a whole OpenCLIP model; capture its visual tower (model.visual), which is what "
            "load_model('open_clip:ARCH?pretrained=FILE') returns"
        )
    blocks = getattr(getattr(model, "transformer", None), "resblocks", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks) and all(hasattr(b, "attn") for b in blocks):
        return list(blocks)
    raise UnsupportedModelError(
        f"{name}: vitscope captures OpenCLIP ViT towers (transformer.resblocks[i]) and timm ViT towers; this "
        "tower has no transformer blocks (a ModifiedResNet / CNN tower has no tokens or attention to analyse)"
    )


def _timm_delegate(model: nn.Module, attention: bool, branches: bool) -> Capture | None:
    """A :class:`ViTCapture` on a ``TimmModel`` tower's trunk that runs the whole tower; None otherwise."""
    trunk = getattr(model, "trunk", None)
    if type(model).__name__ != "TimmModel" or not isinstance(trunk, nn.Module):
        return None
    if not is_vision_transformer(trunk):
        raise UnsupportedModelError(
            f"OpenCLIP timm tower {type(trunk).__name__}: vitscope captures timm transformer trunks only"
        )
    delegate = ViTCapture(trunk, attention=attention, branches=branches)
    delegate.model = model  # hooks sit on the trunk's blocks; run() returns the tower's output
    return delegate


def _check_attention(blocks: list[nn.Module]) -> None:
    for depth, block in enumerate(blocks, start=1):
        attn = block.attn
        if not isinstance(attn, nn.MultiheadAttention):
            raise UnsupportedModelError(
                f"{type(block).__name__} (block {depth}) uses open_clip's custom {type(attn).__name__} "
                "(qk-norm / scaled-cosine / head-scale options), whose probabilities vitscope does not read; "
                "capture with attention=False (tokens, branches, CKA and probes still work)"
            )
        if attn.bias_k is not None or attn.add_zero_attn:
            raise UnsupportedModelError(
                f"block {depth}: nn.MultiheadAttention with bias_k/add_zero_attn attends to keys that are not "
                "tokens; capture with attention=False"
            )


def _check_branches(blocks: list[nn.Module]) -> None:
    for depth, block in enumerate(blocks, start=1):
        for name in ("ls_1", "ls_2"):
            if not isinstance(getattr(block, name, None), nn.Module):
                raise UnsupportedModelError(
                    f"{type(block).__name__} (block {depth}) has no {name}: its residual branches cannot be read "
                    "(open_clip >= 2.7 has them; or capture with branches=False)"
                )


_HINT = " (is patch dropout active? call model.eval())"


def _batch_first(block: nn.Module) -> bool:
    """Whether the block works on [B, T, C] (True) or [T, B, C]: its attention module says."""
    return bool(getattr(block.attn, "batch_first", True))


def _hidden(args: tuple, kwargs: dict) -> Tensor:
    """The hidden states a block is called with, positionally or by name."""
    if args:
        return args[0]
    for name in ("q_x", "x"):
        if name in kwargs:
            return kwargs[name]
    raise RuntimeError("OpenCLIP block called without hidden states")


def _close(found: Tensor, expected: Tensor) -> tuple[bool, float]:
    """Whether two tensors agree to float tolerance, relative to ``expected``'s scale; the max error."""
    found, expected = found.detach().float(), expected.detach().float()
    error = (found - expected).abs().max()
    scale = expected.abs().max().clamp_min(1e-6)
    return bool(error <= 1e-4 * scale + 1e-5), float(error)


def value_projection(attn: nn.MultiheadAttention, value: Tensor) -> Tensor:
    """The module's value projection of its value input [B, S, C]: [B, H, S, D]."""
    embed = attn.embed_dim
    if attn._qkv_same_embed_dim:
        weight = cast(Tensor, attn.in_proj_weight)[2 * embed :]
    else:
        weight = cast(Tensor, attn.v_proj_weight)
    bias = attn.in_proj_bias[2 * embed :] if attn.in_proj_bias is not None else None
    v = F.linear(value, weight, bias)
    return v.reshape(v.shape[0], v.shape[1], attn.num_heads, embed // attn.num_heads).transpose(1, 2)


class OpenCLIPCapture(BlockCapture):
    """Capture for an OpenCLIP visual tower (see the module docstring).

    Args:
        model: ``model.visual`` of an OpenCLIP model (what ``load_model("open_clip:...")`` returns).
        attention: capture attention probabilities [B, H, T, T] and per-head outputs [B, H, T, D].
        branches: capture the stream entering each block and both residual branches [B, T, C].
    """

    def __init__(self, model: nn.Module, *, attention: bool = True, branches: bool = True) -> None:
        super().__init__(model)
        self.attention = attention
        self.branches = branches
        self._verified = False
        self._delegate = _timm_delegate(model, attention, branches)
        if self._delegate is not None:
            self.blocks: list[nn.Module] = []
            self.facts = self._delegate.facts
            return
        self.blocks = openclip_blocks(model)
        if attention:
            _check_attention(self.blocks)
        if branches:
            _check_branches(self.blocks)
        self.facts = self._read_facts()

    def _read_facts(self) -> ModelFacts:
        model, attn = self.model, cast(nn.Module, self.blocks[0].attn)
        conv = getattr(model, "conv1", None)
        patch = getattr(model, "patch_size", None) or (conv.kernel_size if isinstance(conv, nn.Conv2d) else None)
        if patch is None:
            raise UnsupportedModelError(f"{type(model).__name__}: no patch_size or conv1 to read the patch size from")
        embed_dim = getattr(attn, "embed_dim", None) or getattr(model.transformer, "width", None)
        prefix = int(getattr(model, "num_prefix_tokens", 1))
        names = {id(module): name for name, module in model.named_modules()}
        return ModelFacts(
            kind="vit",
            num_layers=len(self.blocks),
            num_heads=int(cast(SupportsInt, attn.num_heads)),
            embed_dim=int(embed_dim) if embed_dim else None,
            num_prefix_tokens=prefix,
            patch_size=pair(cast("int | tuple[int, int]", tuple(patch))),
            has_class_token=getattr(model, "class_embedding", None) is not None,
            layer_names=tuple(names[id(block)] for block in self.blocks),
        )

    def run(self, images: Tensor, on_layer: OnLayer, *, grad: bool = False) -> Tensor:
        """One forward pass of the tower; ``on_layer`` sees depths 0..L in order. Returns the tower's output
        (the pooled, projected embedding [B, E], or what the tower returns), as a plain forward does."""
        if self._delegate is not None:
            return self._delegate.run(images, on_layer, grad=grad)
        image_hw = (int(images.shape[-2]), int(images.shape[-1]))
        handles: list[torch.utils.hooks.RemovableHandle] = []
        slot: _Slot = {}
        transformer = cast(nn.Module, self.model.transformer)
        checkpointing = getattr(transformer, "grad_checkpointing", None)
        with self.hooked_pass(handles, slot, grad=grad):
            if checkpointing:  # recomputation in backward would call the hooks (and on_layer) again
                setattr(transformer, "grad_checkpointing", False)  # noqa: B010  (a plain attribute)
            try:
                first = self.blocks[0]

                def on_first_input(_m: nn.Module, args: tuple, kwargs: dict) -> None:
                    tokens = self._tokens(first, _hidden(args, kwargs))
                    on_layer(self.token_layer(0, tokens, image_hw, {}, hint=_HINT))

                handles.append(first.register_forward_pre_hook(on_first_input, with_kwargs=True))
                for depth, block in enumerate(self.blocks, start=1):
                    handles.extend(self._hook_block(block, depth, slot, on_layer, image_hw))
                return self.model(images)
            finally:
                if checkpointing:
                    setattr(transformer, "grad_checkpointing", checkpointing)  # noqa: B010

    @staticmethod
    def _tokens(block: nn.Module, x: Tensor) -> Tensor:
        """A block's tensor as batch-first tokens [B, T, C] (a view; [T, B, C] in sequence-first towers)."""
        return x if _batch_first(block) else x.transpose(0, 1)

    def _hook_block(
        self, block: nn.Module, depth: int, slot: _Slot, on_layer: OnLayer, image_hw: tuple[int, int]
    ) -> list[torch.utils.hooks.RemovableHandle]:
        """Register this block's hooks; the block's forward hook hands its LayerOutput to ``on_layer``."""
        handles = []

        def keep(name: str) -> Callable[[nn.Module, tuple, Tensor], None]:
            def hook(_m: nn.Module, _args: tuple, output: Tensor) -> None:
                slot[name] = self._tokens(block, output)

            return hook

        def stream_in(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            slot["stream_in"] = self._tokens(block, _hidden(args, kwargs))

        def block_out(_m: nn.Module, _args: tuple, output: Tensor) -> None:
            tokens = self._tokens(block, output)
            extra: _Slot = {name: slot.pop(name) for name in ("attn", "head_outputs") if name in slot}
            if self.branches:
                extra.update(self._branches(depth, slot, tokens))
            slot.clear()
            layer = self.token_layer(depth, tokens, image_hw, extra, hint=_HINT)
            del extra
            on_layer(layer)

        if self.branches:
            handles.append(block.register_forward_pre_hook(stream_in, with_kwargs=True))
            handles.append(cast(nn.Module, block.ls_1).register_forward_hook(keep("attn_branch")))
            handles.append(cast(nn.Module, block.ls_2).register_forward_hook(keep("mlp_branch")))
        if self.attention:
            handles.extend(self._hook_attention(block, depth, slot))
        handles.append(block.register_forward_hook(block_out))
        return handles

    def _hook_attention(self, block: nn.Module, depth: int, slot: _Slot) -> list[torch.utils.hooks.RemovableHandle]:
        """Make the block's nn.MultiheadAttention return per-head probabilities; keep them and A·V."""
        attn = cast(nn.MultiheadAttention, block.attn)

        def ask_for_weights(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict[str, Any]]:
            named = {**dict(zip(_MHA_ARGS[3:], args[3:])), **kwargs}
            return args[:3], {**named, "need_weights": True, "average_attn_weights": False}

        def keep_weights(_m: nn.Module, args: tuple, kwargs: dict, output: tuple[Tensor, Tensor | None]) -> None:
            attn_out, weights = output
            if weights is None or weights.ndim != 4:
                raise UnsupportedModelError(f"block {depth}: nn.MultiheadAttention gave no per-head weights")
            value = args[2] if len(args) > 2 else kwargs["value"]
            heads = weights @ value_projection(attn, self._tokens(block, value)).to(weights.dtype)
            if not self._verified:
                self._check_heads(depth, attn, heads, self._tokens(block, attn_out))
            slot["attn"], slot["head_outputs"] = weights, heads

        return [
            attn.register_forward_pre_hook(ask_for_weights, with_kwargs=True),
            attn.register_forward_hook(keep_weights, with_kwargs=True),
        ]

    def _check_heads(self, depth: int, attn: nn.MultiheadAttention, heads: Tensor, attn_out: Tensor) -> None:
        """out_proj of the concatenated per-head outputs [B, H, T, D] must give the attention output [B, T, C]."""
        with torch.no_grad():
            merged = heads.transpose(1, 2).flatten(2).to(attn.out_proj.weight.dtype)
            ok, error = _close(F.linear(merged, attn.out_proj.weight, attn.out_proj.bias), attn_out)
        if not ok:
            raise UnsupportedModelError(
                f"block {depth}: out_proj of the per-head outputs A·V differs from the attention output by "
                f"{error:.3g}; this nn.MultiheadAttention is not plain softmax attention (capture with attention=False)"
            )

    def _branches(self, depth: int, slot: _Slot, output: Tensor) -> _Slot:
        """stream in, attention branch and MLP branch [B, T, C], checked against the output on the first batch."""
        parts = {name: slot.get(name) for name in ("stream_in", "attn_branch", "mlp_branch")}
        present = {name: value for name, value in parts.items() if value is not None}
        if len(present) < 3:
            return {}
        self.check_branches(depth, present["stream_in"], present["attn_branch"], present["mlp_branch"], output)
        return present
