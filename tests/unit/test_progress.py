"""Progress off a terminal: whole lines, at most one per interval, one at the end, none after a failure."""

from __future__ import annotations

import pytest

from vitscope.progress import LogLines, progress_bar


def lines_of(err: str) -> list[str]:
    assert "\r" not in err and "\x1b" not in err  # no carriage-return frames, no cursor moves
    return err.splitlines()


def test_a_log_gets_only_the_last_line_of_quick_work(capsys, monkeypatch):
    monkeypatch.delenv("VITSCOPE_PROGRESS_INTERVAL", raising=False)
    bar = progress_bar(range(5), desc="analyse", unit="img")
    assert isinstance(bar, LogLines)  # pytest's stderr is not a terminal
    for _ in bar:
        bar.set_postfix(loss=1.5)  # a refresh per item must not become a line per item
    assert [line.split(" [")[0] for line in lines_of(capsys.readouterr().err)] == ["analyse: 5/5 img (100 %)"]


def test_every_interval_writes_a_line_and_an_open_total_has_no_percentage(capsys, monkeypatch):
    monkeypatch.setenv("VITSCOPE_PROGRESS_INTERVAL", "0")
    for _ in progress_bar(range(3), desc="probe", unit="epoch"):
        pass
    with progress_bar(desc="pretrain", unit="step", initial=4) as bar:  # resumed at step 4, end unknown
        bar.update(1)
        bar.update(1)
    got = [line.split(" [")[0] for line in lines_of(capsys.readouterr().err)]
    assert got == ["probe: 1/3 epoch (33 %)", "probe: 2/3 epoch (67 %)", "probe: 3/3 epoch (100 %)",
                   "pretrain: 5 step", "pretrain: 6 step"]  # fmt: skip


def test_work_that_stops_early_leaves_its_error_as_the_last_line(capsys, monkeypatch):
    monkeypatch.delenv("VITSCOPE_PROGRESS_INTERVAL", raising=False)
    with pytest.raises(KeyError), progress_bar(total=10, desc="analyse", unit="img") as bar:
        bar.update(4)
        raise KeyError("a late failure")
    assert capsys.readouterr().err == ""


def test_a_silent_bar_writes_nothing_and_a_bad_interval_is_named(capsys, monkeypatch):
    for _ in progress_bar(range(3), desc="noise", enabled=False):
        pass
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("VITSCOPE_PROGRESS_INTERVAL", "soon")
    with pytest.raises(ValueError, match="VITSCOPE_PROGRESS_INTERVAL='soon' is not a number of seconds"):
        progress_bar(range(3), desc="noise")
