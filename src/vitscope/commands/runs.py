"""What ``analyze`` and ``demo`` share to write a run (this module is not a command): the output flags,
opening the run directory before any work, the suite with checkpoints, the commit, and one sentence
on what is kept when something stops the run."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vitscope.analyses import AnalysisConfig, AnalysisOutput, analyze
from vitscope.analyses.checkpoint import DEFAULT_EVERY, StageFailed, SuiteCheckpoint, differences, run_identity
from vitscope.commands.common import CommandError, non_negative_int, print_skipped
from vitscope.results import RunDirectory
from vitscope.rundir import RunWriter, new_run_id
from vitscope.runmeta import models_of

__all__ = [
    "add_run_arguments",
    "open_run",
    "analyze_into",
    "commit_run",
    "finished_run_note",
    "report_after_commit",
    "identity_of",
]

INPUT_ERRORS = (ValueError, KeyError, FileNotFoundError)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """``--overwrite``, ``--resume`` and ``--checkpoint-every``."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished run in --out (whole, once the new one is complete) and discard an unfinished one",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the unfinished run in --out where it stopped (same settings); starts afresh when there is none",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=non_negative_int,
        default=DEFAULT_EVERY,
        metavar="N",
        help="save a pass's progress every N batches, 0: at the end of each pass only (default: %(default)s)",
    )


def open_run(args: argparse.Namespace, identity: Mapping[str, Any]) -> tuple[RunWriter, SuiteCheckpoint]:
    """Check ``--out`` and take it (seconds, before any model loads), and check that a run to resume was
    started with the same settings. Raises ValueError (one sentence) when it cannot be written."""
    writer = RunWriter(args.out, overwrite=args.overwrite, resume=args.resume).open()
    checkpoint = SuiteCheckpoint(writer.checkpoint_dir, args.checkpoint_every, run_id=new_run_id())
    try:
        checkpoint.check(identity)
    except ValueError:
        writer.close()
        raise
    if writer.resuming:
        print(f"resuming the unfinished run in {writer.partial}", file=sys.stderr)
    return writer, checkpoint


def finished_run_note(writer: RunWriter, identity: Mapping[str, Any]) -> str:
    """For ``--resume`` on a finished run: what to say (the settings match), or a CommandError naming the
    settings that differ."""
    meta = RunDirectory(writer.path).check().load_results().meta
    models = {label: info.spec or "" for label, info in models_of(meta).items()}
    saved = run_identity(models, meta.get("data", ""), meta.get("config") or {})
    keys = [key for key in identity if not key.startswith("versions.")]
    differ = differences({k: saved.get(k) for k in keys}, {k: identity[k] for k in keys})
    if differ:
        raise CommandError(f"--resume: {writer.path} holds a finished run made with other settings "
                           f"({'; '.join(differ)}); pass --overwrite to replace it")  # fmt: skip
    return (f"{writer.path} already holds this finished run ({RunDirectory(writer.path).run_id}); nothing to resume "
            f"(`vitscope report {writer.path}` redraws its report, --overwrite runs it again)")  # fmt: skip


def analyze_into(
    writer: RunWriter,
    checkpoint: SuiteCheckpoint | None,
    models: Mapping[str, str],
    data: str,
    config: AnalysisConfig,
    command: str = "analyze",
    **options: Any,
) -> AnalysisOutput | None:
    """:func:`~vitscope.analyses.analyze` (``options``: its keyword arguments) with progress saved in
    ``writer``'s staging directory; a Ctrl-C or a failed stage ends with one sentence (``vitscope COMMAND: ...``)
    on what is kept and how to continue."""
    resume = f"run the same command with --resume (--out {writer.path})"
    try:
        return analyze(models, data, config, checkpoint=checkpoint, **options)
    except KeyboardInterrupt:
        kept = checkpoint.kept() if checkpoint is not None else "nothing"
        print(f"\nvitscope {command}: interrupted (Ctrl-C); kept in {writer.partial}: {kept}; to continue, {resume}",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(130) from None
    except StageFailed as err:
        if isinstance(err.cause, OSError):
            raise _cannot_write(writer, err.cause, err.kept) from err
        message = f"{err}; kept in {writer.partial}: {err.kept}; once the cause is fixed, {resume}"
        if isinstance(err.cause, INPUT_ERRORS):
            raise CommandError(message) from err
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1) from err
    except OSError as err:  # writing the checkpoint's first file
        raise _cannot_write(writer, err, checkpoint.kept() if checkpoint is not None else "nothing") from err


def _cannot_write(writer: RunWriter, err: OSError, kept: str) -> CommandError:
    """A write into the staging directory failed (a full disk): ``--out`` is untouched, and what is kept."""
    return CommandError(
        f"cannot write into {writer.partial} ({err.strerror or err}); {writer.path} is unchanged; kept: {kept}; "
        "make room and run the same command with --resume"
    )


def commit_run(writer: RunWriter, output: AnalysisOutput, run_id: str) -> RunDirectory:
    """Write the rows, metadata and arrays into the staging directory and commit it as ``--out``; a write
    that fails (a full disk) leaves ``--out`` as it was and says so."""
    output.results.meta["run_id"] = run_id
    stage = writer.stage
    try:
        stage.save_results(output.results)
        stage.save_arrays(output.arrays)
        run_dir = writer.commit(run_id)
    except OSError as err:
        raise _cannot_write(writer, err, "the whole analysis (checkpoint)") from err
    print_skipped(output.results.meta["skipped"])
    return run_dir


def report_after_commit(out: Path, write: Callable[[], None]) -> None:
    """Run ``write`` (the verdict and the report, after the run is committed); when it fails, say that the run
    is kept and how to redraw the report, and exit with status 1."""
    try:
        write()
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        print(f"error: the run is saved in {out}, but its verdict or report could not be written ({reason}); "
              f"write them with `vitscope claims {out} ...` / `vitscope report {out}`", file=sys.stderr)  # fmt: skip
        raise SystemExit(1) from err


def identity_of(models: Mapping[str, str], data: str, config: AnalysisConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the run it continues (see :func:`run_identity`)."""
    return run_identity(models, data, asdict(config))
