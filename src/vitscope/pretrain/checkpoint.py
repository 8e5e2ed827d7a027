"""What a training run writes and reads back: weights with their model card, the resumable train state,
the step log, and the RNG states that make a resumed run end bit-identical (on CPU).

Every file is written atomically; ``train_state.pt`` holds plain tensors and Python values only, so it
loads with ``torch.load(weights_only=True)``. A train state is read in two stages: :func:`read_train_state`
(before any work: the file is a train state of the right kind, whole, finite and written with the same
settings) and :func:`restore_train_state` (into the built model, optimizer and RNGs, every shape
checked); anything wrong is a :class:`~vitscope.models.safe_load.CheckpointError` naming the file and
what was expected.
"""

from __future__ import annotations

import json
import os
import random
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from vitscope.distributed import DistEnv, all_sum
from vitscope.io import atomic_path, write_text_atomic
from vitscope.models.cards import write_card
from vitscope.models.safe_load import CheckpointError, read_checkpoint
from vitscope.pretrain.batches import BatchPlan
from vitscope.pretrain.finite import describe_tensors, nonfinite_names

__all__ = [
    "STATE_FILE",
    "LOG_FILE",
    "RUN_FILES",
    "check_run_dir",
    "run_lock",
    "capture_rng_state",
    "restore_rng_state",
    "save_weights",
    "export_model",
    "card_step",
    "save_train_state",
    "save_torch_atomic",
    "read_train_state",
    "restore_train_state",
    "truncate_log",
    "iter_log",
]

STATE_FILE, LOG_FILE = "train_state.pt", "log.jsonl"
# what pretraining and fine-tuning runs write; a directory holding any of them is an earlier run
RUN_FILES = (
    STATE_FILE,
    "encoder.safetensors",
    "encoder.json",
    "model.safetensors",
    "model.json",
    LOG_FILE,
    "metrics.json",
    "snapshots",
)


def check_run_dir(out_dir: str | os.PathLike, resume: bool) -> tuple[Path, Path]:
    """The run directory and its state file.

    A fresh run refuses a directory that holds any :data:`RUN_FILES` (it would overwrite a trained
    model or mix two runs' logs); ``resume`` needs the state file and removes the temporary files a
    killed run left behind.
    """
    out = Path(out_dir)
    state_path = out / STATE_FILE
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; expected a run directory (new, or with {STATE_FILE} to resume)")
    found = [name for name in RUN_FILES if (out / name).exists()]
    if resume and not state_path.is_file():
        held = f" (it holds {', '.join(found)})" if found else ""
        raise FileNotFoundError(f"cannot resume: no {state_path} to resume from{held}")
    if not resume and state_path.exists():
        raise ValueError(
            f"{out} already holds a run ({', '.join(found)}): continue it with --resume or choose a new --out"
        )
    if not resume and found:
        raise ValueError(
            f"{out} already holds files of an earlier run ({', '.join(found)}) but no {STATE_FILE} to resume "
            "from; a new run would overwrite them: choose a new --out (or remove those files)"
        )
    if resume:
        _remove_stale_temporaries(out)
    return out, state_path


@contextmanager
def run_lock(out_dir: str | os.PathLike, env: DistEnv) -> Iterator[None]:
    """Hold the run directory's writer lock (rank 0, ``.DIR.lock`` beside it) while the block runs: a
    second process training into the same directory is refused at once with a sentence naming the
    first (pid, host, command). Every rank raises when rank 0 could not take it."""
    from vitscope.rundir import RunLock

    lock, refused = None, None
    if env.is_main:
        try:
            lock = RunLock(out_dir).acquire()
        except ValueError as err:
            refused = err
    if all_sum(int(refused is not None), env):
        raise refused or ValueError(f"{out_dir} is being written by another process")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _remove_stale_temporaries(out: Path) -> None:
    """Delete the temporary files of atomic writes that a killed run left (``.NAME.XXXX.tmp``)."""
    for folder in (out, *sorted((out / "snapshots").glob("step-*"))):
        for name in RUN_FILES:
            for tmp in folder.glob(f".{name}.*.tmp"):
                tmp.unlink(missing_ok=True)


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
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})
        except SafetensorError as err:  # a failed write (a full disk): say it as the OSError it is
            code = re.search(r"os error (\d+)", str(err))
            if code is None:
                raise OSError(f"{path}: {err}") from None
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def export_model(out: Path, weights_name: str, card_name: str, module: nn.Module, card: dict[str, Any]) -> None:
    """Weights and the model card beside them (loadable with ``file:OUT/WEIGHTS``)."""
    save_weights(out / weights_name, module, {"arch": str(card["arch"]), "step": str(card.get("step", ""))})
    write_card(out / card_name, card)


