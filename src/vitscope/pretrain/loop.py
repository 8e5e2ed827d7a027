"""The one training loop, apart from the set-up: steps, log, progress, checkpoints, divergence.

Pretraining and fine-tuning are each a step function (``step -> named floats``) plus their own
checkpoint writer; :func:`run_loop` drives either: it times every step, appends one ``log.jsonl``
line per step (rank 0), shows one progress bar (rank 0), runs a hook after each step (fine-tuning's
per-epoch evaluation) and writes checkpoints every ``save_every`` steps and at the end (rank 0; the
other ranks wait at a barrier).

Nothing poisoned is kept: the run stops (:class:`TrainingDiverged`, naming the step, what went
non-finite and the last good checkpoint, which stays untouched) when a step's loss or gradient norm
is not finite (that step is not applied) or when, before a checkpoint, a parameter, buffer or
optimizer state holds a NaN or an infinity. Ctrl-C during a checkpoint write lets the write finish;
Ctrl-C anywhere ends the loop with :class:`TrainingInterrupted` naming the checkpoint kept.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import torch
import torch.distributed as dist

from vitscope.distributed import DistEnv, all_sum
from vitscope.pretrain.finite import NonFiniteGradient, describe_tensors
from vitscope.progress import progress_bar

if TYPE_CHECKING:
    from vitscope.pretrain.tracking import Tracker

__all__ = ["TrainingDiverged", "TrainingInterrupted", "CheckpointWriteFailed", "Checkpointing", "StepHook", "run_loop"]

StepFn = Callable[[int], dict[str, float]]
StepHook = Callable[[int], "tuple[dict[str, Any], str] | None"]


class TrainingDiverged(RuntimeError):
    """The loss, the gradient norm or the trained state became NaN or infinite; the run stopped and
    the last good checkpoint was kept untouched."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped the run; the message names the checkpoint kept."""


class CheckpointWriteFailed(OSError):
    """The run could not write its log or a checkpoint (a full disk); the message names the cause and
    the checkpoint kept (the previous one: every file is replaced only when written whole)."""


@dataclass
class Checkpointing:
    """When and how a run saves: ``write(step)`` every ``every`` steps and at the end (rank 0), and
    ``keep(step)`` every ``keep_every`` steps (snapshots along the way), also rank 0 only.

    ``nonfinite()`` lists the non-finite tensors of the state about to be saved (every rank calls it
    before any save); a non-empty list stops the run instead of saving.
    """

    every: int
    write: Callable[[int], None]
    keep_every: int | None = None
    keep: Callable[[int], None] | None = None
    state_path: Path | None = None  # named in the divergence message
    nonfinite: Callable[[], list[str]] | None = None


@contextmanager
def deferred_interrupt() -> Iterator[list[int]]:
    """Hold SIGINT while the block runs (a checkpoint write finishes whole); the yielded list receives the
    signals held, for the caller to act on after the block.

    Only the main thread can install signal handlers, and only Python's own SIGINT handler (the one
    that raises KeyboardInterrupt) is replaced; otherwise the block runs unguarded.
    """
    received: list[int] = []
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield received
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)


def _steps(count: int) -> str:
    return f"{count} step" if count == 1 else f"{count} steps"


def _close_quietly(log: TextIO) -> None:
    """Close the log; after a failed write (a full disk) its unwritten tail is dropped, not raised again."""
    with suppress(OSError):
        log.close()


def _append(log: TextIO, record: dict) -> None:
    """One line of the step log, flushed; a failed write (a full disk) names the file."""
    try:
        log.write(json.dumps(record) + "\n")
        log.flush()
    except OSError as err:
        raise OSError(err.errno, err.strerror, log.name) from None


