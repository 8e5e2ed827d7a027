"""Claims 1–7 on hand-made results: each one holding and failing, plus the control comparisons."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.support.results import LOG_N, PROFILES, L, make_results
from vitscope.report import ClaimVerdict, Tolerance, evaluate_claims, load_claims
from vitscope.report.claims import FAILS, HOLDS, NOT_MEASURED, UNDECIDED, band_shares, change_centre
from vitscope.report.series import ResultView, thirds

LATE = slice(L - L // 3, L)  # blocks 5, 6 of 6 (list index 4, 5)
EARLY = slice(0, L // 3)  # blocks 1, 2


def late(model: str, metric: str, profile=None) -> float:
    return float(np.mean((profile or PROFILES[model][metric])[LATE]))


def verdicts(control: str | None = None, hybrid: str | None = None, **kwargs) -> dict[int, ClaimVerdict]:
    results = make_results(**kwargs)
    return {v.claim_id: v for v in evaluate_claims(results, "cl", "mim", control=control, hybrid=hybrid)}


def test_thirds_are_first_and_last_third_of_blocks():
    assert thirds(12) == ([1, 2, 3, 4], [9, 10, 11, 12])
    assert thirds(6) == ([1, 2], [5, 6])
    assert thirds(2) == ([1], [2])
    assert thirds(1) == ([1], [1])


def test_every_claim_holds_on_paper_like_results_with_the_numbers_behind_it():
    v = verdicts(control="control", hybrid="hybrid")
    assert [v[i].status for i in range(1, 8)] == [HOLDS] * 7
    assert v[1].numbers["cl_late_attention_distance"] == pytest.approx(late("cl", "attention_distance"))
    assert v[1].numbers["mim_late_attention_distance"] == pytest.approx(late("mim", "attention_distance"))
    assert "late attention distance: CL cl 16.5 px vs MIM mim 5.2 px" in v[1].evidence
    assert v[2].numbers["log_n"] == pytest.approx(math.log(16))
    assert v[2].numbers["cl_late_nmi"] == pytest.approx(late("cl", "nmi"))
    assert v[3].numbers["mim_late_effective_rank"] == pytest.approx(late("mim", "effective_rank"))
    assert v[4].numbers["cl_late_fourier_high"] == pytest.approx(late("cl", "fourier_high"))
    # probe accuracies are percentages, as real runs write them
    assert v[5].numbers["cl_last_probe"] == pytest.approx(PROFILES["cl"]["probe_cls"][-1])
    assert v[5].numbers["mim_best_probe_layer"] == 1 + int(np.argmax(PROFILES["mim"]["probe_cls"]))
    assert v[7].numbers["hybrid_early_attention_distance"] == pytest.approx(
        np.mean(PROFILES["hybrid"]["attention_distance"][EARLY])
    )


# -- 1 attention distance ---------------------------------------------------------------------------
def test_distance_fails_when_mim_attends_more_globally():
    swapped = {
        ("cl", "attention_distance"): PROFILES["mim"]["attention_distance"],
        ("mim", "attention_distance"): PROFILES["cl"]["attention_distance"],
    }
    v = verdicts(overrides=swapped)[1]
    assert v.status == FAILS
    assert "reversed" in v.evidence


def test_distance_difference_inside_the_stderr_margin_does_not_hold():
    # stderr = 1% of the value: 5.20 vs 5.25 px is a 0.05 px difference, inside 2·sqrt(0.052² + 0.0525²)
    close = [9.0, 8.0, 7.0, 6.0, 5.25, 5.25]
    v = verdicts(
        overrides={("cl", "attention_distance"): close, ("mim", "attention_distance"): [9.0, 8.0, 7.0, 6.0, 5.2, 5.2]}
    )[1]
    assert v.status == FAILS
    assert "within the stderr / relative margin" in v.evidence


def test_distance_notes_when_cl_is_indistinguishable_from_the_control():
    v = verdicts(
        control="control", overrides={("cl", "attention_distance"): PROFILES["control"]["attention_distance"]}
    )[1]
    # still above MIM, but no different from random: the status says so, not only the evidence
    assert v.status == "holds, but CL ≈ untrained" and v.outcome == HOLDS
    assert v.evidence.startswith("holds, but CL cannot be told from the untrained control.")
    assert "CL's late attention distance 14.6 px indistinguishable from the untrained control's 14.6 px" in v.evidence


def test_distance_not_measured_without_attention_rows():
    v = verdicts(drop={("cl", "attention_distance")})[1]
    assert v.status == NOT_MEASURED
    assert "attention_distance not measured for CL cl" in v.evidence


# -- 2 attention collapse ---------------------------------------------------------------------------
def test_collapse_fails_when_cl_nmi_is_higher():
    v = verdicts(overrides={("cl", "nmi"): [0.6] * L})[2]
    assert v.status == FAILS
    assert v.numbers["cl_late_nmi"] == pytest.approx(0.6)


def test_low_nmi_with_entropy_near_log_n_is_near_uniform_not_collapse():
    # 2.70 nats ≥ (1 − 0.05)·log 16 = 2.634: rows are nearly uniform even without a control
    v = verdicts(overrides={("cl", "attention_entropy"): [2.70] * L})[2]
    assert v.status == FAILS
    assert v.evidence.startswith("near-uniform attention, not collapse")
    assert (1 - Tolerance().rel) * LOG_N < 2.70


def test_low_nmi_with_entropy_like_the_control_is_near_uniform_not_collapse():
    # 2.0 nats is well below log N, but the untrained control shows the same entropy
    v = verdicts(
        control="control",
        overrides={("cl", "attention_entropy"): [2.0] * L, ("control", "attention_entropy"): [2.02] * L},
    )[2]
    assert v.status == FAILS
    assert v.evidence.startswith("near-uniform attention, not collapse")
    assert "untrained control 2.02 nats (indistinguishable)" in v.evidence


def test_low_nmi_with_peaked_rows_unlike_the_control_is_collapse():
    v = verdicts(control="control", overrides={("cl", "attention_entropy"): [2.0] * L})[2]
    assert v.status == HOLDS
    assert v.numbers["control_late_attention_entropy"] == pytest.approx(late("control", "attention_entropy"))
    assert "(distinguishable)" in v.evidence


def test_collapse_without_entropy_rows_cannot_be_decided():
    v = verdicts(drop={("cl", "attention_entropy")})[2]
    assert v.status == NOT_MEASURED  # NMI alone cannot tell collapse from near-uniform attention
    assert v.evidence.startswith("cannot be decided: part of its evidence is not measured.")
    assert "cannot tell collapse from near-uniform attention" in v.evidence


# -- 3 representation diversity ---------------------------------------------------------------------
def test_diversity_fails_when_cl_tokens_are_more_diverse():
    v = verdicts(overrides={("cl", "token_cosine"): [0.1] * (L)})[3]
    assert v.status == FAILS
    assert v.evidence.startswith("late token cosine of CL not above MIM")


def test_diversity_fails_when_cl_effective_rank_is_higher():
    v = verdicts(overrides={("cl", "effective_rank"): [14.0] * L})[3]
    assert v.status == FAILS
    assert v.evidence.startswith("late effective rank of MIM not above CL")
    assert v.numbers["cl_late_effective_rank"] == pytest.approx(14.0)


def test_a_failing_range_mean_lists_its_blocks_and_where_the_direction_holds():
    # MIM keeps diverse tokens in block 5 but one outlier last block drags the late mean under CL's
    mim_rank = list(PROFILES["mim"]["effective_rank"])
    mim_rank[LATE] = [40.0, 2.0]
    v = verdicts(overrides={("mim", "effective_rank"): mim_rank, ("cl", "effective_rank"): [22.0] * L})[3]
    assert v.status == FAILS
    assert "late effective rank: MIM mim 21.0 vs CL cl 22.0" in v.evidence
    assert "[per block 5, 6: MIM mim 40.0, 2.0; CL cl 22.0, 22.0; MIM above CL in block 5]" in v.evidence


def test_a_passing_range_mean_has_no_per_block_list():
    assert "per block" not in verdicts()[3].evidence


# -- 4 frequency ------------------------------------------------------------------------------------
def test_band_shares_of_the_accuracy_drop():
    shares = band_shares(np.array([0.2, -0.1, 0.1, 0.0, 0.3, 0.4]))
    # positive drops [0.2, 0, 0.1, 0, 0.3, 0.4] sum to 1.0; lowest third = bands 0–1, highest = 4–5
    assert shares == pytest.approx((0.2, 0.7))
    assert band_shares(np.array([-0.1, 0.0, -0.2])) is None


def test_frequency_fails_when_cl_keeps_more_high_frequencies():
    v = verdicts(overrides={("cl", "fourier_high"): [-0.1] * L})[4]
    assert v.status == FAILS
    assert "high-frequency Δ log amplitude of MIM not above CL" in v.evidence


def test_frequency_fails_when_noise_sensitivity_is_reversed():
    swapped = {("cl", "noise_drop"): PROFILES["mim"]["noise_drop"], ("mim", "noise_drop"): PROFILES["cl"]["noise_drop"]}
    v = verdicts(overrides=swapped)[4]
    assert v.status == FAILS
    assert v.evidence.startswith("CL is not hurt more by low-frequency noise")
    expected_low = band_shares(np.array(PROFILES["mim"]["noise_drop"]))[0]
    assert v.numbers["cl_noise_low_share"] == pytest.approx(expected_low)


def test_frequency_without_noise_rows_cannot_be_decided():
    v = verdicts(drop={("cl", "noise_drop"), ("mim", "noise_drop")})[4]
    assert v.status == NOT_MEASURED  # the Fourier check passes, but half of the finding is missing
    assert "noise robustness not measured" in v.evidence


def test_frequency_without_noise_rows_still_fails_on_a_failed_fourier_check():
    v = verdicts(drop={("cl", "noise_drop"), ("mim", "noise_drop")}, overrides={("cl", "fourier_high"): [0.0] * L})[4]
    assert v.status == FAILS


# -- 5 linear separability --------------------------------------------------------------------------
def test_separability_fails_when_mim_probes_better_at_the_last_layer():
    v = verdicts(overrides={("mim", "probe_cls"): [50.0, 60.0, 70.0, 80.0, 85.0, 90.0]})[5]
    assert v.status == FAILS
    assert v.evidence.startswith("CL's last layer is not more linearly separable than MIM's")


def test_separability_fails_when_mim_best_layer_is_its_last():
    v = verdicts(overrides={("mim", "probe_cls"): [40.0, 45.0, 50.0, 55.0, 60.0, 65.0]})[5]
    assert v.status == FAILS
    assert "MIM's best probe layer is its last" in v.evidence
    assert v.numbers["mim_best_probe_layer"] == L


def test_separability_names_a_middle_best_layer_that_is_not_clearly_above_the_last():
    # best layer 4 (77 %) vs the last (74 %): 3 points, under 5 % of 77 (3.85), so not "clearly" better
    v = verdicts(overrides={("mim", "probe_cls"): [50.0, 60.0, 70.0, 77.0, 75.0, 74.0]})[5]
    assert v.status == FAILS
    assert v.evidence.startswith("MIM's best probe layer (4) is not clearly above its last")
    assert "is its last" not in v.evidence
    assert v.numbers["mim_best_probe_layer"] == 4


def test_separability_fails_when_cl_is_within_two_points_of_the_untrained_control():
    v = verdicts(control="control", overrides={("control", "probe_cls"): [30.0, 40.0, 50.0, 60.0, 70.0, 78.4]})[5]
    assert v.status == FAILS
    assert v.evidence.startswith("indistinguishable from the untrained control")
    assert v.numbers["control_last_probe"] == pytest.approx(78.4)


def test_separability_holds_when_cl_is_clearly_above_the_control():
    # 80.0 vs 77.0: 3 points > 2, and on 20 000 test images the interval of the difference is above 0
    overrides = {("control", "probe_cls"): [30.0, 40.0, 50.0, 60.0, 70.0, 77.0]}
    v = verdicts(control="control", overrides=overrides, probe_n=20_000)[5]
    assert v.status == HOLDS


def test_separability_uses_gap_when_a_model_has_no_cls_probe():
    results = make_results(drop={("cl", "linear_probe_top1")})
    results.rows += [
        r for r in make_results(("cl",)).rows if r["metric"] == "linear_probe_top1" and r.get("feature") == "gap"
    ]
    v = {x.claim_id: x for x in evaluate_claims(results, "cl", "mim")}[5]
    assert v.numbers["cl_last_probe"] == pytest.approx(PROFILES["cl"]["probe_gap"][-1])
    assert "(gap)" in v.evidence


# -- 6 which layers matter --------------------------------------------------------------------------
def _centre(depth_cosine: list[float]) -> float:
    change = 1.0 - np.array(depth_cosine, dtype=np.float64)
    return float(sum((i + 1) * c for i, c in enumerate(change)) / change.sum() / len(change))


def test_change_centre_matches_a_hand_computed_weighted_mean():
    view = ResultView(make_results(("cl", "mim")))
    assert change_centre(view, "cl") == pytest.approx(_centre(PROFILES["cl"]["depth_cosine"]))
    # cl: changes 0.05, 0.05, 0.1, 0.2, 0.3, 0.4 → Σ l·c = 0.05+0.1+0.3+0.8+1.5+2.4 = 5.15, Σ c = 1.1
    assert change_centre(view, "cl") == pytest.approx(5.15 / 1.1 / 6)


def test_layers_claim_fails_when_cl_changes_early():
    v = verdicts(
        overrides={
            ("cl", "depth_cosine"): PROFILES["mim"]["depth_cosine"],
            ("mim", "depth_cosine"): PROFILES["cl"]["depth_cosine"],
        }
    )[6]
    assert v.status == FAILS
    assert "proxy" in v.evidence
    assert v.numbers["cl_change_centre"] == pytest.approx(_centre(PROFILES["mim"]["depth_cosine"]))


# -- 7 hybrid ---------------------------------------------------------------------------------------
def test_hybrid_not_measured_without_a_hybrid_model():
    assert verdicts()[7].status == NOT_MEASURED


def test_hybrid_fails_when_it_does_not_beat_cl():
    v = verdicts(hybrid="hybrid", overrides={("hybrid", "probe_cls"): [40.0, 50.0, 60.0, 70.0, 75.0, 78.0]})[7]
    assert v.status == FAILS
    assert v.evidence.startswith("the hybrid does not beat both in linear probing")


def test_hybrid_beating_cl_within_the_margin_or_the_interval_is_not_a_win():
    # 83 % vs CL's 80 %: 3 points, under the margin (5 % of 83 = 4.15): does not hold, however many images
    close = {("hybrid", "probe_cls"): [46.0, 56.0, 66.0, 72.0, 79.0, 83.0]}
    v = verdicts(hybrid="hybrid", overrides=close, probe_n=20_000)[7]
    assert v.status == FAILS and v.evidence.startswith("the hybrid does not beat both in linear probing")
    # 87 % vs 80 %: 7 points clear the margin, but on 100 test images their interval reaches 0
    v = verdicts(hybrid="hybrid", probe_n=100)[7]
    assert v.status == UNDECIDED and "too few test images to decide: +7.0 points" in v.evidence
    assert verdicts(hybrid="hybrid", probe_n=500)[7].status == HOLDS


def test_hybrid_fails_when_its_early_layers_look_like_cl():
    v = verdicts(hybrid="hybrid", overrides={("hybrid", "attention_distance"): PROFILES["cl"]["attention_distance"]})[7]
    assert v.status == FAILS
    assert v.evidence.startswith("the hybrid's early layers are not closer to MIM")


# -- API and command --------------------------------------------------------------------------------
def test_unknown_label_lists_the_available_models():
    with pytest.raises(KeyError, match="available: cl, mim, control, hybrid, resnet"):
        evaluate_claims(make_results(), "moco", "mim")


def test_malformed_claims_json_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "claims.json").write_text('{"roles": {}}')
    with pytest.raises(ValueError, match="claims.json: not a vitscope claims file"):
        load_claims(tmp_path)


def test_nan_values_are_not_measurements(tmp_path):
    results = make_results(("cl", "mim"))
    for row in results.rows:
        if row["model"] == "cl" and row["metric"] == "attention_distance" and row["layer"] == L:
            row["value"] = float("nan")
    results.save(tmp_path)  # NaN is written as an empty cell and read back as None
    v = {x.claim_id: x for x in evaluate_claims(type(results).load(tmp_path), "cl", "mim")}[1]
    assert v.numbers["cl_late_attention_distance"] == pytest.approx(PROFILES["cl"]["attention_distance"][L - 2])


def test_layers_claim_says_when_cl_matches_the_control():
    v = verdicts(control="control", overrides={("control", "depth_cosine"): PROFILES["cl"]["depth_cosine"]})[6]
    assert v.status == "holds, but CL ≈ untrained"
    centre = _centre(PROFILES["cl"]["depth_cosine"])
    assert f"CL's centre {centre:.2f} indistinguishable from the untrained control's {centre:.2f}" in v.evidence
    assert "differs from the untrained control's 0.51" in verdicts(control="control")[6].evidence


def test_a_tiny_difference_is_not_a_difference_even_with_tiny_stderr():
    """14.2 px vs 14.1 px with stderr 0.01 is within the 5 % relative margin: neither greater nor different."""
    from vitscope.report.claims import Estimate, Tolerance, greater, indistinguishable

    tol = Tolerance()
    a, b = Estimate(14.2, 0.01), Estimate(14.1, 0.01)
    assert not greater(a, b, tol) and indistinguishable(a, b, tol)
    assert greater(Estimate(16.5, 0.01), b, tol) and not indistinguishable(Estimate(16.5, 0.01), b, tol)


# -- never greener than the evidence: a role like the untrained control qualifies "holds" -------------
def test_diversity_holds_but_mim_like_the_control_says_so_in_the_status():
    overrides = {("mim", "effective_rank"): PROFILES["control"]["effective_rank"]}
    v = verdicts(control="control", overrides=overrides)[3]
    # MIM's late rank 6.55 vs CL's 3.5 still decides the check; the control's 6.55 is the same number
    assert v.status == "holds, but MIM ≈ untrained" and v.outcome == HOLDS
    assert "MIM's late effective rank 6.5 indistinguishable from the untrained control's 6.5" in v.evidence


def test_both_roles_like_the_control_are_named_and_a_failure_is_never_qualified():
    # change centres: CL (4 + 5)/2/6 = 0.750, MIM (0.55·4 + 0.45·5)/6 = 0.742, control 0.747: all within 5 %
    cl, mim, control = ([1.0, 1.0, 1.0, 1 - a, 1 - b, 1.0] for a, b in ((0.5, 0.5), (0.55, 0.45), (0.52, 0.48)))
    same = {("cl", "depth_cosine"): cl, ("mim", "depth_cosine"): mim, ("control", "depth_cosine"): control}
    v = verdicts(control="control", overrides=same)[6]
    assert v.status == "holds, but CL and MIM ≈ untrained"
    swapped = {**same, ("cl", "depth_cosine"): mim, ("mim", "depth_cosine"): cl}
    assert verdicts(control="control", overrides=swapped)[6].status == FAILS


def test_without_a_control_there_is_no_caveat():
    v = verdicts(overrides={("cl", "attention_distance"): PROFILES["control"]["attention_distance"]})[1]
    assert v.status == HOLDS


def test_a_caveat_status_survives_claims_json_and_an_unknown_status_is_refused(tmp_path):
    from tests.support.results import write_results_dir
    from vitscope.report import Roles, save_claims

    out = write_results_dir(tmp_path / "run", make_results(("cl", "mim", "control")), arrays={})
    v = evaluate_claims(make_results(("cl", "mim", "control")), "cl", "mim", control="control")
    v[0].status = "holds, but CL ≈ untrained"
    save_claims(out, v, Roles("cl", "mim", "control"))
    assert load_claims(out).verdicts[0].outcome == HOLDS
    data = json.loads((out / "claims.json").read_text())
    data["verdicts"][0]["status"] = "holds-ish"
    (out / "claims.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"claims.json: unknown claim status 'holds-ish'"):
        load_claims(out)


# -- probe accuracies: Wilson intervals over the n test images, in the rule --------------------------
def _wilson(p: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return 100 * (centre - half), 100 * (centre + half)


def test_probe_interval_is_the_wilson_interval_and_the_difference_newcombes():
    from vitscope.report.claims import Probe, difference_interval

    a, b = Probe(80.0, 40, "cls", 6), Probe(75.0, 40, "cls", 6)
    assert a.interval() == pytest.approx(_wilson(0.80, 40), abs=1e-9)
    (la, ua), (lb, ub) = _wilson(0.80, 40), _wilson(0.75, 40)
    low, high = difference_interval(a, b)
    assert low == pytest.approx(5.0 - math.sqrt((80 - la) ** 2 + (ub - 75) ** 2))
    assert high == pytest.approx(5.0 + math.sqrt((ua - 80) ** 2 + (75 - lb) ** 2))
    assert a.text() == f"80.0% [{_wilson(0.8, 40)[0]:.1f}–{_wilson(0.8, 40)[1]:.1f}, n=40]"


def test_a_probe_difference_above_the_margin_on_40_images_is_undecided_with_a_warning():
    # CL 80 % vs control 75 %: 5 points > 2, but on 40 test images one image is 2.5 points
    overrides = {("control", "probe_cls"): [30.0, 40.0, 50.0, 60.0, 70.0, 75.0]}
    v = verdicts(control="control", overrides=overrides, probe_n=40)[5]
    assert v.status == UNDECIDED
    assert v.evidence.startswith("cannot be decided on this run: too few test images")
    assert "too few test images to decide: +5.0 points" in v.evidence
    assert "(n=40: one image = 2.5 points; margin 2.0)" in v.evidence
    # the same accuracies on 20 000 test images decide it
    assert verdicts(control="control", overrides=overrides, probe_n=20_000)[5].status == HOLDS


def test_cl_probing_worse_than_the_control_does_not_hold():
    overrides = {("control", "probe_cls"): [30.0, 40.0, 50.0, 60.0, 70.0, 90.0]}
    v = verdicts(control="control", overrides=overrides, probe_n=20_000)[5]
    assert v.status == FAILS
    assert v.evidence.startswith("indistinguishable from the untrained control")


def test_cl_beating_mim_within_the_interval_is_undecided_and_beyond_it_holds():
    # CL 80 vs MIM 74 % at the last layer: 6 points, above 5 % of 80 = 4; MIM's best layer is 90 %
    overrides = {("mim", "probe_cls"): [45.0, 55.0, 65.0, 90.0, 75.0, 74.0]}
    v = verdicts(overrides=overrides, probe_n=100)[5]
    assert v.status == UNDECIDED  # on 100 images the interval of the difference reaches below 0
    assert "one image = 1.0 points; margin 4.0" in v.evidence
    assert verdicts(overrides=overrides, probe_n=20_000)[5].status == HOLDS
    # a difference within the margin fails however many images: 80 vs 77 (3 < 4 points)
    overrides = {("mim", "probe_cls"): [45.0, 55.0, 65.0, 90.0, 75.0, 77.0]}
    assert verdicts(overrides=overrides, probe_n=20_000)[5].status == FAILS


def test_mim_probing_like_the_control_qualifies_separability():
    overrides = {("control", "probe_cls"): [30.0, 40.0, 50.0, 60.0, 60.0, 55.0]}
    v = verdicts(control="control", overrides=overrides)[5]
    assert v.status == "holds, but MIM ≈ untrained"
    assert (
        "MIM's last-layer probe 55.0% [" in v.evidence
        and "indistinguishable from the untrained control's 55.0%" in v.evidence
    )


# -- each part of each rule decides ------------------------------------------------------------------
def test_the_stderr_part_of_the_margin_decides_when_it_exceeds_the_relative_part():
    # late distance CL 5.5 vs MIM 5.0 px: 0.5 px is over 5 % of 5.5 (0.275) ...
    overrides = {("cl", "attention_distance"): [9.0, 8.0, 7.0, 6.0, 5.5, 5.5]}
    overrides[("mim", "attention_distance")] = [9.0, 8.0, 7.0, 6.0, 5.0, 5.0]
    assert verdicts(overrides=overrides, stderrs={("cl", "attention_distance"): 0.05})[1].status == HOLDS
    # ... but under 2·√(0.3² + 0.3²) = 0.85 px when both stderrs are 0.3
    noisy = {("cl", "attention_distance"): 0.3, ("mim", "attention_distance"): 0.3}
    v = verdicts(overrides=overrides, stderrs=noisy)[1]
    assert v.status == FAILS and "within the stderr / relative margin" in v.evidence
    # 2 stderrs, not 1: with stderr 0.2 each the margin is 2·0.283 = 0.57 > 0.5, while 1·0.283 < 0.5
    v = verdicts(overrides=overrides, stderrs={("cl", "attention_distance"): 0.2, ("mim", "attention_distance"): 0.2})
    assert v[1].status == FAILS


def test_the_stderr_margin_makes_a_role_indistinguishable_from_the_control():
    # CL's late NMI 0.045 vs the control's 0.01: distinct with small stderrs, not with 0.03 each
    assert verdicts(control="control")[2].status == HOLDS
    v = verdicts(control="control", stderrs={("cl", "nmi"): 0.03, ("control", "nmi"): 0.03})[2]
    assert v.status == "holds, but CL ≈ untrained"


def test_a_range_stderr_is_the_mean_of_its_layers_stderrs():
    from vitscope.report.claims import _mean
    from vitscope.report.series import Series

    series = Series(np.array([5, 6]), np.array([2.0, 4.0]), np.array([0.1, 0.5]))
    est = _mean(series)
    assert est.value == pytest.approx(3.0) and est.stderr == pytest.approx(0.3)
    assert math.isnan(_mean(Series(np.array([5, 6]), np.array([2.0, 4.0]), np.array([0.1, np.nan]))).stderr)


def test_thirds_round_rather_than_floor():
    # L = 5: 5/3 = 1.67 → 2 blocks (floor would give 1); L = 8: 2.67 → 3
    assert thirds(5) == ([1, 2], [4, 5])
    assert thirds(8) == ([1, 2, 3], [6, 7, 8])


def test_band_shares_round_the_third_of_five_bands_to_two():
    # 5 bands: k = round(5/3) = 2 (floor would take 1 band)
    assert band_shares(np.array([1.0, 1.0, 0.0, 1.0, 1.0])) == pytest.approx((0.5, 0.5))


def test_peaked_rows_use_the_attention_keys_of_the_last_attending_block():
    # windowed attention of 2×2 = 4 keys: log 4 = 1.39, so 1.35 nats is near-uniform (≥ 0.95·log 4 = 1.32),
    # although it is far below log 16 = 2.77 of the whole grid
    results = make_results(("cl", "mim"), overrides={("cl", "attention_entropy"): [1.35] * L})
    assert {v.claim_id: v for v in evaluate_claims(results, "cl", "mim")}[2].status == HOLDS
    results.meta["models"]["cl"]["attention_keys"] = [None] + [16] * (L - 1) + [4]
    v = {v.claim_id: v for v in evaluate_claims(results, "cl", "mim")}[2]
    assert v.status == FAILS and v.numbers["log_n"] == pytest.approx(math.log(4))
    assert "vs log N 1.39" in v.evidence


def test_summary_line_groups_the_findings_by_status():
    from vitscope.report.claims import summary_line

    v = list(verdicts(control="control", overrides={("cl", "attention_distance"): [14.5] * L}).values())
    v[3].status = FAILS
    assert summary_line(v, "report: r.html") == (
        "findings 2, 3, 5, 6 of 7 hold; 1: holds, but CL ≈ untrained; 4: does not hold; 7: not measured; report: r.html"
    )
    for x in v:
        x.status = FAILS
    assert summary_line(v) == "no finding of 7 holds; 1, 2, 3, 4, 5, 6, 7: does not hold"
