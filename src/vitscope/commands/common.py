"""What several commands share (this module is not a command): the user-facing error, argument types
that name the flag when a value is wrong, the thread setting, and printing a run's verdict."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from vitscope.results import Results, RunDirectory

__all__ = [
    "CommandError",
    "positive_int",
    "non_negative_int",
    "finite_float",
    "positive_float",
    "non_negative_float",
    "fraction",
    "device_name",
    "add_spectrum_groups_argument",
    "require_device",
    "check_roles",
    "json_object",
    "ModelKwargs",
    "DefaultsFormatter",
    "add_warmup_arguments",
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


def finite_float(
    low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """An argparse type for a finite float in a range (NaN and ±inf are refused); argparse names the flag.

    ``finite_float()`` takes any finite number, ``finite_float(0, low_open=True)`` a positive one,
    ``finite_float(0, 1)`` a number in [0, 1].
    """

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            left = "(-∞" if low is None else f"{'(' if low_open else '['}{low:g}"
            right = "∞)" if high is None else f"{high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be in {left}, {right}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


positive_float = finite_float(0.0, low_open=True)
non_negative_float = finite_float(0.0)
fraction = finite_float(0.0, 1.0)


def _spectrum_groups(text: str) -> int | None:
    """argparse type for ``--spectrum-groups``: a positive number of groups, or ``all`` (None: every group)."""
    if text.strip().lower() == "all":
        return None
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None


def device_name(text: str) -> str:
    """argparse type for ``--device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; anything else (``tpu``,
    ``cuda:x``) is refused naming the flag. Whether this machine has the device is :func:`require_device`'s
    check, made by the command before any work (so a command line written for a GPU machine still parses)."""
    import torch

    name = text.strip().lower()
    if name == "auto":
        return name
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; expected auto, cpu, cuda, cuda:N or mps")
    return name


def require_device(name: str, flag: str = "--device") -> None:
    """Raise :class:`CommandError` unless this machine has the device ``name`` (``auto`` always passes)."""
    import torch

    if name == "auto":
        return
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise CommandError(f"{flag} {name}: no CUDA device on this machine (use cpu)")
        if device.index is not None and device.index >= count:
            raise CommandError(f"{flag} {name}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise CommandError(f"{flag} {name}: MPS is not available on this machine (use cpu)")


def json_object(text: str) -> dict:
    """argparse type: a JSON object (for --model-kwargs)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


class ModelKwargs(argparse.Action):
    """``--model-kwargs``: a JSON object, or ``key=value`` items as timm's scripts take them
    (``img_size=28 patch_size=4``; each value read as a Python literal, else kept as text). Items merge in order."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs) -> None:
        kwargs.setdefault("nargs", "+")
        kwargs.setdefault("default", {})
        kwargs.setdefault("metavar", "KEY=VALUE")
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        merged = dict(getattr(namespace, self.dest, None) or {})
        for item in [values] if isinstance(values, str) else list(values or []):
            try:
                merged.update(parse_model_kwargs(item))
            except argparse.ArgumentTypeError as err:
                parser.error(f"argument {option_string}: {err}")
        setattr(namespace, self.dest, merged)


def parse_model_kwargs(text: str) -> dict:
    """One ``--model-kwargs`` item: a JSON object (``{"depth": 6}``) or ``key=value`` (``depth=6``)."""
    import ast

    if text.lstrip().startswith("{"):
        return json_object(text)
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE or a JSON object, got {text!r}")
    try:
        parsed = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        parsed = value.strip()
    return {key.strip(): parsed}


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that ends each flag's text with its default, unless the text already says it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        shown = json.dumps(default) if isinstance(default, dict) else "%(default)s"
        return f"{text} (default: {shown})"


def add_tracking_arguments(group: argparse._ActionsContainer, *, subject: str) -> None:
    """``--track-every`` and ``--track-images`` of the training commands; ``subject`` names what is measured."""
    group.add_argument(
        "--track-every",
        type=positive_int,
        default=None,
        help=f"every N optimizer steps (and before the first) measure the {subject} on fixed held-out test images: "
        "attention/token metrics per block, kNN top-1, embedding spread -> log.jsonl and OUT/tensorboard/",
    )
    group.add_argument(
        "--track-images",
        type=positive_int,
        default=64,
        help="held-out images of the per-token metrics when tracking (default: %(default)s; kNN uses 512)",
    )


def add_spectrum_groups_argument(parser: argparse._ActionsContainer) -> None:
    """``--spectrum-groups G|all`` (``analyze``, ``demo``): how many groups feed the spectrum metrics."""
    from vitscope.analyses.moments import SPECTRUM_GROUPS  # not at import: it loads torch

    parser.add_argument(
        "--spectrum-groups",
        type=_spectrum_groups,
        default=SPECTRUM_GROUPS,
        help="groups of 2 test images (the first ones) whose spectra give singular_values and effective_rank, "
        "or 'all' (default: %(default)s)",
    )


def add_warmup_arguments(group: argparse._ActionsContainer, *, default: str) -> None:
    """``--warmup-steps`` and ``--warmup-epochs``: either one (argparse refuses both), ``default`` when neither."""
    both = group.add_mutually_exclusive_group()
    both.add_argument(
        "--warmup-steps",
        type=non_negative_int,
        default=None,
        help=f"linear warmup in optimizer steps (default: {default})",
    )
    both.add_argument(
        "--warmup-epochs",
        type=non_negative_float,
        default=None,
        help="linear warmup in epochs (steps = epochs × steps per epoch, rounded); or give --warmup-steps",
    )


def set_threads(threads: int | None) -> None:
    """Apply ``--threads`` (a command-line choice, so set here and not in the library)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


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


def check_roles(roles: Mapping[str, str | None], labels: list[str], known: str = "one of the models") -> None:
    """Raise :class:`CommandError` unless every role's label (``--cl`` ...) is one of ``labels`` and no two
    roles name the same model. ``known`` says where the labels come from, in the message."""
    given = {role: label for role, label in roles.items() if label is not None}
    for role, label in given.items():
        if label not in labels:
            raise CommandError(f"--{role} {label!r} is not {known}: {', '.join(labels) or 'none'}")
    seen: dict[str, str] = {}
    for role, label in given.items():
        if label in seen:
            raise CommandError(f"--{seen[label]} and --{role} both name {label!r}: each role needs its own model")
        seen[label] = role


def verdict_and_report(
    out_dir: Path, roles: Mapping[str, str | None], render: bool, other_mims: Sequence[str] = ()
) -> None:
    """Evaluate, save and print the claims (when CL and MIM are named; again with each of ``other_mims``
    as the MIM model, saved beside them and printed as one line each) and render the report; last, the
    one-line summary with the report's path."""
    from vitscope.report import Roles, format_claims_table, render_report, write_verdict
    from vitscope.report.claims import print_warnings, summary_line

    cl, mim = roles.get("cl"), roles.get("mim")
    record = None
    if cl and mim:
        main_roles = Roles(cl, mim, control=roles.get("control"), hybrid=roles.get("hybrid"))
        others = [dataclasses.replace(main_roles, mim=other) for other in other_mims]
        record = write_verdict(out_dir, main_roles, others)
        print(format_claims_table(record.verdicts))
    report = f"report: {render_report(out_dir)}" if render else ""
    for other in record.others if record is not None else ():
        print(f"with {other.roles.mim} as MIM: {summary_line(other.verdicts)} (in claims.json and the report)")
    if record is None:
        if report:
            print(report)
        return
    print_warnings(record.verdicts)
    print(summary_line(record.verdicts, report or "no report (--no-report)"))