def _saved_step(state_path: Path | None, fallback: int) -> int:
    """The step of the train state on disk (a write may have failed after the state went through)."""
    if state_path is None or not state_path.is_file():
        return fallback
    try:
        return int(torch.load(state_path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception:
        return fallback


def _kept(checkpointing: Checkpointing, out: Path, last_saved: int) -> str:
    if last_saved == 0:
        return "none written yet"
    return f"{checkpointing.state_path or out}, step {last_saved}"


def _progress(start: int, total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    return progress_bar(total=total, initial=start, desc=desc, unit="step")


def run_loop(
    step_fn: StepFn,
    *,
    start: int,
    total: int,
    env: DistEnv,
    out: Path,
    checkpointing: Checkpointing,
    images_per_step: int,
    progress: bool = True,
    log_every: int = 1,
    after_step: StepHook | None = None,
    desc: str = "train",
    tracker: Tracker | None = None,
) -> list[float]:
    """Run steps ``start .. total − 1`` of a training run; return the losses of the steps run.

    Args:
        step_fn: one optimizer step; returns named floats for the log, ``loss`` (averaged over ranks)
            and ``lr`` among them.
        out: the run directory (rank 0 appends to its ``log.jsonl``).
        checkpointing: what to save when.
        images_per_step: the global batch, for images/s.
        after_step: called with the number of steps done, on every rank; may return a record for the
            log and a line to print (fine-tuning's evaluation after each epoch).
        tracker: rank 0's measurements (:mod:`vitscope.pretrain.tracking`), before the first step and
            when due after a step; their records go to the log, their lines to the progress bar.
    """
    from vitscope.pretrain.checkpoint import LOG_FILE

    losses: list[float] = []
    step_seconds = 0.0  # the steps' own time, for tracking's share
    last_saved = start
    completed = start  # steps done when Ctrl-C came
    with ExitStack() as stack:
        log = None
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            log = open(out / LOG_FILE, "a")  # noqa: SIM115 - closed by the stack, quietly (below)
            stack.callback(_close_quietly, log)
        bar = _progress(start, total, env.is_main and progress, desc)
        if bar is not None:
            stack.callback(bar.close)
        if tracker is not None:
            stack.callback(tracker.close)
        try:
            if tracker is not None and tracker.due(start):
                _track(tracker, start, log, bar)
            for step in range(start, total):
                tick = time.perf_counter()
                try:
                    record = step_fn(step)
                except NonFiniteGradient as err:
                    raise TrainingDiverged(
                        f"{err} at step {step}; stopped before the optimizer step. "
                        f"The last good checkpoint ({_kept(checkpointing, out, last_saved)}) was kept."
                    ) from None
                loss = float(record["loss"])
                if not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss is {loss} at step {step}; stopped before the optimizer step. "
                        f"The last good checkpoint ({_kept(checkpointing, out, last_saved)}) was kept."
                    )
                losses.append(loss)
                done = completed = step + 1
                seconds = time.perf_counter() - tick
                step_seconds += seconds
                rate = images_per_step / max(seconds, 1e-9)
                if log is not None and (done % log_every == 0 or done == total):
                    _append(log, {"step": step, **record, "images_per_s": rate})
                    if tracker is not None:
                        tracker.log_step(done, {**record, "images_per_s": rate})
                if bar is not None:
                    alert = {"warn": tracker.alert} if tracker is not None and tracker.alert else {}
                    bar.set_postfix(
                        loss=f"{loss:.4f}",
                        lr=f"{record.get('lr', math.nan):.2e}",
                        img_s=f"{rate:.0f}",
                        **alert,
                        refresh=False,
                    )
                    bar.update(1)
                report = after_step(done) if after_step is not None else None
                if report is not None and env.is_main:
                    extra, message = report
                    if log is not None:
                        _append(log, {"step": step, **extra})
                    if tracker is not None:
                        tracker.log_step(done, extra, prefix="eval")
                    (bar.write if bar is not None else print)(message)
                if tracker is not None and tracker.due(done):
                    _track(tracker, done, log, bar)
                saved, interrupted = _save(checkpointing, done, total, env, out, last_saved)
                last_saved = done if saved else last_saved
                if interrupted:
                    raise KeyboardInterrupt
            if tracker is not None and step_seconds > 0:
                (bar.write if bar is not None else print)(tracker.overhead(step_seconds))
        except OSError as err:
            reason = f"{err.filename}: {err.strerror}" if err.filename and err.strerror else str(err)
            kept = _kept(checkpointing, out, _saved_step(checkpointing.state_path, last_saved))
            raise CheckpointWriteFailed(
                f"cannot write the run in {out} after {_steps(completed)} ({reason}); the last checkpoint ({kept}) "
                "is kept: make room and continue with --resume"
            ) from err
        except KeyboardInterrupt:
            raise TrainingInterrupted(
                f"interrupted after {_steps(completed)}; the last checkpoint ({_kept(checkpointing, out, last_saved)}) "
                "is kept: continue with --resume"
            ) from None
    return losses


def _track(tracker: Tracker, done: int, log: TextIO | None, bar: Any) -> None:
    """One measurement: its record to the log, its summary to the progress bar, its warnings to both."""
    record, summary, warnings = tracker.measure(done)
    if log is not None:
        _append(log, record)
    if bar is not None:
        bar.write(summary)
    for line in warnings:
        (bar.write if bar is not None else print)(line)


def _save(
    checkpointing: Checkpointing, done: int, total: int, env: DistEnv, out: Path, last_saved: int
) -> tuple[bool, bool]:
    """Keep a snapshot and write the checkpoint when due after ``done`` steps, once the state is checked
    finite on every rank; returns whether the checkpoint was written and whether Ctrl-C came meanwhile."""
    keep_due = bool(checkpointing.keep_every and done % checkpointing.keep_every == 0)
    write_due = done % checkpointing.every == 0 or done == total
    if not (keep_due or write_due):
        return False, False
    bad = checkpointing.nonfinite() if checkpointing.nonfinite is not None else []
    if all_sum(int(bool(bad)), env):
        what = describe_tensors(bad) if bad else "the state of another process"
        raise TrainingDiverged(
            f"non-finite values after step {done - 1} in {what}; stopped without saving them. "
            f"The last good checkpoint ({_kept(checkpointing, out, last_saved)}) was kept."
        )
    with deferred_interrupt() as interrupts:
        if keep_due and env.is_main:
            assert checkpointing.keep is not None
            checkpointing.keep(done)
        if write_due and env.is_main:
            checkpointing.write(done)
    if write_due and env.world > 1:
        dist.barrier()
    return write_due, bool(interrupts)
