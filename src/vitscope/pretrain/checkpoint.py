"""What a training run writes and reads back: weights with their model card, the resumable train state,
the step log, and the RNG states that make a resumed run end bit-identical (on CPU).

Every file is written atomically; ``train_state.pt`` holds plain tensors and Python values only, so it
loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from vitscope.io import atomic_path, write_text_atomic
from vitscope.models.cards import write_card
from vitscope.pretrain.batches import BatchPlan

__all__ = [
    "STATE_FILE",
    "LOG_FILE",
    "check_run_dir",
    "capture_rng_state",
    "restore_rng_state",
    "save_weights",
    "export_model",
    "save_train_state",
    "load_train_state",
    "truncate_log",
    "iter_log",
]

STATE_FILE, LOG_FILE = "train_state.pt", "log.jsonl"


def check_run_dir(out_dir: str | os.PathLike, resume: bool) -> tuple[Path, Path]:
    """The run directory and its state file; refuses to resume nothing or to overwrite a run."""
    out = Path(out_dir)
    state_path = out / STATE_FILE
    if resume and not state_path.exists():
        raise FileNotFoundError(f"resume: no {state_path} to resume from")
    if not resume and state_path.exists():
        raise ValueError(f"{out} already holds a run ({STATE_FILE}); resume it or choose another output directory")
    return out, state_path


# ------------------------------------------------------------------------------------------ RNG
def capture_rng_state() -> dict:
    """Global RNG states of torch (CPU, CUDA), numpy and Python as tensors and plain Python values."""
    np_state = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())  # legacy MT19937 tuple
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -------------------------------------------------------------------------------------- weights
def save_weights(path: Path, module: nn.Module, metadata: Mapping[str, str] | None = None) -> None:
    """``module``'s state dict as safetensors (CPU copies, contiguous), atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})


def export_model(out: Path, weights_name: str, card_name: str, module: nn.Module, card: dict[str, Any]) -> None:
    """Weights and the model card beside them (loadable with ``file:OUT/WEIGHTS``)."""
    save_weights(out / weights_name, module, {"arch": str(card["arch"]), "step": str(card.get("step", ""))})
    write_card(out / card_name, card)


# ---------------------------------------------------------------------------------- train state
def save_train_state(
    out: Path,
    *,
    format: str,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    plan: BatchPlan,
    config: dict,
    **extra: Any,
) -> None:
    """``train_state.pt``: everything a resumed run needs (model, optimizer, scaler, RNG, data position)."""
    epoch, within = plan.position(step)
    state = {
        "format": format,
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        **extra,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": capture_rng_state(),
        "data_position": {"epoch": epoch, "batch_in_epoch": within, "steps_per_epoch": plan.steps_per_epoch},
        "config": config,
        "num_threads": torch.get_num_threads(),
    }
    with atomic_path(out / STATE_FILE) as tmp:
        torch.save(state, tmp)


def load_train_state(
    path: Path,
    config: dict,
    resumable: Iterable[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
) -> dict:
    """Restore a run from ``path`` into ``model``, ``optimizer``, ``scaler`` and the global RNGs.

    Settings other than ``resumable`` must equal the saved ones (a field the file predates counts as
    unchanged when it holds None); returns the whole state (``step`` and whatever else was saved).
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved, allowed = state["config"], set(resumable)
    changed = sorted(k for k in config if k not in allowed and saved.get(k) != config[k])
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} → {config[k]!r}" for k in changed)
        raise ValueError(f"{path}: cannot resume with different settings ({details})")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    restore_rng_state(state["rng"])
    threads = state.get("num_threads")
    if threads is not None and threads != torch.get_num_threads():
        warnings.warn(
            f"{path} was written with {threads} CPU threads, resuming with {torch.get_num_threads()}: "
            "the result will not be bit-identical to an uninterrupted run on CPU",
            stacklevel=2,
        )
    return state


# ------------------------------------------------------------------------------------------ log
def truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of steps < ``step`` (the resumed run rewrites the rest)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] < step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # a torn last line from a killed run
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))


def iter_log(path: str | os.PathLike) -> Iterator[dict]:
    """The records of a ``log.jsonl``."""
    with open(path) as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)