def card_step(out: Path, weights_name: str, card_name: str) -> int | None:
    """The step of the exported weights in ``out`` (from their card); None when either file is missing
    or the card is unreadable."""
    card = out / card_name
    if not (out / weights_name).is_file() or not card.is_file():
        return None
    try:
        step = json.loads(card.read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


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
    save_torch_atomic(state, out / STATE_FILE)


class _WriteRecorder:
    """A binary file for ``torch.save`` that keeps the ``OSError`` of a failed write, which torch's
    zip writer reports only as an opaque RuntimeError."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.fh.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.fh.flush()


def save_torch_atomic(obj: Any, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically; a failed write (a full disk) raises the ``OSError``
    naming ``path``, and the previous file stays."""
    with atomic_path(path) as tmp:
        fh = open(tmp, "wb")  # noqa: SIM115 - closed below, where a failed final flush is caught too
        recorder = _WriteRecorder(fh)
        try:
            torch.save(obj, recorder)  # type: ignore[arg-type]  # a file-like object, as torch.save takes
            fh.close()
        except (RuntimeError, OSError) as err:
            cause = recorder.error or (err if isinstance(err, OSError) else None)
            if cause is None:
                raise
            raise OSError(cause.errno, cause.strerror, str(path)) from None
        finally:
            with suppress(OSError):
                fh.close()


_STATE_KEYS = ("format", "step", "model", "optimizer", "rng", "config")


def read_train_state(
    path: Path,
    format: str,
    config: dict,
    resumable: Iterable[str],
    extra_keys: Iterable[str] = (),
    defaults: dict | None = None,
) -> dict:
    """Read and check a ``train_state.pt`` before any work: a train state of ``format`` with every entry
    (the common ones and ``extra_keys``), a finite model, written with the same settings as ``config``
    except ``resumable`` ones. The nested settings named in ``defaults`` (``objective``) are compared
    field by field; a field the file predates counts as unchanged when it holds None or its value in
    ``defaults`` (a new field's default reproduces what the code did before the field existed).

    Raises:
        CheckpointError: (a ``ValueError``) naming the file and what was expected.
    """
    expected = f"a vitscope train state ({format})"
    state = read_checkpoint(path, expected=expected)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected {expected}, but it holds a {type(state).__name__}")
    missing = [key for key in (*_STATE_KEYS, *extra_keys) if key not in state]
    if missing:
        raise CheckpointError(f"{path}: expected {expected}, but it lacks {', '.join(missing)}")
    if state["format"] != format:
        raise CheckpointError(f"{path}: expected {expected}, but its format is {state['format']!r}")
    _check_entries(path, state, expected)
    nested = set(defaults or {})  # settings compared field by field
    known = _flat(defaults or {}, nested)
    saved, now, allowed = _flat(state["config"], nested), _flat(config, nested), set(resumable)

    def unchanged(key: str) -> bool:
        if key in saved:
            return saved[key] == now[key]
        return now[key] is None or (key in known and known[key] == now[key])

    changed = sorted(k for k in now if k.split(".")[0] not in allowed and not unchanged(k))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} → {now[k]!r}" for k in changed)
        raise ValueError(f"{path}: cannot resume with different settings ({details})")
    return state


def _flat(config: dict, nested: set[str]) -> dict:
    """The ``nested`` settings spread one level: ``{"objective": {"method": "moco"}}`` ->
    ``{"objective.method": "moco"}``; other settings (``model_kwargs``) stay whole."""
    flat: dict = {}
    for key, value in config.items():
        if key in nested and isinstance(value, dict):
            flat.update({f"{key}.{field}": inner for field, inner in value.items()})
        else:
            flat[key] = value
    return flat


def _check_entries(path: Path, state: dict, expected: str) -> None:
    """The types of a train state's entries, and its model finite."""
    kinds = {"step": int, "model": Mapping, "optimizer": Mapping, "rng": Mapping, "config": Mapping}
    for key, kind in kinds.items():
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise CheckpointError(
                f"{path}: expected {expected}, but its {key!r} entry is a {type(state[key]).__name__}"
            )
    if state["step"] < 0:
        raise CheckpointError(f"{path}: expected {expected}, but its step is {state['step']}")
    bad_model = [k for k, v in state["model"].items() if not isinstance(v, torch.Tensor)]
    if bad_model:
        raise CheckpointError(f"{path}: expected {expected}, but its model entry {bad_model[0]!r} is not a tensor")
    nonfinite = nonfinite_names(state["model"].items())
    if nonfinite:
        raise CheckpointError(
            f"{path} holds non-finite weights ({describe_tensors(nonfinite)}): it was written by a run that "
            "diverged; resume from an earlier copy or start a new run"
        )


def restore_train_state(path: Path, state: dict, *, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any):
    """Load ``state`` (from :func:`read_train_state`) into ``model``, ``optimizer``, ``scaler`` and the
    global RNGs; every tensor's name and shape must match this run's.

    Raises:
        CheckpointError: naming ``path`` and the first entry that does not fit.
    """
    _check_shapes(path, "model", state["model"], model.state_dict())
    model.load_state_dict(state["model"])
    try:
        optimizer.load_state_dict(dict(state["optimizer"]))
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError, AttributeError) as err:
        raise CheckpointError(f"{path}: its optimizer state does not fit this run's optimizer ({err})") from None
    names = {id(p): n for n, p in model.named_parameters()}
    for param, entries in optimizer.state.items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape != param.shape:
                raise CheckpointError(
                    f"{path}: optimizer {key} of {names.get(id(param), 'a parameter')} has shape "
                    f"{list(value.shape)}, this run's parameter {list(param.shape)}"
                )
    try:
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError, AttributeError) as err:
        raise CheckpointError(f"{path}: its scaler or RNG state is not valid ({type(err).__name__}: {err})") from None
    threads = state.get("num_threads")
    if threads is not None and threads != torch.get_num_threads():
        warnings.warn(
            f"{path} was written with {threads} CPU threads, resuming with {torch.get_num_threads()}: "
            "the result will not be bit-identical to an uninterrupted run on CPU",
            stacklevel=2,
        )


def _check_shapes(path: Path, what: str, saved: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> None:
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    if missing or unexpected:
        parts = ([f"lacks {', '.join(missing[:3])}"] if missing else []) + (
            [f"has extra {', '.join(unexpected[:3])}"] if unexpected else []
        )
        detail = "; ".join(parts)
        raise CheckpointError(f"{path}: its {what} does not match this run's ({detail})")
    for key, tensor in own.items():
        if saved[key].shape != tensor.shape:
            raise CheckpointError(
                f"{path}: its {what} tensor {key} has shape {list(saved[key].shape)}, this run's {list(tensor.shape)}"
            )


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
