"""What every transformer capture shares: building a depth's :class:`LayerOutput` from its tokens, checked
against the grid, and the check that the residual branches read from the blocks add up to their output."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from vitscope.capture.layer import Capture, LayerOutput

__all__ = ["BlockCapture", "UnsupportedModelError"]

Extra = Mapping[str, Tensor | None]  # the optional tensors of a LayerOutput, by field name


class UnsupportedModelError(TypeError):
    """vitscope cannot analyse (this part of) this architecture; the message says what and why."""


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

    def check_branches(
        self, depth: int, stream_in: Tensor, attn: Tensor, mlp: Tensor, output: Tensor, what: str = "its"
    ) -> None:
        """On the first batch: stream in + attention branch + MLP branch must equal the block output."""
        if self._verified:
            return
        error = (stream_in + attn + mlp - output).abs().max()
        scale = output.abs().max().clamp_min(1e-6)
        if not bool(error <= 1e-4 * scale + 1e-5):
            raise UnsupportedModelError(
                f"{type(self.blocks[depth - 1]).__name__} (block {depth}): stream in + attention branch + MLP branch "
                f"differs from the block output by {float(error):.3g}; {what} residual layout is not x + attn + mlp, "
                "so residual ratios are not defined for it (capture with branches=False; is the model in eval mode?)"
            )
