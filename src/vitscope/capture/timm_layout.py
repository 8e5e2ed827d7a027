"""Where a timm transformer keeps what the capture reads: its blocks (plain, staged or parallel), each block's
head count, its patch embedding, and each block's stride in pixels, read off the model's geometry."""

from __future__ import annotations

from collections.abc import Sequence
from typing import SupportsInt, cast

from torch import nn

from vitscope.capture.blocks import UnsupportedModelError
from vitscope.capture.layer import pair

__all__ = [
    "PARALLEL_BLOCKS",
    "transformer_blocks",
    "is_parallel",
    "block_heads",
    "patch_embedding",
    "patch_stride",
    "block_strides",
]

# Blocks that run attention and MLP side by side on one input (x + attn(x) + mlp(x), often through one fused
# projection): no stream lies between the branches and no separate attention module holds the probabilities.
PARALLEL_BLOCKS = ("ParallelScalingBlock", "DiffParallelScalingBlock", "ParallelThingsBlock")


def is_parallel(block: nn.Module) -> bool:
    return type(block).__name__ in PARALLEL_BLOCKS


def _is_block(block: nn.Module) -> bool:
    return hasattr(block, "attn") or is_parallel(block)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The attention blocks in forward order: ``model.blocks`` or, stage by stage, ``model.layers[s].blocks``."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) and _is_block(blocks[0]):
        return list(blocks)
    layers = getattr(model, "layers", None)
    if isinstance(layers, (nn.Sequential, nn.ModuleList)):
        staged = [block for layer in layers for block in getattr(layer, "blocks", ())]
        if staged and all(hasattr(block, "attn") for block in staged):
            return staged
    return []


def block_heads(block: nn.Module) -> int | None:
    """The number of attention heads of a block: its attention module's (a Swin stage's own count), a parallel
    block's own, or None when it does not say."""
    for owner in (getattr(block, "attn", None), block):
        heads = getattr(owner, "num_heads", None)
        if heads is not None:
            return int(cast(SupportsInt, heads))
    attns = getattr(block, "attns", None)  # ParallelThingsBlock: Sequential(norm, attn, ls, drop_path) each
    if isinstance(attns, nn.ModuleList) and len(attns):
        return block_heads(attns[0])
    return None


def patch_embedding(model: nn.Module) -> nn.Module:
    """timm's patch embedding: ``patch_embed`` (PatchEmbed, HybridEmbed) or ``embeds`` (NaFlexVit)."""
    for name in ("patch_embed", "embeds"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return module
    raise UnsupportedModelError(
        f"{type(model).__name__} has no patch_embed or embeds module, so vitscope cannot tell how many pixels a "
        "token covers"
    )


def patch_stride(embed: nn.Module) -> tuple[int, int]:
    """Pixels per token of the patch embedding along (rows, cols): its whole reduction (``feat_ratio``: a hybrid's
    backbone stride times its patch size), else its patch size."""
    ratio = getattr(embed, "feat_ratio", None)
    if callable(ratio):
        return pair(cast("int | tuple[int, int]", ratio(as_scalar=False)))
    return pair(cast("int | tuple[int, int]", embed.patch_size))


def block_strides(model: nn.Module, names: Sequence[str], base: tuple[int, int]) -> list[tuple[int, int]]:
    """Each block's stride in pixels: ``base`` (the patch embedding's) times the block's stage reduction relative
    to the first block's, from timm's ``feature_info`` (Swin: 4, 8, 16, 32); ``base`` for every block without it."""
    info = getattr(model, "feature_info", None)
    entries = [entry for entry in (info or []) if isinstance(entry, dict) and "module" in entry]

    def reduction(name: str) -> int | None:
        found = [e for e in entries if name == e["module"] or name.startswith(str(e["module"]) + ".")]
        return int(found[-1]["reduction"]) if found else None

    reductions = [reduction(name) for name in names]
    first = reductions[0] if reductions else None
    if first is None or any(r is None for r in reductions):
        return [base] * len(names)
    return [(base[0] * cast(int, r) // first, base[1] * cast(int, r) // first) for r in reductions]
