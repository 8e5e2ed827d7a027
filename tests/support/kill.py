"""Stop a real ``vitscope`` process at a chosen point: it signals itself (SIGKILL by default) on the n-th call
of a function, before or after the call runs — a kill mid-batch, mid-write, between two stages."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

_CHILD = r"""
import importlib, os, signal, sys

target, nth, when, signum = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
module_name, _, attr_path = target.partition(":")
owner = importlib.import_module(module_name)
*parents, name = attr_path.split(".")
for part in parents:
    owner = getattr(owner, part)
original = getattr(owner, name)
calls = [0]


def wrapper(*args, **kwargs):
    calls[0] += 1
    hit = calls[0] == nth
    if hit and when == "before":
        os.kill(os.getpid(), signum)
    result = original(*args, **kwargs)
    if hit and when == "after":
        os.kill(os.getpid(), signum)
    return result


setattr(owner, name, wrapper)
from vitscope.cli import main

sys.exit(main(sys.argv[5:]))
"""


def run_stopped_at(
    argv: Sequence[str],
    target: str,
    nth: int = 1,
    *,
    when: str = "before",
    signum: int = signal.SIGKILL,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess:
    """Run ``vitscope ARGV`` in a new Python process that sends itself ``signum`` at the ``nth`` call of
    ``target`` (``module:attribute[.attribute]``, e.g. ``vitscope.analyses.driver:_run_one`` or
    ``torch:save``), ``before`` or ``after`` the call. Returns the finished process (output captured)."""
    if when not in ("before", "after"):
        raise ValueError(f"when must be 'before' or 'after', not {when!r}")
    src = str(Path(__file__).resolve().parents[2] / "src")
    child_env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-c", _CHILD, target, str(nth), when, str(int(signum)), *argv]
    return subprocess.run(command, env=child_env, capture_output=True, text=True, timeout=timeout)


def run_vitscope(
    argv: Sequence[str], env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run ``vitscope ARGV`` in a new Python process (one thread, as :func:`run_stopped_at`)."""
    src = str(Path(__file__).resolve().parents[2] / "src")
    child_env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-m", "vitscope", *argv]
    return subprocess.run(command, env=child_env, capture_output=True, text=True, timeout=timeout)
