"""Checkpoints of the analysis suite: what a stopped ``analyze`` computed, so that ``--resume`` continues
from there and ends with the numbers of a run that never stopped.

Files in the checkpoint directory (``.DIR.partial/checkpoint/``), each written atomically and read
with ``torch.load(weights_only=True)``:

- ``run.json``: what the run is (models, data, configuration, versions, digests of the model weights
  and of the chosen images) and its run id; a resumed run must be the same run.
- ``<pass>.pt``: a lockstep pass (``test``: the metrics pass, ``train``: the probe features) — the next
  batch, the images seen, the files skipped and every model's reducers as
  :meth:`~vitscope.analyses.reducer.Reducer.snapshot`; rewritten every ``every`` batches and when the
  pass ends.
- ``<pass>.features-NNNN.pt``: the probe-feature batches added since the previous save (append-only,
  so a save costs what it adds, not the whole bank).
- ``probes-K.pt``, ``noise-K.pt`` (model K), ``tsne.pt``: later stages, each saved once done.

Ctrl-C during a pass stops at the end of the batch, after a save; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitscope.analyses.driver import ModelPass
from vitscope.analyses.probes import FeatureBank
from vitscope.data import SkipCounter
from vitscope.io import atomic_path, write_json_atomic

__all__ = [
    "SuiteCheckpoint",
    "PassProgress",
    "ResumeMismatch",
    "StageFailed",
    "run_identity",
    "weights_digest",
    "plain",
]

DEFAULT_EVERY = 20  # batches between two saves of a pass


class ResumeMismatch(ValueError):
    """The run asked for is not the run the checkpoint holds (the message names what differs)."""


class StageFailed(RuntimeError):
    """A stage of the suite failed; what earlier stages computed is kept in the checkpoint."""

    def __init__(self, stage: str, cause: BaseException, kept: str) -> None:
        super().__init__(f"the {stage} stage failed: {type(cause).__name__}: {cause}")
        self.stage, self.cause, self.kept = stage, cause, kept


@dataclass
class PassProgress:
    """Where a lockstep pass stands: the run-wide number of the next batch, images seen, files skipped."""

    next_batch: int = 0
    seen: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    done: bool = False


def run_identity(models: Mapping[str, str], data: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """What makes two runs the same run, flat (``models.LABEL``, ``config.FIELD``, ``versions.NAME``).

    ``num_workers`` is left out (it does not change a number); the device enters by its kind (cpu, cuda).
    """
    import timm

    import vitscope

    identity: dict[str, Any] = {"data": data, "models": list(models)}
    identity.update({f"models.{label}": spec for label, spec in models.items()})
    for key, value in config.items():
        if key == "num_workers":
            continue
        if key == "device":
            key, value = "device", torch.device(str(value)).type
        identity[f"config.{key}"] = sorted(value) if isinstance(value, (list, tuple, set)) else value
    identity.update({"versions.vitscope": vitscope.__version__, "versions.torch": torch.__version__,
                     "versions.timm": timm.__version__})  # fmt: skip
    return identity


def weights_digest(model: nn.Module) -> str:
    """BLAKE2b of every parameter and buffer of ``model`` (names, shapes, dtypes and bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        flat = tensor.detach().reshape(-1).contiguous().cpu()
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def array_digest(*arrays: np.ndarray) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``KEY: OLD then, NEW now`` for every key whose value differs."""
    out = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key, "absent"), current.get(key, "absent")
        if old != new:
            out.append(f"{key}: {_short(old)} then, {_short(new)} now")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def plain(value: Any) -> Any:
    """``value`` with NumPy scalars as Python numbers and arrays as tensors (what weights_only loads)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(item) for item in value)
    return value


