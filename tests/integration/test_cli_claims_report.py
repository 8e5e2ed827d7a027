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
