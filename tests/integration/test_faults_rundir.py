"""Faults around the run directory: a finished run is never overwritten or mixed, a second writer is refused
naming the first, a full disk or a kill mid-commit leaves the old run whole, a read-only or wrong --out is
refused before any model loads, and nothing is read from a directory whose files are not one run's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support.kill import run_stopped_at, start_frozen_at
from tests.support.results import L, make_results, only, write_results_dir
from tests.support.runs import TINY_VIT, image_folder
from vitscope.cli import main
from vitscope.report import Roles, load_claims, write_verdict
from vitscope.report.claims import FAILS, HOLDS
from vitscope.results import RunDirectory

MODELS = {"cl": TINY_VIT + "&seed=1", "mim": TINY_VIT + "&seed=2"}
QUICK = ["--num-images", "8", "--probe-images", "4", "--batch-size", "4",
         "--metrics", "token_cosine,attention_distance", "--no-report"]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("faults") / "images", classes=2, per_class=6)


def analyze_argv(data: Path, out: Path, *extra: str) -> list[str]:
    words = ["analyze", "--data", f"folder:{data}", "--out", str(out), *QUICK, *extra]
    for label, spec in MODELS.items():
        words += ["--model", f"{label}={spec}"]
    return words


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def run_id(directory: Path) -> str:
    return json.loads((directory / "manifest.json").read_text())["run_id"]


def mount_tmpfs(path: Path, options: str) -> Path:
    """A tmpfs at ``path`` (skips the test where this process may not mount: not root)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    return path