class SuiteCheckpoint:
    """Saves and restores the suite's progress in ``directory`` (nothing is saved when it is None).

    Args:
        directory: the checkpoint directory, or None for a run that keeps nothing.
        every: batches of a pass between two saves (0: only at the end of each pass).
        run_id: the id of a new run (a resumed run keeps the id it was started with).
    """

    def __init__(
        self, directory: str | os.PathLike | None = None, every: int = DEFAULT_EVERY, run_id: str | None = None
    ) -> None:
        if every < 0:
            raise ValueError(f"checkpoint every must be ≥ 0 batches, got {every}")
        self.directory = None if directory is None else Path(directory)
        self.every = every
        self.run_id = run_id  # the saved run's id once begin() found one
        self.restored: list[str] = []  # what a resumed run took from the checkpoint, in words
        self.saved: dict[str, str] = {}  # stage -> what is saved of it, in words
        self._chunks: dict[str, list[str]] = {}
        self._bank_counts: dict[tuple[str, int, int], int] = {}
        self._interrupted = False

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    # -- identity ---------------------------------------------------------------------------------
    def saved_identity(self) -> dict[str, Any] | None:
        if self.directory is None or not (self.directory / "run.json").is_file():
            return None
        path = self.directory / "run.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ResumeMismatch(f"{path}: unreadable checkpoint ({err}); start again with --overwrite") from err

    def check(self, identity: Mapping[str, Any]) -> None:
        """Raise :class:`ResumeMismatch` naming every key of ``identity`` the saved run has with another value."""
        saved = self.saved_identity()
        if saved is None:
            return
        known = {key: value for key, value in saved["identity"].items() if key in identity}
        differ = differences(known, identity)
        if differ:
            raise ResumeMismatch(
                f"cannot resume: the unfinished run in {self.directory.parent if self.directory else '?'} was "
                f"started with other settings ({'; '.join(differ)}); resume with the same settings, or start "
                "again with --overwrite"
            )

    def begin(self, identity: Mapping[str, Any]) -> None:
        """Check ``identity`` against the saved run and take its run id, or record it (with :attr:`run_id`)."""
        if self.directory is None:
            return
        saved = self.saved_identity()
        if saved is not None:
            self.check(identity)
            self.run_id = saved.get("run_id") or self.run_id
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.directory / "run.json", {"run_id": self.run_id, "identity": dict(identity)})

    # -- files ------------------------------------------------------------------------------------
    def load(self, name: str) -> Any | None:
        """The payload saved as ``name`` (None when absent)."""
        if self.directory is None:
            return None
        path = self.directory / f"{name}.pt"
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # any unreadable file gets the same sentence
            raise ResumeMismatch(f"{path}: unreadable checkpoint ({type(err).__name__}: {err}); "
                                 "start again with --overwrite") from err  # fmt: skip

    def save(self, name: str, payload: Any, note: str | None = None) -> None:
        """Save ``payload`` (plain containers, tensors, NumPy arrays) as ``name``, atomically."""
        if self.directory is None:
            return
        with atomic_path(self.directory / f"{name}.pt") as tmp:
            torch.save(plain(payload), tmp)
        if note:
            self.saved[name] = note

    # -- passes -----------------------------------------------------------------------------------
    def restore_pass(self, name: str, passes: list[ModelPass], device: str | torch.device) -> PassProgress:
        """Put the saved state of pass ``name`` back into ``passes`` (fresh reducers) and say where it stood."""
        state = self.load(name)
        if state is None:
            return PassProgress()
        shapes = [[type(r).__name__ for r in run.reducers] for run in passes]
        if [m["label"] for m in state["models"]] != [run.label for run in passes] or state["reducers"] != shapes:
            raise ResumeMismatch(f"{self.directory}/{name}.pt: saved for other models or analyses; "
                                 "start again with --overwrite")  # fmt: skip
        banks: dict[tuple[int, int], list[dict]] = {}
        for chunk in state["chunks"]:
            for key, batches in (self.load(chunk) or {}).items():
                banks.setdefault(tuple(key), []).extend(batches)
        for m, (run, saved) in enumerate(zip(passes, state["models"])):
            run.image_hw = None if saved["image_hw"] is None else tuple(saved["image_hw"])
            run.layouts = {int(depth): layout for depth, layout in saved["layouts"].items()}
            for r, (reducer, snapshot) in enumerate(zip(run.reducers, saved["snapshots"])):
                if isinstance(reducer, FeatureBank):
                    reducer.merge([{"depths": snapshot["depths"], "batches": banks.get((m, r), [])}])
                    self._bank_counts[(name, m, r)] = reducer.num_batches
                else:
                    reducer.restore(snapshot, device)
        self._chunks[name] = list(state["chunks"])
        progress = PassProgress(state["next_batch"], state["seen"], [tuple(s) for s in state["skipped"]], state["done"])
        self.restored.append(f"{name} pass " + ("(done)" if progress.done else f"from batch {progress.next_batch}"))
        return progress

    def save_pass(self, name: str, passes: list[ModelPass], progress: PassProgress, total: int) -> None:
        """Save pass ``name``: the new probe-feature batches as one chunk, then the pass's state (the chunk
        is used only once the state that lists it is written)."""
        if self.directory is None:
            return
        chunks = list(self._chunks.get(name, []))
        new: dict[tuple[int, int], list[dict]] = {}
        for m, run in enumerate(passes):
            for r, reducer in enumerate(run.reducers):
                if isinstance(reducer, FeatureBank):
                    added = reducer.batches_since(self._bank_counts.get((name, m, r), 0))
                    if added:
                        new[(m, r)] = added
        if new:
            chunk = f"{name}.features-{len(chunks):04d}"
            self.save(chunk, new)
            chunks.append(chunk)
        state = {
            "next_batch": progress.next_batch,
            "seen": progress.seen,
            "skipped": [list(item) for item in progress.skipped],
            "done": progress.done,
            "reducers": [[type(r).__name__ for r in run.reducers] for run in passes],
            "chunks": chunks,
            "models": [_pass_model(run) for run in passes],
        }
        self.save(name, state, note=f"{name} pass: " + ("done" if progress.done else
                                                         f"{progress.next_batch} of {total} batches"))  # fmt: skip
        self._chunks[name] = chunks
        for m, run in enumerate(passes):
            for r, reducer in enumerate(run.reducers):
                if isinstance(reducer, FeatureBank):
                    self._bank_counts[(name, m, r)] = reducer.num_batches

    def after_batch(
        self, name: str, passes: list[ModelPass], progress: PassProgress, skips: SkipCounter, total: int
    ) -> Callable[[int, int], None] | None:
        """The driver's ``after_batch`` hook for pass ``name``: saves every ``every`` batches, and at once
        (then stops) after a Ctrl-C."""
        if self.directory is None:
            return None
        start_seen, since = progress.seen, [0]

        def hook(number: int, seen: int) -> None:
            progress.next_batch, progress.seen = number + 1, start_seen + seen
            since[0] += 1
            if self._interrupted or (self.every and since[0] >= self.every):
                progress.skipped = list(skips.skipped)
                self.save_pass(name, passes, progress, total)
                since[0] = 0
            if self._interrupted:
                raise KeyboardInterrupt

        return hook

    # -- stages -----------------------------------------------------------------------------------
    @contextmanager
    def stage(self, name: str, *, defer_interrupts: bool = False) -> Iterator[None]:
        """Run one stage: an error becomes :class:`StageFailed` (naming the stage, what is kept) when
        checkpoints are on; with ``defer_interrupts`` a Ctrl-C waits for the end of the batch."""
        previous = None
        if self.enabled and defer_interrupts and threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, self._on_interrupt)
        try:
            yield
        except KeyboardInterrupt:
            raise
        except Exception as err:
            if self._interrupted:  # e.g. a data loader worker stopped by the same Ctrl-C
                raise KeyboardInterrupt from err
            if self.enabled:
                raise StageFailed(name, err, self.kept()) from err
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            self._interrupted = False

    def _on_interrupt(self, signum: int, frame: Any) -> None:
        if self._interrupted:
            raise KeyboardInterrupt
        self._interrupted = True
        print("\nstopping after this batch to save the progress (Ctrl-C again to stop at once)", file=sys.stderr)

    def kept(self) -> str:
        """What the checkpoint holds, in words."""
        return "; ".join(self.saved.values()) if self.saved else "nothing yet"


def _pass_model(run: ModelPass) -> dict[str, Any]:
    snapshots = []
    for reducer in run.reducers:
        if isinstance(reducer, FeatureBank):  # its batches go to the chunks
            snapshots.append({"depths": list(reducer.depths), "count": reducer.num_batches})
        else:
            snapshots.append(reducer.snapshot())
    return {"label": run.label, "image_hw": run.image_hw, "layouts": dict(run.layouts), "snapshots": snapshots}
