"""Find timm's pretrained weights on this machine, never on the network.

Looks in the Hugging Face hub cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``~/.cache/huggingface/hub``) for the model's hub file, then in torch hub's checkpoint folder
(``TORCH_HOME/hub/checkpoints``) for its legacy URL's file. Nothing here opens a connection, so a
missing file is reported at once with what to download and where to put it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

__all__ = ["WeightsLocation", "locate_timm_weights", "hf_cache_dir"]

_HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")
_LOADABLE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")  # not the legacy JAX .npz files


@dataclass(frozen=True)
class WeightsLocation:
    """Where a timm model's pretrained weights are (``path``) or would be fetched from (the rest)."""

    name: str
    path: Path | None
    hf_repo: str | None
    hf_filename: str | None
    url: str | None
    torch_hub_file: Path | None

    def download_hint(self) -> str:
        lines = []
        if self.hf_repo:
            filename = self.hf_filename or _HF_FILENAMES[0]
            lines.append(
                f"download https://huggingface.co/{self.hf_repo}/resolve/main/{filename} "
                f"(or, on a machine online: huggingface-cli download {self.hf_repo} {filename}; "
                f"the Hugging Face cache it fills is {hf_cache_dir()})"
            )
        if self.url and Path(urlparse(self.url).path).suffix in _LOADABLE_SUFFIXES:
            lines.append(f"{'or ' if lines else ''}download {self.url} and put it at {self.torch_hub_file}")
        lines.append("then pass the file with weights=PATH (timm:NAME?weights=PATH) or copy the cache folder here")
        return "; ".join(lines)


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache folder, from the environment at call time."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _torch_hub_checkpoints() -> Path:
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def locate_timm_weights(name: str) -> WeightsLocation:
    """Look up ``name``'s pretrained config and search both caches. ``path`` is None when absent.

    Raises:
        ValueError: timm knows no pretrained weights for ``name``.
    """
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    hf_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    url = getattr(cfg, "url", None) if cfg is not None else None
    if cfg is None or not (hf_id or url or getattr(cfg, "file", None)):
        raise ValueError(
            f"timm:{name}: timm has no pretrained weights for this name; use random:{name} for a "
            "random-init control, or give a weights file with weights=PATH"
        )
    cfg_file = getattr(cfg, "file", None)
    if cfg_file and Path(cfg_file).is_file():
        return WeightsLocation(name, Path(cfg_file), hf_id, None, url, None)
    hf_repo, hf_file = _split_hf_id(hf_id), getattr(cfg, "hf_hub_filename", None)
    hub_file = _torch_hub_checkpoints() / Path(urlparse(url).path).name if url else None
    path = _find_in_hf_cache(hf_repo, hf_file) if hf_repo else None
    if path is None and hub_file is not None and hub_file.is_file() and hub_file.suffix in _LOADABLE_SUFFIXES:
        path = hub_file
    return WeightsLocation(name, path, hf_repo, hf_file, url, hub_file)


def _split_hf_id(hf_id: str | None) -> str | None:
    return hf_id.split("@", 1)[0] if hf_id else None


def _find_in_hf_cache(repo: str, filename: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    cache = hf_cache_dir()
    if not cache.is_dir():
        return None
    for candidate in (filename,) if filename else _HF_FILENAMES:
        found = try_to_load_from_cache(repo, candidate, cache_dir=str(cache))
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None
