"""What every transformer capture shares: building a depth's :class:`LayerOutput` from its tokens, checked
against the grid; the check that the attention read from a block is one softmax map per head whose product
with the values gives the head outputs; and the check that the residual branches add up to the block output."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from vitscope.capture.layer import Capture, LayerOutput

__all__ = [
    "BlockCapture",
    "UnsupportedModelError",
    "VERIFY_IMAGES",
    "attention_problem",
    "first_images",
    "first_tensor",
]

Extra = Mapping[str, Tensor | None]  # the optional tensors of a LayerOutput, by field name


class UnsupportedModelError(ValueError, TypeError):
    """vitscope cannot analyse (this part of) this architecture; the message says what and why, in one sentence.

    A ValueError, so that the CLI reports it as bad input (one line, exit code 2); also a TypeError, as the
    model's type is what does not fit.
    """


_WITHOUT_ATTENTION = "capture with attention=False (token metrics, CKA and probes still work)"


def attention_problem(attn: Tensor | None, heads: Tensor | None, values: Tensor | None, num_heads: int) -> str:
    """What keeps ``attn`` from being softmax attention the metrics can use, or "" when nothing does.

    Args:
        attn: what the block's attention read gave: must be [B', H, T, T] with ``H = num_heads``, entries >= 0 and
            rows summing to 1 (B' = B, or B·W for windowed attention).
        heads: the per-head outputs read before the output projection [B', H, T, D].
        values: what the module multiplies its attention map with, [B', H, T, D]: ``heads`` must equal
            ``attn @ values``.
    """
    if attn is None:
        return "its attention module gave no probabilities (fused or custom attention)"
    if attn.ndim != 4 or attn.shape[1] != num_heads or attn.shape[-1] != attn.shape[-2]:
        return f"its attention read has shape {tuple(attn.shape)}, not one [T, T] map for each of its {num_heads} heads"
    tol = max(1e-4, 8 * torch.finfo(attn.dtype).eps)  # a float32 softmax's rounding, or a bfloat16 one's
    probs = attn.detach().float()
    rows = probs.sum(-1)
    if float(probs.min()) < -1e-6 or float((rows - 1).abs().max()) > tol:
        return (
            f"its attention rows sum to {float(rows.min()):.3g}..{float(rows.max()):.3g} with smallest entry "
            f"{float(probs.min()):.3g}, not to 1 over non-negative weights"
        )
    if heads is None or values is None:
        return "its per-head outputs or values could not be read"
    if heads.shape != values.shape or heads.shape[:3] != attn.shape[:3]:
        return (
            f"its per-head outputs {tuple(heads.shape)} and values {tuple(values.shape)} do not fit its attention "
            f"{tuple(attn.shape)}"
        )
    expected = probs @ values.detach().float()
    error = float((heads.detach().float() - expected).abs().max())
    if error > tol * float(expected.abs().max()) + 1e-5:
        return f"its per-head outputs differ from attention x values by {error:.3g}"
    return ""


VERIFY_IMAGES = 2
"""Images of the first batch on which a block's attention and residual layout are checked (the check is of the
model, so a few images show it; all 64 of a batch cost ~20 % of a short run's time for ViT-S/16)."""


def first_images(args: tuple, kwargs: dict, images: int, keep: int = VERIFY_IMAGES) -> tuple[tuple, dict, int]:
    """A module's inputs cut to those of the first ``keep`` of ``images`` images, and how many rows that is.

    The first input is [B', ...] with B' = B·W rows (W windows or heads per image: Swin, SAM); every tensor
    input with the same first dimension is cut alike, the rest (a window mask) is kept whole.
    """
    total = int(first_tensor(args, kwargs).shape[0])
    if images <= keep or total % images:
        return args, kwargs, total
    rows = total // images * keep

    def cut(value: Any) -> Any:
        return value[:rows] if isinstance(value, Tensor) and value.ndim and value.shape[0] == total else value

    return tuple(cut(a) for a in args), {key: cut(v) for key, v in kwargs.items()}, rows


def first_tensor(args: tuple, kwargs: dict) -> Tensor:
    """The hidden states a block (or its attention) is called with, positionally or as ``x=``."""
    if args:
        return args[0]
    if "x" in kwargs:
        return kwargs["x"]
    raise RuntimeError("block called without hidden states")


class BlockCapture(Capture):
    """Base of the captures that hook transformer blocks (timm, Hugging Face, OpenCLIP).

    Subclasses set ``facts`` and ``blocks``, run their forward inside :meth:`hooked_pass` and call
    :meth:`token_layer` and :meth:`check_branches` from their hooks; ``_verified`` turns true after the
    first complete pass.
    """

    blocks: list[nn.Module]
    _verified: bool = False

    @contextmanager
    def hooked_pass(
        self, handles: list[RemovableHandle], slot: MutableMapping[str, Any], *, grad: bool
    ) -> Iterator[None]:
        """The body runs the forward pass under ``torch.no_grad()`` (``enable_grad()`` when ``grad``).

        After a complete pass ``_verified`` turns true (branch checks stop); whatever happens, every hook
        in ``handles`` (also those registered inside the body) is removed and ``slot``, what the hooks
        hand to one another, is emptied.
        """
        try:
            with torch.enable_grad() if grad else torch.no_grad():
                yield
            self._verified = True
        finally:
            for handle in handles:
                handle.remove()
            slot.clear()

    def token_layer(
        self,
        depth: int,
        tokens: Tensor,
        image_hw: tuple[int, int],
        extra: Extra,
        *,
        window: tuple[int, int] | None = None,
        hint: str = "",
    ) -> LayerOutput:
        """A depth's LayerOutput from tokens [B, T, C], T checked against prefix + grid for ``image_hw``."""
        facts = self.facts
        grid, prefix = facts.grid_for(image_hw), facts.num_prefix_tokens
        expected = prefix + grid[0] * grid[1]
        if tokens.ndim != 3 or tokens.shape[1] != expected:
            raise RuntimeError(
                f"{type(self.model).__name__} block {depth}: hidden states of shape {tuple(tokens.shape)}, expected "
                f"[B, {expected}, C] ({prefix} prefix + {grid[0]}x{grid[1]} grid) for input {image_hw}{hint}"
            )
        return LayerOutput(
            depth,
            tokens,
            grid,
            prefix,
            facts.patch_size,
            attn=extra.get("attn"),
            head_outputs=extra.get("head_outputs"),
            stream_in=extra.get("stream_in"),
            attn_branch=extra.get("attn_branch"),
            mlp_branch=extra.get("mlp_branch"),
            has_class_token=facts.has_class_token and prefix > 0,
            window=window,
        )

    def check_attention(
        self,
        depth: int,
        attn: Tensor | None,
        heads: Tensor | None,
        values: Tensor | None,
        num_heads: int,
    ) -> None:
        """On the first batch: refuse a block whose attention read is not one softmax map per head whose product
        with the values gives the per-head outputs (see :func:`attention_problem`)."""
        if self._verified:
            return
        problem = attention_problem(attn, heads, values, num_heads)
        if problem:
            raise UnsupportedModelError(
                f"{type(self.model).__name__}, {type(self.blocks[depth - 1]).__name__} (block {depth}): {problem}, so "
                f"it is not the softmax attention vitscope measures; {_WITHOUT_ATTENTION}"
            )

    def check_branches(
        self, depth: int, stream_in: Tensor, attn: Tensor, mlp: Tensor, output: Tensor, what: str = "its"
    ) -> None:
        """On the first batch: stream in + attention branch + MLP branch must equal the block output."""
        if self._verified:
            return
        keep = VERIFY_IMAGES  # the layout is the model's: a few images show it
        stream_in, attn, mlp, output = stream_in[:keep], attn[:keep], mlp[:keep], output[:keep]
        error = (stream_in + attn + mlp - output).abs().max()
        scale = output.abs().max().clamp_min(1e-6)
        if not bool(error <= 1e-4 * scale + 1e-5):
            raise UnsupportedModelError(
                f"{type(self.blocks[depth - 1]).__name__} (block {depth}): stream in + attention branch + MLP branch "
                f"differs from the block output by {float(error):.3g}; {what} residual layout is not x + attn + mlp, "
                "so residual ratios are not defined for it (capture with branches=False; is the model in eval mode?)"
            )
