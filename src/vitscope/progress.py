"""Progress of long work: a live tqdm bar on a terminal, plain dated lines in a log.

On a terminal the bar redraws itself in place. When stderr is a file or a pipe (``nohup``, a job
scheduler, ``2> log``) carriage-return frames would pile up in the log, so the same bar writes one whole
line at most every :data:`LOG_INTERVAL_S` seconds (``VITSCOPE_PROGRESS_INTERVAL`` overrides it) and a
last line when the work completes, e.g. ``analyse: 3072/10000 img (31 %) [01:02<02:20, 49.5img/s]``.
Nothing is written before the first unit is done, and nothing when the work stops early, so an error
stays the last line of the log.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

LOG_INTERVAL_S = 30.0
"""Seconds between two progress lines when stderr is not a terminal."""

_LOG_FORMAT_OPEN = "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}{postfix}]"  # total unknown
_LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f} %) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


def log_interval() -> float:
    """Seconds between progress lines off a terminal: ``VITSCOPE_PROGRESS_INTERVAL`` or :data:`LOG_INTERVAL_S`."""
    value = os.environ.get("VITSCOPE_PROGRESS_INTERVAL", "")
    try:
        return max(0.0, float(value)) if value else LOG_INTERVAL_S
    except ValueError:
        raise ValueError(f"VITSCOPE_PROGRESS_INTERVAL={value!r} is not a number of seconds") from None


class LogLines(tqdm):
    """A tqdm bar that writes whole lines (no carriage returns, no cursor moves) for logs, at most one
    every ``interval`` seconds (``set_postfix`` and tqdm's monitor thread included) and one at the end."""

    def __init__(self, *args: Any, interval: float = LOG_INTERVAL_S, **kwargs: Any) -> None:
        self._interval = interval
        self._line_at: float | None = None  # when the last line was written
        self._line_n: float | None = None  # at which count
        super().__init__(*args, mininterval=interval, maxinterval=max(interval, 10.0), **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "":  # tqdm clearing its line on close: nothing to clear in a log (False: no carriage return)
            return False
        if self.n <= self.initial:  # nothing done yet (tqdm draws the empty bar while it starts)
            return True
        since = self.start_t if self._line_at is None else self._line_at
        if self._time() - since < self._interval:  # the work began, or a line was written, moments ago
            return True
        self._write_line(msg)
        return True

    def _write_line(self, msg: str | None = None) -> None:
        self._line_at, self._line_n = self._time(), self.n
        self.fp.write((self.__str__() if msg is None else msg).strip() + "\n")
        self.fp.flush()

    def close(self) -> None:
        finished = self.total is not None and self.n >= self.total
        if not self.disable and finished and self._line_n != self.n:
            self._write_line()
        super().close()


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str | None,
    total: float | None = None,
    unit: str = "it",
    initial: float = 0,
    enabled: bool = True,
) -> tqdm:
    """A progress bar over ``iterable`` (or one to ``update`` by hand): live on a terminal, lines in a log.

    Args:
        iterable: what to iterate over, or None for a bar advanced with ``update``.
        desc: what is being done (the line's prefix).
        total: units in all (None: taken from ``len(iterable)`` where it has one).
        unit: what one unit is (``img``, ``step``, ``batch``).
        initial: units already done (a resumed run).
        enabled: False gives a silent bar (same interface).
    """
    options: dict[str, Any] = dict(desc=desc, total=total, unit=unit, initial=initial, leave=False)
    if not enabled:
        return tqdm(iterable, disable=True, **options)
    if sys.stderr.isatty():
        return tqdm(iterable, dynamic_ncols=True, **options)
    bar_format = _LOG_FORMAT if total is not None or hasattr(iterable, "__len__") else _LOG_FORMAT_OPEN
    return LogLines(iterable, file=sys.stderr, interval=log_interval(), bar_format=bar_format, **options)
