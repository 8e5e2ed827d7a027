"""Read checkpoint files without running code from them.

``.safetensors`` files are read with safetensors. Everything else goes through
``torch.load(weights_only=True)``: tensors, containers and numbers only. The official training
checkpoints carry two kinds of metadata objects besides their weights, and both are allowed by name
and nothing else:

- ``argparse.Namespace`` (``args`` in MAE, DINO and BEiT training checkpoints): rebuilt as a plain
  Namespace, its attributes set from the stored dict; no method of the file's choosing runs.
- ``yacs.config.CfgNode`` (``config`` in SimMIM checkpoints): rebuilt by an inert stand-in as a plain
  ``OrderedDict`` of the stored values; yacs itself is never imported.

Any other class or callable in the pickle stream makes ``torch.load`` refuse the file, and
:class:`UnsafeCheckpointError` names the file and the globals it asked for.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "read_checkpoint",
    "read_state_dict",
    "unwrap_state_dict",
    "SAFETENSORS_SUFFIXES",
]

SAFETENSORS_SUFFIXES = (".safetensors",)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, wrong layout, or not matching the model."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose unpickling would construct objects outside the allowlist (may run code)."""


class _ConfigNodeStandIn:
    """Stands in for ``yacs.config.CfgNode`` while unpickling: yields a plain ``OrderedDict``.

    A pickled CfgNode (a ``dict`` subclass) is rebuilt as NEWOBJ -> SETITEMS -> BUILD. Returning an
    ``OrderedDict`` from ``__new__`` lets the weights-only unpickler fill it with the stored items and
    set its attribute dict, and nothing else happens: no yacs code, no code from the file.
    """

    def __new__(cls, *args: Any) -> OrderedDict[str, Any]:  # type: ignore[misc]
        return OrderedDict()


_METADATA_GLOBALS: list[Any] = [argparse.Namespace, (_ConfigNodeStandIn, "yacs.config.CfgNode")]


def read_checkpoint(path: str | os.PathLike) -> Any:
    """Load a checkpoint file's content (nested containers of tensors and metadata) on the CPU.

    Raises:
        FileNotFoundError: the file does not exist (the message names the path).
        UnsafeCheckpointError: the pickle stream asks for classes or callables beyond tensors,
            containers, ``argparse.Namespace`` and yacs ``CfgNode``; nothing from it was run.
        CheckpointError: the file is not a readable checkpoint.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {file}")
    if file.suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(file)
    try:
        with torch.serialization.safe_globals(_METADATA_GLOBALS):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(_unsafe_message(file, err)) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint {file}: {err}") from None


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A flat ``{name: tensor}`` state dict from a file, unwrapped from ``model``/``state_dict``."""
    return unwrap_state_dict(read_checkpoint(path), source=str(path))


def unwrap_state_dict(checkpoint: Any, source: str = "checkpoint") -> dict[str, Tensor]:
    """Take the weights out of a checkpoint: ``model``, ``state_dict`` or ``module`` entries are
    unwrapped (nested ones too), a common ``module.`` prefix (DataParallel) is stripped."""
    state = checkpoint
    for _ in range(3):
        if not isinstance(state, Mapping):
            break
        inner = next(
            (state[key] for key in ("model", "state_dict", "module") if isinstance(state.get(key), Mapping)), None
        )
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"{source}: expected a state dict (a mapping of names to tensors), got {type(state).__name__}"
        )
    tensors = {key: value for key, value in state.items() if isinstance(value, Tensor)}
    if not tensors:
        raise CheckpointError(f"{source}: no tensors found; top-level entries: {sorted(map(str, state))[:20]}")
    if all(key.startswith("module.") for key in tensors):
        tensors = {key[len("module.") :]: value for key, value in tensors.items()}
    return tensors


def _read_safetensors(file: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read safetensors file {file}: {err}") from None


def _unsafe_message(file: Path, err: Exception) -> str:
    try:
        wanted = torch.serialization.get_unsafe_globals_in_checkpoint(file)
    except Exception:
        wanted = []
    allowed = {"argparse.Namespace", "yacs.config.CfgNode"}
    refused = [name for name in wanted if name not in allowed]
    refused = refused or sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(err))))
    what = f"objects of {', '.join(refused)}" if refused else "objects outside the allowlist"
    return (
        f"refusing to load {file}: unpickling it would construct {what}, which can run arbitrary code. "
        "vitscope reads only tensors, containers, numbers and argparse/yacs metadata. If you trust the "
        "file, re-save its weights in a trusted environment, e.g. "
        "safetensors.torch.save_file(state_dict, 'weights.safetensors'), and load that."
    )
