"""vitscope.rundir on its own: the lock is per process and re-entrant, a commit replaces a run whole with or
without an atomic exchange, and what a writer killed mid-commit left is repaired by the next one."""

from __future__ import annotations

import json

import pytest

from tests.support.results import make_results
from vitscope import rundir
from vitscope.results import RunDirectory
from vitscope.rundir import RunDirError, RunLock, RunWriter, save_run, sibling


def committed(path, label: str = "cl"):
    return save_run(path, make_results((label, "mim")), overwrite=True)


def test_the_lock_is_reentrant_in_a_process_and_released_with_the_last_holder(tmp_path):
    target = tmp_path / "run"
    with RunLock(target, "first"), RunLock(target, "nested"):
        record = json.loads(sibling(target, "lock").read_text())
        assert record["command"] == "first" and record["pid"] > 0
    assert sibling(target, "lock").read_text() == ""  # released: no holder named


@pytest.mark.parametrize("exchange", [True, False])
def test_overwrite_replaces_the_run_whole_with_or_without_an_atomic_exchange(tmp_path, monkeypatch, exchange):
    out = tmp_path / "run"
    old = committed(out, "cl").run_id
    (out / "claims.json").write_text("{}")  # a derived file of the old run
    if not exchange:
        monkeypatch.setattr(rundir, "_exchange", lambda a, b: False)
    new = save_run(out, make_results(("mim",)), overwrite=True)
    assert new.run_id != old and not (out / "claims.json").exists()
    assert RunDirectory(out).check().load_results().models() == ["mim"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.lock", "run"]


def test_a_half_done_fallback_swap_is_repaired_by_the_next_writer(tmp_path):
    out = tmp_path / "run"
    committed(out, "cl")
    # killed between `run` -> `.run.old` and `.run.partial` -> `run`: the complete new run waits in .partial
    committed(tmp_path / "new", "mim")
    out.rename(sibling(out, "old"))
    (tmp_path / "new").rename(sibling(out, "partial"))
    with RunWriter(out, resume=True) as writer:
        assert writer.finished
    assert RunDirectory(out).check().load_results().models() == ["mim"]
    assert not sibling(out, "old").exists() and not sibling(out, "partial").exists()


def test_an_old_run_comes_back_when_no_complete_new_one_exists(tmp_path):
    out = tmp_path / "run"
    run_id = committed(out, "cl").run_id
    out.rename(sibling(out, "old"))
    sibling(out, "partial").mkdir()  # an unfinished run: no manifest
    (sibling(out, "partial") / "metrics.csv").write_text("model\n")
    with pytest.raises(RunDirError, match="has an unfinished run"):
        RunWriter(out).open()
    assert RunDirectory(out).check().run_id == run_id


def test_a_committed_run_refuses_writes_outside_a_transaction(tmp_path):
    out = committed(tmp_path / "run").path
    with pytest.raises(ValueError, match="is a committed run: change it through vitscope.rundir.update_run"):
        RunDirectory(out).save_report("<html></html>")
    with rundir.update_run(out) as run:
        run.save_report("<html></html>")
    assert (out / "report.html").read_text() == "<html></html>"


def test_a_run_behind_a_symbolic_link_or_at_dot_is_written_in_place(tmp_path, monkeypatch):
    real = tmp_path / "real"
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    committed(real)
    save_run(tmp_path / "link", make_results(("mim",)), overwrite=True)
    assert (tmp_path / "link").is_symlink() and RunDirectory(real).check().load_results().models() == ["mim"]
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    save_run(".", make_results(("cl",)))
    assert RunDirectory(tmp_path / "empty").check().load_results().models() == ["cl"]
