"""`vitscope claims` and `vitscope report` on results directories: tables, files, and errors naming the problem."""

from __future__ import annotations

import json
import re

import pytest

from tests.support.results import L, make_results, only, write_results_dir
from vitscope.cli import main
from vitscope.report import format_claims_table, load_claims
from vitscope.report.claims import FAILS, HOLDS


def test_claims_command_prints_the_table_and_writes_claims_json(tmp_path, capsys):
    out = write_results_dir(
        tmp_path / "run", make_results(overrides={("cl", "attention_entropy"): [2.75] * L}), arrays={}
    )
    code = main(["claims", str(out), "--cl", "cl", "--mim", "mim", "--control", "control", "--hybrid", "hybrid"])
    assert code == 0
    printed = capsys.readouterr().out
    assert re.search(r"^ 2  does not hold +Attention collapse", printed, re.M)
    assert "near-uniform attention, not collapse" in printed
    saved = json.loads((out / "claims.json").read_text())
    assert saved["roles"] == {"cl": "cl", "mim": "mim", "control": "control", "hybrid": "hybrid"}
    assert [v["status"] for v in saved["verdicts"]] == [HOLDS, FAILS, HOLDS, HOLDS, HOLDS, HOLDS, HOLDS]
    record = load_claims(out)
    assert record.roles.control == "control"
    assert record.verdicts[1].numbers["cl_late_attention_entropy"] == pytest.approx(2.75)
    assert format_claims_table(record.verdicts) in printed


def test_claims_command_errors_name_the_problem(tmp_path, capsys):
    out = write_results_dir(tmp_path / "run", make_results(("cl", "mim")), arrays={})
    assert main(["claims", str(out), "--cl", "moco", "--mim", "mim"]) == 2
    assert "--cl 'moco' is not a model in these results; available: cl, mim" in capsys.readouterr().err
    assert main(["claims", str(tmp_path / "missing"), "--cl", "cl", "--mim", "mim"]) == 2
    assert "no such results directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["claims", str(tmp_path / "empty"), "--cl", "cl", "--mim", "mim"]) == 2
    assert "no metrics.json or metrics.csv" in capsys.readouterr().err


def test_rel_tol_option_moves_the_near_uniform_threshold(tmp_path, capsys):
    # late entropy 2.3 nats: below 0.95·log 16 = 2.63 (peaked), above 0.8·log 16 = 2.22 (near-uniform)
    out = write_results_dir(
        tmp_path / "run", make_results(("cl", "mim"), overrides={("cl", "attention_entropy"): [2.3] * L}), arrays={}
    )
    assert main(["claims", str(out), "--cl", "cl", "--mim", "mim"]) == 0
    assert load_claims(out).verdicts[1].status == HOLDS
    assert main(["claims", str(out), "--cl", "cl", "--mim", "mim", "--rel-tol", "0.2"]) == 0
    record = load_claims(out)
    assert record.verdicts[1].status == FAILS and record.tolerance.rel == 0.2
    assert "near-uniform above 2.22" in record.verdicts[1].evidence
    capsys.readouterr()
    for bad, message in (("1.5", "must be in [0, 1), got 1.5"), ("nan", "must be a finite number, got 'nan'")):
        with pytest.raises(SystemExit) as exit_info:
            main(["claims", str(out), "--cl", "cl", "--mim", "mim", "--rel-tol", bad])
        assert exit_info.value.code == 2
        assert f"argument --rel-tol: {message}" in capsys.readouterr().err


def test_report_command_and_its_errors(tmp_path, capsys):
    out = write_results_dir(tmp_path / "run", only(make_results(("mim",)), "nmi"), arrays={})
    assert main(["report", str(out), "--no-svg"]) == 0
    assert (out / "figures" / "nmi.png").exists()
    assert f"wrote {out / 'report.html'}" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such results directory" in capsys.readouterr().err
    (out / "arrays.npz").write_bytes(b"not a zip file")
    assert main(["report", str(out)]) == 2
    assert "arrays.npz: not part of run" in capsys.readouterr().err  # not the run's file (manifest.json)
    (out / "manifest.json").unlink()  # a directory without manifest: the file itself is checked
    assert main(["report", str(out)]) == 2
    assert "arrays.npz: cannot read arrays" in capsys.readouterr().err


ALL_ROLES = {"cl": "cl", "mim": "mim", "control": "control", "hybrid": "hybrid"}


def test_claims_takes_the_runs_roles_and_ends_with_one_summary_line(tmp_path, capsys):
    # CL's late distance like the control's, and probes on 40 test images: one image is 2.5 points
    results = make_results(roles=ALL_ROLES, overrides={("cl", "attention_distance"): [14.5] * L}, probe_n=40)
    out = write_results_dir(tmp_path / "run", results, arrays={})
    assert main(["claims", str(out)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[-1] == (
        "findings 2, 3, 4, 6 of 7 hold; 1: holds, but CL ≈ untrained; 5, 7: undecided; "
        f"report: `vitscope report {out}` shows them in {out / 'report.html'}"
    )
    assert len(lines) == 1 + 7 + 2 and all(len(line) <= 120 for line in lines[:8])  # header, 7 findings, wrote
    assert re.search(
        r"^ 1  holds, but CL ≈ untrained  Attention distance +CL's late attention distance 14.5 px", captured.out, re.M
    )
    assert "warning: finding 5 cannot be decided on this run (too few test images to decide" in captured.err
    assert "n=40: one image = 2.5 points" in captured.err
    assert "warning: finding 7 cannot be decided on this run" in captured.err  # the hybrid's +7 points, n=40
    assert load_claims(out).roles.control == "control"
    # a flag overrides its role alone; --full prints the whole evidence
    assert main(["claims", str(out), "--hybrid", "mim", "--mim", "hybrid", "--full"]) == 0
    printed = capsys.readouterr().out
    assert load_claims(out).roles == type(load_claims(out).roles)("cl", "hybrid", "control", "mim")
    assert (
        "\n    late attention distance of CL not above MIM (reversed). late attention distance: CL cl 14.5 px"
        in printed
    )


def test_claims_without_roles_in_the_run_or_flags_names_the_missing_flags(tmp_path, capsys):
    out = write_results_dir(tmp_path / "run", make_results(("cl", "mim")), arrays={})
    assert main(["claims", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'metrics.json'} names no CL and no MIM model in meta.roles: give --cl LABEL and --mim LABEL" in err
    assert main(["claims", str(out), "--cl", "cl"]) == 2
    assert "names no MIM model in meta.roles: give --mim LABEL" in capsys.readouterr().err
    assert main(["claims", str(out), "--cl", "cl", "--mim", "cl"]) == 2
    assert "--cl and --mim both name 'cl': each role needs its own model" in capsys.readouterr().err
