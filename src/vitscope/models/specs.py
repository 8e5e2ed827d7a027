"""Model spec strings: ``KIND:TARGET[?key=value&key=value]``.

The same strings work in the CLI and in :func:`vitscope.load_model`. Options after ``?`` are parsed as
Python literals where they look like one (``img_size=32`` -> 32, ``strict=false`` -> False) and kept
as strings otherwise; keyword arguments given to ``load_model`` override them.

    timm:vit_base_patch16_224            random:vit_small_patch16_224?depth=6&img_size=32
    moco-v3:/ckpt/vit-s-300ep.pth.tar    mae:/ckpt/mae_pretrain_vit_base.pth?img_size=112
    file:/ckpt/my.safetensors?arch=vit_tiny_patch16_224   bundled:moco
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ModelSpec", "parse_spec", "option_bool", "KINDS", "CHECKPOINT_KINDS"]

CHECKPOINT_KINDS = ("moco-v3", "mae", "simmim", "dino", "beit")
KINDS = ("timm", "random", *CHECKPOINT_KINDS, "file", "bundled", "hf", "open_clip")
_ALIASES = {
    "mocov3": "moco-v3",
    "moco_v3": "moco-v3",
    "moco": "moco-v3",
    "huggingface": "hf",
    "transformers": "hf",
    "openclip": "open_clip",
    "open-clip": "open_clip",
}


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec: ``kind`` (one of :data:`KINDS`), ``target`` (a name or a path), ``options``."""

    kind: str
    target: str
    options: dict[str, Any] = field(default_factory=dict)
    text: str = ""

    @property
    def label(self) -> str:
        """A short display name: the timm name, or the file name for checkpoints."""
        if self.kind in ("timm", "random", "bundled", "hf", "open_clip"):
            return f"{self.kind}:{self.target}"
        return f"{self.kind}:{self.target.replace(chr(92), '/').rsplit('/', 1)[-1]}"


def parse_spec(text: str) -> ModelSpec:
    """Split ``KIND:TARGET[?k=v&...]`` into a :class:`ModelSpec`; a clear error for anything else."""
    if not isinstance(text, str) or ":" not in text:
        raise ValueError(
            f"model spec {text!r}: expected KIND:TARGET with KIND one of {', '.join(KINDS)} "
            "(e.g. timm:vit_base_patch16_224, mae:/path/mae_pretrain_vit_base.pth)"
        )
    kind, _, rest = text.partition(":")
    kind = _ALIASES.get(kind.strip().lower(), kind.strip().lower())
    if kind not in KINDS:
        raise ValueError(f"model spec {text!r}: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    target, options = _split_options(rest)
    if not target:
        raise ValueError(f"model spec {text!r}: nothing after '{kind}:' (expected a model name or a path)")
    return ModelSpec(kind=kind, target=target, options=options, text=text)


def _split_options(rest: str) -> tuple[str, dict[str, Any]]:
    target, sep, query = rest.rpartition("?")
    if not sep or not query or not all("=" in part for part in query.split("&")):
        return rest.strip(), {}
    options: dict[str, Any] = {}
    for part in query.split("&"):
        key, _, value = part.partition("=")
        options[key.strip()] = _parse_value(value.strip())
    return target.strip(), options


def _parse_value(value: str) -> Any:
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def option_bool(value: Any, name: str) -> bool:
    """A spec option read as a boolean (``true``/``false``, ``1``/``0``, ``yes``/``no``, or a bool)."""
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"option {name}={value!r}: expected true or false")
        return value.lower() in ("true", "1", "yes")
    return bool(value)
