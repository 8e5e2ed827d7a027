"""A run directory as one unit: written aside, committed by one rename, one writer at a time.

A run (``vitscope analyze --out DIR``) is written into ``.DIR.partial/`` beside ``DIR``; when every
file is there, ``manifest.json`` is written last and the staging directory takes ``DIR``'s place in
one rename (an atomic exchange where the file system has one), so ``DIR`` holds either the old run or
the new one, never a mix. A later change of a committed run (``claims.json``, figures, the report) goes
the same way through ``.DIR.update/``, a copy made of hard links. ``.DIR.lock`` (``fcntl.flock``)
admits one writer; a second one is refused with the first one's process, host and command.

Beside ``DIR`` in its parent::

    DIR/            the committed run (see vitscope.results.RunDirectory)
    .DIR.partial/   the run being written, with checkpoint/ (kept after a failure or a kill, for --resume)
    .DIR.update/    a committed run being changed
    .DIR.lock       the writers' lock and who holds it
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np

from vitscope.results import Results, RunDirectory

__all__ = ["RunDirError", "RunLock", "RunWriter", "update_run", "save_run", "new_run_id", "normal", "sibling"]

PARTIAL, UPDATE, OLD, LOCK = "partial", "update", "old", "lock"
CHECKPOINT = "checkpoint"


class RunDirError(ValueError):
    """An output directory that cannot be written as asked; the message names it and what to do."""


def new_run_id() -> str:
    """A fresh run id: the UTC time and 8 random hex digits (sortable, unique)."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def normal(path: str | os.PathLike) -> Path:
    """``path`` as the run directory's own entry: a symbolic link followed to its target, ``.`` or ``..``
    made absolute (a name is needed to put ``.NAME.partial`` beside it)."""
    target = Path(path)
    if target.is_symlink():
        return Path(os.path.realpath(target))
    return Path(os.path.abspath(target)) if target.name in ("", ".", "..") else target


def sibling(target: Path, kind: str) -> Path:
    """``.NAME.KIND`` beside ``target``: its staging, update, old copy or lock file."""
    return target.parent / f".{target.name}.{kind}"


def _command_line() -> str:
    """This process's command line, as a user would have typed it."""
    return " ".join(["vitscope", *sys.argv[1:]])


# ------------------------------------------------------------------------------------------ lock
_HELD: dict[Path, tuple[int, int]] = {}  # lock file -> (fd, depth): this process's locks, re-entrant


