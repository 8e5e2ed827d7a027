"""Models shipped with the package: ``bundled/NAME.safetensors`` beside a ``NAME.json`` model card.

A card holds at least ``arch`` (a timm model name) and ``arch_kwargs`` (keyword arguments for
``timm.create_model``); it may add ``mean``/``std`` (input normalisation) and free-form description
fields. ``load_model("bundled:NAME")`` builds ``arch`` with ``arch_kwargs`` and loads the weights.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BundledModel", "available", "find", "read_card", "BUNDLED_DIR"]

BUNDLED_DIR = Path(__file__).resolve().parent


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
        raise FileNotFoundError(f"bundled:{name}: no bundled model of that name (looked for {weights.name} and "
                                f"{card_path.name} in {directory}); available: {listing}")
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
