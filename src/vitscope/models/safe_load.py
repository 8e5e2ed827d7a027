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

Before anything is parsed, the first bytes say what the file is (:func:`sniff_file`): a torch zip or
pickle goes to ``torch.load``, a safetensors file to safetensors whatever its suffix, and anything else
(empty, JSON, HTML, text, a Git LFS pointer, gzip, unknown bytes) is refused with a sentence saying
what the file looks like; a damaged zip or pickle is named as damaged, never as unsafe.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import struct
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
    "sniff_file",
    "SAFETENSORS_SUFFIXES",
    "CHECKPOINT_EXPECTED",
]

SAFETENSORS_SUFFIXES = (".safetensors",)
CHECKPOINT_EXPECTED = "a PyTorch checkpoint (torch.save) or a safetensors file"
_SNIFF_BYTES = 512


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


def read_checkpoint(path: str | os.PathLike, expected: str = CHECKPOINT_EXPECTED) -> Any:
    """Load a checkpoint file's content (nested containers of tensors and metadata) on the CPU.

    ``expected`` names what the file should be in the error of a file that is something else.

    Raises:
        FileNotFoundError: the file does not exist (the message names the path).
        UnsafeCheckpointError: the pickle stream asks for classes or callables beyond tensors,
            containers, ``argparse.Namespace`` and yacs ``CfgNode``; nothing from it was run.
        CheckpointError: the file is not a readable checkpoint (the message says what it looks like).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {file}")
    kind, description = sniff_file(file)
    if kind == "safetensors":
        return _read_safetensors(file, expected)
    if kind not in ("zip", "pickle"):
        raise CheckpointError(f"{file}: expected {expected}, but it {description}")
    if file.suffix in SAFETENSORS_SUFFIXES:  # torch.load would read it as safetensors, by its name
        raise CheckpointError(
            f"{file}: named as a safetensors file but it {description} from torch.save; rename it to .pt"
        )
    try:
        with torch.serialization.safe_globals(_METADATA_GLOBALS):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        wanted = _refused_globals(file, err)
        if wanted is None:
            raise CheckpointError(f"{file}: expected {expected}, but it {_damaged(kind, err)}") from None
        raise UnsafeCheckpointError(_unsafe_message(file, wanted)) from None
    except Exception as err:  # the readers raise many kinds on damaged bytes (KeyError, struct.error, ...)
        raise CheckpointError(f"{file}: expected {expected}, but it {_damaged(kind, err)}") from None


def sniff_file(path: str | os.PathLike) -> tuple[str, str]:
    """What a file holds, from its first bytes: ``(kind, description)``.

    kind is one of ``zip`` (torch.save's format), ``pickle`` (torch's legacy format or a plain pickle),
    ``safetensors``, ``empty``, ``json``, ``html``, ``git-lfs-pointer``, ``gzip``, ``text`` or ``binary``;
    description completes "the file ..." (e.g. "holds JSON text (starts with '{"a": 1}')").
    """
    file = Path(path)
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(_SNIFF_BYTES)
    if not head:
        return "empty", "is empty (0 bytes)"
    if head.startswith(b"PK\x03\x04"):
        return "zip", "is a zip archive"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle", "is a pickle"
    if _looks_like_safetensors(head, size):
        return "safetensors", "is a safetensors file"
    if head.startswith(b"\x1f\x8b"):
        return "gzip", "is gzip-compressed data (decompress it first)"
    text = _as_text(head)
    if text is None:
        return "binary", f"holds unrecognised binary data (first bytes {head[:8].hex(' ')})"
    stripped = text.lstrip("\ufeff \t\r\n")
    start = stripped[:40].replace("\n", " ").strip()
    lowered = stripped[:200].lower()
    if stripped.startswith("version https://git-lfs"):
        return "git-lfs-pointer", "is a Git LFS pointer, not the file's content (fetch it with git lfs pull)"
    if lowered.startswith(("<!doctype html", "<html", "<head", "<?xml")) or "<html" in lowered:
        return "html", f"is an HTML or XML page (starts with {start!r}), perhaps a failed download"
    if stripped[:1] in ("{", "[") and _is_json(file, size):
        return "json", f"holds JSON text (starts with {start!r})"
    return "text", f"holds text (starts with {start!r})"


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON header starting with ``{``."""
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 0 < header_len <= size - 8 and head[8:9] == b"{"


def _as_text(head: bytes) -> str | None:
    """``head`` decoded as UTF-8 when it reads as text (printable, no NUL), else None."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:  # the cut may split a character at the end
        if err.start < len(head) - 3:
            return None
        text = head[: err.start].decode("utf-8")
    printable = sum(ch.isprintable() or ch in "\t\r\n" for ch in text)
    return text if text and printable >= 0.95 * len(text) else None


def _is_json(file: Path, size: int) -> bool:
    if size > 16 * 2**20:  # too large to parse for a message: judge by the first byte
        return True
    try:
        json.loads(file.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return True


def _damaged(kind: str, err: BaseException) -> str:
    """How a zip or pickle failed to read, completing "it ..."."""
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, pickle.UnpicklingError):
        found = re.search(r"Unsupported operand[^\n]*", str(err))
        detail = found.group(0) if found else detail
    detail = detail.split(". This is an internal miniz error")[0]
    if kind == "zip":
        return f"is a truncated or damaged zip archive ({detail})"
    if isinstance(err, EOFError):
        return "is a truncated pickle (it ends too early)"
    return f"is a damaged pickle or one not written by torch.save ({type(err).__name__}: {detail})"


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


def _read_safetensors(file: Path, expected: str = CHECKPOINT_EXPECTED) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{file}: expected {expected}, but it is a truncated or damaged safetensors file ({err})"
        ) from None


def _refused_globals(file: Path, err: Exception) -> list[str] | None:
    """The globals a refused pickle asked for; None when the refusal was not about globals (damage)."""
    try:
        wanted = torch.serialization.get_unsafe_globals_in_checkpoint(file)
    except Exception:
        wanted = []
    allowed = {"argparse.Namespace", "yacs.config.CfgNode"}
    refused = [name for name in wanted if name not in allowed]
    refused = refused or sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(err))))
    return refused or None


def _unsafe_message(file: Path, refused: list[str]) -> str:
    return (
        f"refusing to load {file}: unpickling it would construct objects of {', '.join(refused)}, which can "
        "run arbitrary code. vitscope reads only tensors, containers, numbers and argparse/yacs metadata. If "
        "you trust the file, re-save its weights in a trusted environment, e.g. "
        "safetensors.torch.save_file(state_dict, 'weights.safetensors'), and load that."
    )