@pytest.fixture
def mounts():
    made: list[Path] = []
    yield made
    for path in reversed(made):
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    """Fill the file system of ``path`` to the last byte; returns the filler file."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (65536, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


# --------------------------------------------------------------------------------------- --out checks
def test_out_that_is_a_file_is_refused_before_any_model_loads(tmp_path, data, capsys):
    target = tmp_path / "results.txt"
    target.write_text("not a run")
    words = analyze_argv(data, target)
    words[words.index("--model") + 1] = "cl=mae:/no/such/checkpoint.pth"  # would fail if it were loaded
    assert main(words) == 2
    err = capsys.readouterr().err
    assert f"--out {target} is a file; expected a directory" in err and "checkpoint.pth" not in err
    assert target.read_text() == "not a run"


def test_read_only_out_is_refused_before_any_model_loads(tmp_path, data, capsys, mounts):
    if os.geteuid() == 0:
        mounts.append(mount_tmpfs(tmp_path / "ro", "ro,size=1m"))
        parent = tmp_path / "ro"
    else:
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o555)
    words = analyze_argv(data, parent / "run")
    words[words.index("--model") + 1] = "cl=mae:/no/such/checkpoint.pth"
    assert main(words) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vitscope analyze: error: {parent / 'run'}: cannot write in {parent} (")
    assert len(err.splitlines()) == 1 and "checkpoint.pth" not in err


def test_a_directory_of_other_files_is_never_taken(tmp_path, data, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"mine")
    assert main(analyze_argv(data, out, "--overwrite")) == 2
    assert "holds files that are not a vitscope run (holiday.jpg" in capsys.readouterr().err
    assert files_of(out) == {"holiday.jpg": b"mine"}


# --------------------------------------------------------------------------------- overwrite, mixing
def test_a_finished_run_is_replaced_only_with_overwrite_and_then_whole(tmp_path, data, capsys):
    out = tmp_path / "run"
    assert main(analyze_argv(data, out, "--cl", "cl", "--mim", "mim")) == 0
    assert (out / "claims.json").is_file()
    before = files_of(out)
    first = run_id(out)
    capsys.readouterr()

    assert main(analyze_argv(data, out)) == 2
    assert f"--out {out} already holds run {first}" in capsys.readouterr().err
    assert files_of(out) == before  # untouched

    assert main(analyze_argv(data, out, "--overwrite")) == 0  # no roles this time
    assert run_id(out) != first
    assert not (out / "claims.json").exists(), "the old verdict must not stay beside the new metrics"
    assert sorted(files_of(out)) == ["arrays.npz", "manifest.json", "metrics.csv", "metrics.json"]
    RunDirectory(out).check()


def test_files_of_another_run_are_refused_naming_them(tmp_path, capsys):
    a = write_results_dir(tmp_path / "a", make_results(("cl", "mim")), arrays={})
    b = write_results_dir(tmp_path / "b", make_results(("cl", "mim"), overrides={("cl", "nmi"): [0.5] * L}), arrays={})
    claims = ["--cl", "cl", "--mim", "mim"]
    shutil.copy(a / "metrics.json", b / "metrics.json")  # a new JSON beside an old CSV
    assert main(["claims", str(b), *claims]) == 2
    assert f"{b / 'metrics.json'}: not the file run {run_id(b)} wrote" in capsys.readouterr().err
    (b / "metrics.json").unlink()  # the CSV alone has no metadata: claims must not run on it
    assert main(["report", str(b)]) == 2
    assert f"{b / 'metrics.json'}: missing, but manifest.json of run {run_id(b)} lists it" in capsys.readouterr().err
    shutil.copy(a / "metrics.json", b / "metrics.json")
    (a / "arrays.npz").write_bytes(b"")  # a file the run never had
    assert main(["claims", str(a), *claims]) == 2
    assert f"{a / 'arrays.npz'}: not part of run {run_id(a)}" in capsys.readouterr().err


def test_a_claims_json_of_another_run_is_evaluated_again_not_shown(tmp_path, capsys):
    collapsed = make_results(("cl", "mim"), overrides={("cl", "attention_entropy"): [2.3] * L})
    uniform = make_results(("cl", "mim"), overrides={("cl", "attention_entropy"): [2.75] * L})
    a, b = (
        write_results_dir(tmp_path / "a", collapsed, arrays={}),
        write_results_dir(tmp_path / "b", uniform, arrays={}),
    )
    assert main(["claims", str(a), "--cl", "cl", "--mim", "mim"]) == 0
    assert load_claims(a).verdicts[1].status == HOLDS
    write_verdict(a, Roles("cl", "mim"), [Roles("cl", "mim", hybrid="mim")])  # with a second set of roles
    assert [other.verdicts[1].status for other in load_claims(a).others] == [HOLDS]
    shutil.copy(a / "claims.json", b / "claims.json")  # run a's verdict in run b
    capsys.readouterr()
    record = load_claims(b)
    assert f"was evaluated on run {run_id(a)}, not on this run ({run_id(b)})" in capsys.readouterr().err
    assert record.verdicts[1].status == FAILS  # b's own numbers: near-uniform attention, not collapse
    (other,) = record.others  # the second roles judged again on b too
    assert other.roles.hybrid == "mim" and other.verdicts[1].status == FAILS


# -------------------------------------------------------------------------------------- two writers
@pytest.mark.slow  # a real subprocess
def test_a_second_writer_is_refused_naming_the_first(tmp_path, data, capsys):
    out = tmp_path / "run"
    assert main(analyze_argv(data, out)) == 0
    before = files_of(out)
    first = start_frozen_at(analyze_argv(data, out, "--overwrite"), "vitscope.analyses.driver:_run_one")
    try:
        capsys.readouterr()
        assert main(analyze_argv(data, out, "--overwrite")) == 2
        err = capsys.readouterr().err
        assert f"{out} is being written by another process (pid {first.pid} on " in err
        assert f"vitscope analyze --data folder:{data} --out {out}" in err
        assert main(["claims", str(out), "--cl", "cl", "--mim", "mim"]) == 2  # a claims rewrite waits its turn too
        assert f"(pid {first.pid} on " in capsys.readouterr().err
        assert files_of(out) == before
    finally:
        first.kill()  # SIGKILL: the lock goes with the process
        first.wait()
    assert files_of(out) == before  # the killed writer committed nothing
    assert main(["claims", str(out), "--cl", "cl", "--mim", "mim"]) == 0


# ------------------------------------------------------------------------------------------ full disk
def test_a_full_disk_leaves_the_old_run_whole_and_resume_finishes(tmp_path, data, capsys, mounts):
    disk = mount_tmpfs(tmp_path / "disk", "size=2m")
    mounts.append(disk)
    out = disk / "run"
    assert main(analyze_argv(data, out)) == 0
    before, first = files_of(out), run_id(out)
    filler = fill(disk)
    capsys.readouterr()

    assert main(analyze_argv(data, out, "--overwrite")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        f"vitscope analyze: error: cannot write into {disk / '.run.partial'} (No space left on device)"
    )
    assert f"{out} is unchanged" in err and len(err.splitlines()) == 1
    assert files_of(out) == before and RunDirectory(out).check().run_id == first

    filler.unlink()
    assert main(analyze_argv(data, out, "--overwrite", "--resume")) == 0
    assert run_id(out) != first
    assert (out / "metrics.csv").read_bytes() == before["metrics.csv"]  # the same settings, the same numbers


def test_a_full_disk_during_a_report_leaves_the_run_as_it_was(tmp_path, capsys, mounts):
    disk = mount_tmpfs(tmp_path / "disk", "size=8m")
    mounts.append(disk)
    out = write_results_dir(disk / "run", make_results(("cl", "mim")), arrays={})
    before = files_of(out)
    filler = fill(disk)
    assert main(["report", str(out), "--no-svg"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert files_of(out) == before and not (disk / ".run.update").exists()
    filler.unlink()
    assert main(["report", str(out), "--no-svg"]) == 0
    assert (out / "report.html").is_file() and run_id(out) == json.loads(before["manifest.json"])["run_id"]


# ------------------------------------------------------------------------------------- kills mid-commit
@pytest.mark.slow  # a real subprocess
def test_a_writer_killed_between_manifest_and_rename_is_finished_by_the_next(tmp_path, data, capsys):
    out = tmp_path / "run"
    killed = run_stopped_at(analyze_argv(data, out), "vitscope.rundir:_install")
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists() and (tmp_path / ".run.partial" / "manifest.json").is_file()
    assert main(analyze_argv(data, out, "--resume")) == 0  # takes the lock, installs the complete run
    assert f"{out} already holds this finished run" in capsys.readouterr().out
    RunDirectory(out).check()
    assert not (tmp_path / ".run.partial").exists()


@pytest.mark.slow  # a real subprocess
def test_a_report_killed_midway_leaves_the_committed_run_as_it_was(tmp_path, capsys):
    out = write_results_dir(tmp_path / "run", only(make_results(("cl", "mim")), "nmi", "attention_distance"), arrays={})
    before = files_of(out)
    killed = run_stopped_at(["report", str(out), "--no-svg"], "vitscope.report.render:save_figure", 1, when="after")
    assert killed.returncode == -signal.SIGKILL
    assert files_of(out) == before  # no figure, no report: the change was in .run.update
    assert (tmp_path / ".run.update" / "figures").is_dir()
    assert main(["report", str(out), "--no-svg"]) == 0
    assert (out / "report.html").is_file() and not (tmp_path / ".run.update").exists()
