"""Stop a real ``vitscope`` process at a chosen point: on the n-th call of a function it sends itself a signal
(SIGKILL by default; SIGINT is a Ctrl-C, SIGSTOP freezes it) or raises an error, before or after the call —
a kill mid-batch, mid-write, between two stages, or a stage that fails."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

RAISE = -1  # as ``signum``: raise RuntimeError("injected fault") instead of sending a signal

_CHILD = r"""
import importlib, os, sys

target, nth, when, signum = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
module_name, _, attr_path = target.partition(":")
owner = importlib.import_module(module_name)
*parents, name = attr_path.split(".")
for part in parents:
    owner = getattr(owner, part)
original = getattr(owner, name)
calls = [0]


def stop():
    if signum < 0:
        raise RuntimeError("injected fault")
    os.kill(os.getpid(), signum)


def wrapper(*args, **kwargs):
    calls[0] += 1
    hit = calls[0] == nth
    if hit and when == "before":
        stop()
    result = original(*args, **kwargs)
    if hit and when == "after":
        stop()
    return result


setattr(owner, name, wrapper)
from vitscope.cli import main

sys.argv = ["vitscope", *sys.argv[5:]]
sys.exit(main(sys.argv[1:]))
"""


def _command(argv: Sequence[str], target: str, nth: int, when: str, signum: int) -> list[str]:
    if when not in ("before", "after"):
        raise ValueError(f"when must be 'before' or 'after', not {when!r}")
    return [sys.executable, "-c", _CHILD, target, str(nth), when, str(int(signum)), *argv]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This checkout's ``src`` first on the path, one thread (the same numbers in every process)."""
    src = str(Path(__file__).resolve().parents[2] / "src")
    return {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1", **(extra or {})}


def run_stopped_at(
    argv: Sequence[str],
    target: str,
    nth: int = 1,
    *,
    when: str = "before",
    signum: int = signal.SIGKILL,
    timeout: float = 120,
) -> subprocess.CompletedProcess:
    """Run ``vitscope ARGV`` in a new Python process that sends itself ``signum`` (or, with :data:`RAISE`,
    raises RuntimeError) at the ``nth`` call of ``target`` (``module:attribute[.attribute]``, e.g.
    ``vitscope.analyses.driver:_run_one`` or ``torch:save``), ``before`` or ``after`` the call runs.
    Returns the finished process (output captured)."""
    command = _command(argv, target, nth, when, signum)
    return subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=timeout)


def start_frozen_at(argv: Sequence[str], target: str, nth: int = 1, timeout: float = 60) -> subprocess.Popen:
    """Start ``vitscope ARGV`` in a new process that freezes itself (SIGSTOP) at the ``nth`` call of
    ``target``; returns once it is frozen. The caller ends it (``proc.kill(); proc.wait()``)."""
    proc = subprocess.Popen(_command(argv, target, nth, "before", signal.SIGSTOP), env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + timeout
    while _state(proc.pid) != "T":
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the process did not reach {target}: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)
    return proc


def _state(pid: int) -> str:
    """The process state letter of /proc/PID/stat (T: stopped), or '' when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def run_vitscope(argv: Sequence[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``vitscope ARGV`` in a new Python process (one thread, as :func:`run_stopped_at`)."""
    command = [sys.executable, "-m", "vitscope", *argv]
    return subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=timeout)