class RunLock:
    """An exclusive ``fcntl.flock`` on ``.DIR.lock`` holding the writer's pid, host and command.

    Re-entrant within a process (an analysis that holds it may write the verdict and the report); a
    second process is refused at once with a sentence naming the holder. The lock goes with the process:
    a killed writer leaves no stale lock behind.
    """

    def __init__(self, target: str | os.PathLike, command: str | None = None) -> None:
        self.target = normal(target)
        self.path = sibling(self.target, LOCK)
        self.command = command or _command_line()

    def acquire(self) -> RunLock:
        key = self.path.absolute()
        if key in _HELD:
            fd, depth = _HELD[key]
            _HELD[key] = (fd, depth + 1)
            return self
        fd = _open_lock_file(self.path, self.target)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirError(
                f"{self.target} is being written by another process ({holder}); wait for it to finish "
                "or choose another --out"
            ) from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
        with suppress(OSError):  # who holds it is for messages only: a full disk must not stop the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        _HELD[key] = (fd, 1)
        return self

    def release(self) -> None:
        key = self.path.absolute()
        fd, depth = _HELD[key]
        if depth > 1:
            _HELD[key] = (fd, depth - 1)
            return
        del _HELD[key]
        with suppress(OSError):
            os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _open_lock_file(path: Path, target: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise RunDirError(f"{target}: cannot write in {path.parent} ({_reason(err)})") from None


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']} since {holder['since']}: {holder['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet said which"


def _reason(err: OSError) -> str:
    return err.strerror or str(err)


# ------------------------------------------------------------------------------------ file moves
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _install(new: Path, target: Path) -> None:
    """Put the complete directory ``new`` in ``target``'s place; the old ``target`` (if any) is removed.

    One rename when ``target`` is absent or empty, else an atomic exchange (or, where the file system has
    none, ``target`` → ``.NAME.old`` then ``new`` → ``target``: a crash between the two is repaired by
    :func:`_recover`)."""
    if not target.exists() or _is_empty_dir(target):
        os.rename(new, target)
    elif _exchange(new, target):
        shutil.rmtree(new)
    else:
        old = sibling(target, OLD)
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
        os.rename(new, target)
        shutil.rmtree(old)
    _fsync_dir(target.parent)


def _recover(target: Path) -> None:
    """Repair what a writer killed mid-commit left (called under the lock): a half-done fallback swap, a
    staging directory that was complete (manifest written) but not yet installed, an abandoned update."""
    old, partial, update = sibling(target, OLD), sibling(target, PARTIAL), sibling(target, UPDATE)
    if old.exists() and not target.exists():
        complete = next((d for d in (partial, update) if (d / RunDirectory.MANIFEST).is_file()), None)
        os.rename(complete or old, target)
    shutil.rmtree(old, ignore_errors=True)
    if (partial / RunDirectory.MANIFEST).is_file():  # committed in all but the rename
        _install(partial, target)
    shutil.rmtree(update, ignore_errors=True)


def _link_tree(source: Path, dest: Path) -> None:
    """``dest`` as a copy of ``source`` made of hard links (plain copies where links are refused)."""
    for root, dirs, files in os.walk(source):
        rel = Path(root).relative_to(source)
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            try:
                os.link(Path(root) / name, dest / rel / name)
            except OSError:
                shutil.copy2(Path(root) / name, dest / rel / name)
        dirs[:] = [d for d in dirs if not (rel == Path(".") and d == CHECKPOINT)]


# ---------------------------------------------------------------------------------------- writer
def describe_run(path: Path) -> str:
    """A few words on the finished run in ``path`` (its id and when it was written), for messages."""
    try:
        manifest = RunDirectory(path).manifest()
    except ValueError:
        manifest = None
    if manifest is None:
        return "a finished run"
    return f"run {manifest['run_id']} written {manifest.get('written', '?')}"


def _holds_a_run(path: Path) -> bool:
    return any((path / name).exists() for name in (RunDirectory.MANIFEST, *RunDirectory.DATA_FILES))


class RunWriter:
    """Writes one run into ``DIR`` through ``.DIR.partial/``; see the module docstring.

    :meth:`open` makes every check that can fail before the work starts (``DIR`` is not a file, not another
    kind of directory, not a finished run unless ``overwrite``, the parent is writable, no other writer)
    and takes the lock; :meth:`commit` installs the staged run; :meth:`close` releases the lock and keeps
    an uncommitted staging directory for ``resume``.

    Args:
        path: the run directory (``--out``).
        overwrite: replace a finished run (whole, at commit) and discard an unfinished one.
        resume: continue the unfinished run in ``.DIR.partial/`` (a fresh start when there is none).
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False, resume: bool = False,
                 command: str | None = None) -> None:  # fmt: skip
        self.path = normal(path)
        self.overwrite, self.resume = overwrite, resume
        self.lock = RunLock(self.path, command)
        self.partial = sibling(self.path, PARTIAL)
        self.resuming = False  # set by open(): a staging directory from an earlier attempt is continued
        self.finished = False  # set by open(): DIR already holds a finished run (and resume was asked)
        self._open = False

    @property
    def stage(self) -> RunDirectory:
        """The staging directory, as a writable :class:`RunDirectory`."""
        return RunDirectory(self.partial, staged=True)

    @property
    def checkpoint_dir(self) -> Path:
        return self.partial / CHECKPOINT

    def open(self) -> RunWriter:
        """Check ``DIR``, take the lock and prepare ``.DIR.partial/``; :class:`RunDirError` names what is wrong."""
        self._check_path()
        self.lock.acquire()
        self._open = True
        try:
            _recover(self.path)
            self._check_existing()
            if not self.finished:
                self._prepare_stage()
        except BaseException:
            self.close()
            raise
        return self

    def _check_path(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--out {self.path} is a file; expected a directory (new or a vitscope run)")
        for parent in self.path.absolute().parents:
            if parent.exists():
                if not parent.is_dir():
                    raise RunDirError(f"--out {self.path}: {parent} is a file, not a directory")
                break

    def _check_existing(self) -> None:
        if self.path.is_dir() and not _is_empty_dir(self.path) and not _holds_a_run(self.path):
            names = ", ".join(sorted(p.name for p in self.path.iterdir())[:3])
            raise RunDirError(f"--out {self.path} holds files that are not a vitscope run ({names}, ...); "
                              "choose a new or empty directory")  # fmt: skip
        finished = self.path.is_dir() and _holds_a_run(self.path)
        if self.partial.is_dir() and not any(self.partial.iterdir()):
            self.partial.rmdir()  # an attempt that stopped before saving anything
        unfinished = self.partial.exists()
        if unfinished and not (self.resume or self.overwrite):
            raise RunDirError(f"--out {self.path} has an unfinished run in {self.partial}; continue it with "
                              "--resume or start again with --overwrite")  # fmt: skip
        if finished and not unfinished and self.resume and not self.overwrite:
            self.finished = True
        elif finished and not self.overwrite and not (self.resume and unfinished):
            raise RunDirError(f"--out {self.path} already holds {describe_run(self.path)}; pass --overwrite "
                              "to replace it, or choose another --out")  # fmt: skip

    def _prepare_stage(self) -> None:
        if self.partial.exists() and (self.overwrite or not self.resume):
            shutil.rmtree(self.partial)
        for leftover in self.partial.rglob(".*.tmp") if self.partial.exists() else ():
            leftover.unlink()  # a write that a kill interrupted (never renamed into place)
        self.resuming = self.partial.exists() and any(self.partial.iterdir())
        try:
            self.partial.mkdir(exist_ok=True)
            probe = self.partial / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise RunDirError(f"--out {self.path}: cannot write in {self.path.parent} ({_reason(err)})") from None

    def commit(self, run_id: str) -> RunDirectory:
        """Write ``manifest.json`` (the run id, every data file's size and SHA-256) into the staging
        directory, drop its checkpoints and install it as ``DIR`` (replacing a finished run whole)."""
        self._require_open()
        self.stage.write_manifest(run_id)
        _fsync_dir(self.partial)
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
        _install(self.partial, self.path)
        return RunDirectory(self.path)

    def close(self) -> None:
        """Release the lock; an uncommitted staging directory stays for ``--resume``."""
        if self._open:
            self._open = False
            if self.partial.is_dir() and not any(self.partial.iterdir()):
                self.partial.rmdir()  # nothing saved: no unfinished run to speak of
            self.lock.release()

    def _require_open(self) -> None:
        if not self._open:
            raise RuntimeError("RunWriter: open() first")

    def __enter__(self) -> RunWriter:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def update_run(path: str | os.PathLike, command: str | None = None) -> Iterator[RunDirectory]:
    """Change a committed run whole or not at all: yields a writable copy (hard links) of ``DIR`` in
    ``.DIR.update/``; on success its manifest is rewritten (the run id kept while the data files are
    unchanged) and it takes ``DIR``'s place in one step; on error ``DIR`` is untouched."""
    target = normal(path)
    committed = RunDirectory(target).check()  # a missing or mixed directory is refused before anything is written
    with RunLock(target, command):
        _recover(target)
        committed.check()
        work = sibling(target, UPDATE)
        shutil.rmtree(work, ignore_errors=True)
        try:
            _link_tree(target, work)
            yield RunDirectory(work, staged=True)
            staged = RunDirectory(work, staged=True)
            manifest = committed.manifest()
            same = manifest is not None and staged.data_digests() == manifest["files"]
            staged.write_manifest(manifest["run_id"] if same and manifest else new_run_id())
            _fsync_dir(work)
            _install(work, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def save_run(
    path: str | os.PathLike,
    results: Results,
    arrays: Mapping[str, np.ndarray] | None = None,
    *,
    overwrite: bool = False,
) -> RunDirectory:
    """Write ``results`` (and ``arrays``) as a committed run in ``path`` (see :class:`RunWriter`); its run id
    is ``results.meta['run_id']`` when set, else a new one (recorded in the metadata)."""
    run_id = str(results.meta.get("run_id") or new_run_id())
    results.meta["run_id"] = run_id
    with RunWriter(path, overwrite=overwrite) as writer:
        stage = writer.stage
        stage.save_results(results)
        if arrays:
            stage.save_arrays(arrays)
        return writer.commit(run_id)
