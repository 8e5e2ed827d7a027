"""What one depth of one forward pass yields (:class:`LayerOutput`), what a model is (:class:`ModelFacts`),
and the :class:`Capture` interface every capture implements."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

__all__ = ["ModelFacts", "LayerOutput", "OnLayer", "Capture", "spatial_attention", "pair"]


@dataclass(frozen=True)
class ModelFacts:
    """What the metrics need to know about a model, independent of the input."""

    kind: str  # "vit" or "cnn"
    num_layers: int  # blocks (ViT) or stages (CNN); depths run 0..num_layers for a ViT
    num_heads: int | None  # the first block's; see layer_heads where stages differ (Swin)
    embed_dim: int | None
    num_prefix_tokens: int  # CLS + registers + distillation tokens before the spatial tokens
    patch_size: tuple[int, int]  # pixels per token along (rows, cols); a CNN stage's stride
    has_class_token: bool
    layer_names: tuple[str, ...] = field(default=())
    layer_heads: tuple[int, ...] = field(default=())  # heads of each block in order; () when it does not say

    def heads_text(self) -> str:
        """The head count, or each stage's run of counts where they differ ("2, 4, 8, 16")."""
        distinct = [n for i, n in enumerate(self.layer_heads) if i == 0 or n != self.layer_heads[i - 1]]
        return ", ".join(map(str, distinct)) if len(distinct) > 1 else str(self.num_heads)

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
        head_outputs: per-head outputs A·V [B, H, T, D] over all keys (prefix tokens included), before
            the output projection: what each head actually adds up.
        stream_in: residual stream entering the block [B, T, C].
        attn_branch: what the attention branch adds to the stream (layer scale applied) [B, T, C].
        mlp_branch: what the MLP branch adds to the stream [B, T, C].
        has_class_token: whether ``tokens[:, 0]`` is a class token (registers alone are not).
        window: (wh, ww) when the block attends within windows (Swin, SAM): then ``attn`` is
            [B·W, H, n, n] and ``head_outputs`` [B·W, H, n, D] over the n = wh·ww tokens of each window
            (row-major inside it), W windows per image; None for attention over the whole grid.
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
    has_class_token: bool = False
    window: tuple[int, int] | None = None

    @property
    def spatial_tokens(self) -> Tensor:
        """[B, N, C]: the tokens without prefix tokens."""
        return self.tokens[:, self.num_prefix_tokens :]

    @property
    def spatial_attn(self) -> Tensor | None:
        """[B, H, N, N]: attention without prefix rows/columns, rows renormalised to sum 1
        ([B·W, H, n, n] per window for windowed attention, which has no prefix tokens)."""
        if self.attn is None or self.window is not None:
            return self.attn
        return spatial_attention(self.attn, self.num_prefix_tokens)

    @property
    def spatial_head_outputs(self) -> Tensor | None:
        """[B, H, N, D]: per-head outputs at the spatial query positions (A·V over all keys)
        ([B·W, H, n, D] per window for windowed attention)."""
        if self.head_outputs is None or self.window is not None:
            return self.head_outputs
        return self.head_outputs[:, :, self.num_prefix_tokens :]

    @property
    def attention_grid(self) -> tuple[int, int]:
        """The grid attention distances are measured on: the window's, else the whole grid."""
        return self.window if self.window is not None else self.grid

    def per_image(self, values: Tensor) -> Tensor:
        """Per-window values [B·W, ...] averaged to per-image values [B, ...] (as they are without windows)."""
        batch = self.tokens.shape[0]
        if self.window is None or values.shape[0] == batch:
            return values
        return values.reshape(batch, values.shape[0] // batch, *values.shape[1:]).mean(dim=1)

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


def pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """An int or a (rows, cols) pair as a pair of ints."""
    if isinstance(value, int):
        return (value, value)
    if len(value) != 2:
        raise ValueError(f"expected an int or a pair (rows, cols), not {value!r}")
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
            cloned: dict[str, Any] = {
                name: (value.detach().clone() if isinstance(value, Tensor) else value)
                for name, value in vars(layer).items()
            }
            kept.append(LayerOutput(**cloned))

        self.run(images, keep)
        return kept
