"""Model cards: the JSON beside a weights file that says how to rebuild the model.

Two kinds, one format: the ``encoder.json`` that ``vitscope pretrain`` writes beside
``encoder.safetensors``, and the ``NAME.json`` beside each model shipped in ``vitscope/bundled/``. A card
holds at least ``arch`` (a timm model name) and ``arch_kwargs`` (keyword arguments for
``timm.create_model``); it may add ``mean``/``std`` (input normalisation) and free-form description
fields (method, step, data, training command, probe scores). ``load_model("file:PATH")`` and
``load_model("bundled:NAME")`` build ``arch`` with ``arch_kwargs`` and load the weights strictly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BundledModel", "available", "find", "read_card", "write_card", "card_beside", "BUNDLED_DIR", "ENCODER_CARD"]

BUNDLED_DIR = Path(__file__).resolve().parents[1] / "bundled"
ENCODER_CARD = "encoder.json"  # beside encoder.safetensors, written by `vitscope pretrain`


@dataclass(frozen=True)
class BundledModel:
    name: str
    weights: Path
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def arch(self) -> str:
        return str(self.card["arch"])

    @property
    def arch_kwargs(self) -> dict[str, Any]:
        return dict(self.card.get("arch_kwargs") or {})


def available(directory: Path | None = None) -> list[str]:
    """Names of the bundled models (those with both a ``.safetensors`` file and a ``.json`` card)."""
    directory = Path(directory) if directory is not None else BUNDLED_DIR
    return sorted(path.stem for path in directory.glob("*.safetensors") if path.with_suffix(".json").is_file())


def find(name: str, directory: Path | None = None) -> BundledModel:
    """The bundled model ``name``; a clear error listing what is available when it is absent."""
    directory = Path(directory) if directory is not None else BUNDLED_DIR
    weights = directory / f"{name}.safetensors"
    card_path = directory / f"{name}.json"
    if not weights.is_file() or not card_path.is_file():
        names = available(directory)
        listing = ", ".join(names) if names else "none (this installation ships no bundled models yet)"
        raise FileNotFoundError(
            f"bundled:{name}: no bundled model of that name (looked for {weights.name} and "
            f"{card_path.name} in {directory}); available: {listing}"
        )
    return BundledModel(name=name, weights=weights, card=read_card(card_path))


def read_card(card_path: Path) -> dict[str, Any]:
    """A model card (bundled ``NAME.json`` or the ``encoder.json`` that `vitscope pretrain` writes):
    JSON with ``arch`` (a timm model name) and optionally ``arch_kwargs`` (an object). Errors name the file."""
    try:
        card = json.loads(Path(card_path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"model card {card_path} is not valid JSON: {err}") from None
    if not isinstance(card, dict) or not isinstance(card.get("arch"), str):
        raise ValueError(f"model card {card_path} needs an 'arch' entry (a timm model name)")
    if not isinstance(card.get("arch_kwargs", {}), dict):
        raise ValueError(f"model card {card_path}: 'arch_kwargs' must be an object")
    return card


def write_card(card_path: Path, card: dict[str, Any]) -> None:
    """Write a model card atomically; it must name ``arch`` (and may give ``arch_kwargs``)."""
    from vitscope.io import write_json_atomic

    if not isinstance(card.get("arch"), str):
        raise ValueError(f"model card {card_path} needs an 'arch' entry (a timm model name)")
    write_json_atomic(card_path, card)


def card_beside(weights: Path) -> Path | None:
    """The ``encoder.json`` beside a weights file, if there is one."""
    path = Path(weights).expanduser().with_name(ENCODER_CARD)
    return path if path.is_file() else None
