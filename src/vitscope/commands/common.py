"""What several commands share (this module is not a command): the user-facing error, argument types
that name the flag when a value is wrong, the thread setting, and printing a run's verdict."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from vitscope.results import Results, RunDirectory

__all__ = [
    "CommandError",
    "positive_int",
    "non_negative_int",
    "json_object",
    "set_threads",
    "open_results",
    "print_skipped",
    "verdict_and_report",
    "ROLE_NAMES",
]


class CommandError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def _int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse type for integers ≥ ``minimum``; argparse names the flag in its error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what} (at least {minimum}), got {value}")
        return value

    parse.__name__ = what.replace(" ", "_")
    return parse


positive_int = _int_at_least(1, "a positive integer")
non_negative_int = _int_at_least(0, "a non-negative integer")


def json_object(text: str) -> dict:
    """argparse type: a JSON object (for --model-kwargs)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def set_threads(threads: int | None) -> None:
    """Apply ``--threads`` (a command-line choice, so set here and not in the library)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def save_analysis(output: Any, out_dir: Path) -> RunDirectory:
    """Write an :class:`~vitscope.analyses.AnalysisOutput` (rows, metadata, arrays) to ``out_dir`` and list
    the files it skipped."""
    run_dir = RunDirectory(out_dir)
    run_dir.save_results(output.results)
    run_dir.save_arrays(output.arrays)
    print_skipped(output.results.meta["skipped"])
    return run_dir


def open_results(directory: str) -> tuple[RunDirectory, Results]:
    """A results directory and its rows; a clear error when either is missing."""
    run_dir = RunDirectory(directory)
    try:
        return run_dir, run_dir.check().load_results()
    except FileNotFoundError as err:
        raise CommandError(str(err)) from err


def skipped_summary(skipped: list) -> str:
    """How many unreadable files were skipped, and how many were replaced by an image of their class."""
    replaced = sum("replaced by another image" in reason for _, reason in skipped)
    text = f"skipped {len(skipped)} unreadable file(s)"
    if skipped:
        text += f" ({replaced} replaced by another image of their class, {len(skipped) - replaced} without replacement)"
    return text


def print_skipped(skipped: list, limit: int = 10) -> None:
    """List the unreadable files a run skipped (and replaced), the first ``limit`` of them."""
    import sys

    for path, reason in skipped[:limit]:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if len(skipped) > limit:
        print(f"... and {len(skipped) - limit} more (all listed in metrics.json under meta.skipped)", file=sys.stderr)


ROLE_NAMES = ("cl", "mim", "control", "hybrid")


def verdict_and_report(out_dir: Path, roles: Mapping[str, str | None], render: bool) -> None:
    """Evaluate, save and print the claims (when CL and MIM are named), then render the report."""
    from vitscope.report import Roles, format_claims_table, render_report, write_verdict

    cl, mim = roles.get("cl"), roles.get("mim")
    if cl and mim:
        record = write_verdict(out_dir, Roles(cl, mim, control=roles.get("control"), hybrid=roles.get("hybrid")))
        print(format_claims_table(record.verdicts))
    if render:
        print(f"report: {render_report(out_dir)}")
