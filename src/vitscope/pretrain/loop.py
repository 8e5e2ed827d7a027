"""The one training loop, apart from the set-up: steps, log, progress, checkpoints, divergence.

Pretraining and fine-tuning are each a step function (``step -> named floats``) plus their own
checkpoint writer; :func:`run_loop` drives either: it times every step, stops on a non-finite loss
with the last good checkpoint named, appends one ``log.jsonl`` line per step (rank 0), shows one
progress bar (rank 0), runs a hook after each step (fine-tuning's per-epoch evaluation) and writes
checkpoints every ``save_every`` steps and at the end (rank 0; the other ranks wait at a barrier).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from vitscope.distributed import DistEnv

__all__ = ["TrainingDiverged", "Checkpointing", "StepHook", "run_loop"]

StepFn = Callable[[int], dict[str, float]]
StepHook = Callable[[int], "tuple[dict[str, Any], str] | None"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint was kept."""


@dataclass
class Checkpointing:
    """When and how a run saves: ``write(step)`` every ``every`` steps and at the end (rank 0), and
    ``keep(step)`` every ``keep_every`` steps (snapshots along the way), also rank 0 only."""

    every: int
    write: Callable[[int], None]
    keep_every: int | None = None
    keep: Callable[[int], None] | None = None
    state_path: Path | None = None  # named in the divergence message


def _progress(start: int, total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True)


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
    """
    from vitscope.pretrain.checkpoint import LOG_FILE

    losses: list[float] = []
    last_saved = start
    with ExitStack() as stack:
        log = None
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            log = stack.enter_context(open(out / LOG_FILE, "a"))  # closed by the stack
        bar = _progress(start, total, env.is_main and progress, desc)
        if bar is not None:
            stack.callback(bar.close)
        for step in range(start, total):
            tick = time.perf_counter()
            record = step_fn(step)
            loss = float(record["loss"])
            if not math.isfinite(loss):
                kept = f"{checkpointing.state_path or out}, step {last_saved}" if last_saved > 0 else "none written yet"
                raise TrainingDiverged(
                    f"loss is {loss} at step {step}; stopped. The last good checkpoint ({kept}) was kept."
                )
            losses.append(loss)
            done = step + 1
            rate = images_per_step / max(time.perf_counter() - tick, 1e-9)
            if log is not None and (done % log_every == 0 or done == total):
                log.write(json.dumps({"step": step, **record, "images_per_s": rate}) + "\n")
            if bar is not None:
                bar.set_postfix(
                    loss=f"{loss:.4f}", lr=f"{record.get('lr', math.nan):.2e}", img_s=f"{rate:.0f}", refresh=False
                )
                bar.update(1)
            report = after_step(done) if after_step is not None else None
            if report is not None and env.is_main:
                extra, message = report
                if log is not None:
                    log.write(json.dumps({"step": step, **extra}) + "\n")
                (bar.write if bar is not None else print)(message)
            if log is not None:
                log.flush()
            if checkpointing.keep_every and done % checkpointing.keep_every == 0 and env.is_main:
                assert checkpointing.keep is not None
                checkpointing.keep(done)
            if done % checkpointing.every == 0 or done == total:
                if env.is_main:
                    checkpointing.write(done)
                last_saved = done
                if env.world > 1:
                    dist.barrier()
    return losses
