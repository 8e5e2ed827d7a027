"""Build a timm model and fill it from a state dict, reporting every key by name.

Steps of :func:`load_into`:
    1. adapt: shared relative-position bias copied to each block when the model wants per-block
       tables; ``pos_embed`` [1, P + h·w, C] resampled to the model's grid (timm
       ``resample_abs_pos_embed``); relative-position bias tables resized (``resize_rel_pos_bias_table``).
    2. compare names and shapes with ``model.state_dict()``: missing, unexpected, mismatched.
    3. strict (default): any encoder weight missing, any unused or mismatched checkpoint weight ->
       :class:`CheckpointMismatchError` naming keys and shapes. Not strict: load what fits, report the rest.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, cast

import timm
import torch
from torch import Tensor, nn

from vitscope.models.load_report import CheckpointMismatchError, LoadReport, mismatch_message

__all__ = ["create_timm_model", "load_into", "compare_keys", "adapt_state_dict", "seeded"]

_CLASSIFIER_PREFIXES = ("head.", "fc_norm.")  # absent from SSL checkpoints; never encoder weights


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run with torch's CPU generator seeded, restoring the caller's generator state afterwards."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def create_timm_model(
    name: str,
    kwargs: Mapping[str, Any],
    *,
    seed: int | None = 0,
    cfg_overlay: Mapping[str, Any] | None = None,
    context: str = "",
) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)`` with errors that say what to fix."""
    where = f"{context}: " if context else ""
    try:
        with seeded(seed):
            return timm.create_model(name, pretrained=False, pretrained_cfg_overlay=dict(cfg_overlay or {}), **kwargs)
    except RuntimeError as err:
        if "Unknown model" not in str(err):
            raise
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ValueError(f"{where}unknown timm model {name!r}{hint}") from None
    except (TypeError, AssertionError) as err:
        raise ValueError(f"{where}timm model {name!r} cannot be built with {dict(kwargs)}: {err}") from None


def adapt_state_dict(state: Mapping[str, Tensor], model: nn.Module, report: LoadReport) -> dict[str, Tensor]:
    """Fit position embeddings and relative-position tables to the model's grid (noted in ``report``)."""
    from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table

    state = dict(state)
    target = model.state_dict()
    _spread_shared_rel_pos_bias(state, target, report)
    pos_embed = state.get("pos_embed")
    if pos_embed is not None and "pos_embed" in target:
        want = target["pos_embed"]
        if pos_embed.ndim == 3 and pos_embed.shape[-1] == want.shape[-1] and pos_embed.shape[1] != want.shape[1]:
            prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
            patch_embed = cast(nn.Module, model.patch_embed)
            grid = tuple(cast("tuple[int, int]", patch_embed.grid_size))
            state["pos_embed"] = resample_abs_pos_embed(
                pos_embed.float(), new_size=list(grid), num_prefix_tokens=prefix
            ).to(pos_embed.dtype)
            old = pos_embed.shape[1] - prefix
            report.resized.append(f"pos_embed: {old} positions -> {grid[0]}x{grid[1]} grid (bicubic)")
    for key, table in list(state.items()):
        if not key.endswith("relative_position_bias_table") or key not in target:
            continue
        want = target[key]
        if table.shape != want.shape and table.ndim == 2 and table.shape[1] == want.shape[1]:
            module = model.get_submodule(key[: -len(".relative_position_bias_table")])
            window_size = cast("Iterable[int]", module.window_size)
            window = cast("tuple[int, int]", tuple(window_size))  # a 2-D attention window
            state[key] = resize_rel_pos_bias_table(
                table.float(), new_window_size=window, new_bias_shape=tuple(want.shape)
            ).to(table.dtype)
            report.resized.append(f"{key}: {tuple(table.shape)} -> {tuple(want.shape)} (window {window})")
    return state


def _spread_shared_rel_pos_bias(state: dict[str, Tensor], target: Mapping[str, Tensor], report: LoadReport) -> None:
    shared = "rel_pos_bias.relative_position_bias_table"
    if shared not in state or shared in target:
        return
    block_keys = [
        key for key in target if key.startswith("blocks.") and key.endswith("attn.relative_position_bias_table")
    ]
    if not block_keys or any(key in state for key in block_keys):
        return
    table = state.pop(shared)
    for key in block_keys:
        state[key] = table.clone()
    report.notes.append(f"shared relative position bias copied into each of {len(block_keys)} blocks")


def compare_keys(state: Mapping[str, Tensor], target: Mapping[str, Tensor], report: LoadReport) -> None:
    """Fill ``report``'s missing, unexpected and mis-shaped keys of ``state`` against the model's ``target``."""
    report.missing = [key for key in target if key not in state]
    report.unexpected = [key for key in state if key not in target]
    report.mismatched = [
        f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target[key].shape)}"
        for key, value in state.items()
        if key in target and value.shape != target[key].shape
    ]


def load_into(
    model: nn.Module,
    state: Mapping[str, Tensor],
    report: LoadReport,
    *,
    strict: bool = True,
    allow_missing: tuple[str, ...] = _CLASSIFIER_PREFIXES,
) -> LoadReport:
    """Adapt, compare and load ``state`` into ``model``; fill and return ``report`` (see module doc)."""
    state = adapt_state_dict(state, model, report)
    target = model.state_dict()
    compare_keys(state, target, report)
    encoder_missing = [key for key in report.missing if not key.startswith(allow_missing)]
    if strict and (encoder_missing or report.unexpected or report.mismatched):
        raise CheckpointMismatchError(
            mismatch_message(
                f"{report.path or report.spec} does not fit {report.arch} {report.arch_kwargs}:",
                mismatched=report.mismatched,
                missing=encoder_missing,
                unexpected=report.unexpected,
                advice="Pick the matching architecture with arch=/num_heads= (or fix img_size=), "
                "or pass strict=False to load what fits.",
            )
        )
    fitting = {key: value for key, value in state.items() if key in target and value.shape == target[key].shape}
    model.load_state_dict(fitting, strict=False)
    report.loaded = len(fitting)
    return report
