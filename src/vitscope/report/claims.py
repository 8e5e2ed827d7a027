"""The papers' findings 1–7 (docs/claims.md) checked on measured numbers: holds / does not hold / not measured.

Conventions (stated in every verdict's evidence):

- "early" blocks are the first third of blocks 1..L, "late" the last third (at least one block each);
  a model's value over a range is the mean of its per-layer values, with the mean of their stderrs
  (a conservative bound: the layers are positively correlated).
- "A > B" needs the difference to exceed ``stderr_factor`` × the combined stderr (0 when unknown)
  and ``rel`` × the larger magnitude, so that it never contradicts "indistinguishable".
- Two numbers are "indistinguishable" when they differ by at most the larger of that stderr margin
  and ``rel`` × the larger magnitude.
- With an untrained ``control`` of the same architecture, low NMI counts as collapse only when the
  rows are peaked: CL's late attention entropy must be clearly below log N (by more than ``rel``·log N)
  and distinguishable from the control's; otherwise "near-uniform attention, not collapse".
"""

from __future__ import annotations

import math
import sys
import textwrap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from vitscope.report.series import ResultView, Series, thirds
from vitscope.results import Results, RunDirectory

HOLDS, FAILS, NOT_MEASURED, UNDECIDED = "holds", "does not hold", "not measured", "undecided"
STATUSES = (HOLDS, FAILS, NOT_MEASURED, UNDECIDED)
LIKE_CONTROL = "≈ untrained"  # "holds, but CL ≈ untrained": the finding's own metric cannot tell CL from random


def holds_but(roles: Iterable[str]) -> str:
    """The status of a finding that holds while ``roles`` (cl, mim, hybrid) look like the untrained control."""
    return f"{HOLDS}, but {' and '.join(r.upper() for r in roles)} {LIKE_CONTROL}"


def outcome_of(status: str) -> str:
    """holds / does not hold / not measured: the status without its caveat (ValueError for anything else)."""
    base = HOLDS if status.startswith(f"{HOLDS}, but ") and status.endswith(LIKE_CONTROL) else status
    if base not in STATUSES:
        raise ValueError(f"unknown claim status {status!r}")
    return base


Range = Literal["early", "late", "last"]


@dataclass
class ClaimVerdict:
    """One finding's verdict; ``numbers`` holds the values behind it (None where not measured)."""

    claim_id: int
    title: str
    status: str
    evidence: str
    numbers: dict[str, float | None] = field(default_factory=dict)
    summary: str = ""  # the one sentence that decides it (the terminal's table shows this)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def outcome(self) -> str:
        """holds / does not hold / not measured (a "holds, but CL ≈ untrained" status holds)."""
        return outcome_of(self.status)


@dataclass(frozen=True)
class Tolerance:
    stderr_factor: float = 2.0  # differences must exceed this many combined stderrs
    rel: float = 0.05  # relative tolerance: "indistinguishable", "near log N"
    probe_points: float = 2.0  # CL's probe must beat the untrained control by more than this (points)


@dataclass(frozen=True)
class Estimate:
    value: float
    stderr: float  # NaN when unknown


@dataclass
class Check:
    """One sub-test of a claim: ``passed`` None means it could not be measured."""

    passed: bool | None
    text: str
    failure: str = ""
    undecided: bool = False  # measured, but too few test images to decide (``passed`` is None)


@dataclass(frozen=True)
class Roles:
    cl: str
    mim: str
    control: str | None = None
    hybrid: str | None = None


# ---------------------------------------------------------------------------------------------------
# numbers
# ---------------------------------------------------------------------------------------------------
def _margin(a: Estimate, b: Estimate, tol: Tolerance) -> float:
    se = math.sqrt(np.nan_to_num(a.stderr) ** 2 + np.nan_to_num(b.stderr) ** 2)
    return tol.stderr_factor * se


def _threshold(a: Estimate, b: Estimate, tol: Tolerance) -> float:
    """The smallest difference that counts: the stderr margin, and at least ``rel`` of the values' size."""
    return max(_margin(a, b, tol), tol.rel * max(abs(a.value), abs(b.value)))


def greater(a: Estimate, b: Estimate, tol: Tolerance) -> bool:
    """a exceeds b by more than the stderr margin and by more than ``rel`` of their size.

    So "greater" and "indistinguishable" never both hold: with hundreds of images the stderr alone
    would call 14.2 px vs 14.1 px a difference.
    """
    return a.value - b.value > _threshold(a, b, tol)


def indistinguishable(a: Estimate, b: Estimate, tol: Tolerance) -> bool:
    return abs(a.value - b.value) <= _threshold(a, b, tol)


def _value(est: Estimate | Probe | None) -> float | None:
    return None if est is None else est.value


def _mean(series: Series) -> Estimate | None:
    if not len(series):
        return None
    se = series.stderr
    return Estimate(float(series.values.mean()), float(se.mean()) if not np.isnan(se).any() else math.nan)


class _Context:
    def __init__(self, view: ResultView, roles: Roles, tol: Tolerance) -> None:
        self.view, self.roles, self.tol = view, roles, tol

    def blocks(self, model: str, which: Range) -> list[int]:
        depth = self.view.num_layers(model)
        if not depth:
            return []
        early, late = thirds(depth)
        return {"early": early, "late": late, "last": [depth]}[which]

    def range_series(self, model: str | None, metric: str, which: Range, **where) -> Series | None:
        """``model``'s per-layer ``metric`` over the ``which`` blocks (None without a model)."""
        if model is None:
            return None
        return self.view.series(model, metric, **where).at(self.blocks(model, which))

    def estimate(self, model: str | None, metric: str, which: Range, **where) -> Estimate | None:
        series = self.range_series(model, metric, which, **where)
        return None if series is None else _mean(series)

    def label(self, role: str) -> str:
        return f"{role.upper()} {getattr(self.roles, role)}"


def _fmt(value: float | None, digits: int, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}{unit}"


def _missing(ctx: _Context, metric: str, models: Mapping[str, object | None]) -> str:
    absent = [f"{ctx.label(role)}" for role, est in models.items() if est is None]
    return f"{metric} not measured for {', '.join(absent)}"


def _compare(
    ctx: _Context,
    what: str,
    metric: str,
    which: Range,
    digits: int,
    unit: str,
    higher: str,
    lower: str,
    numbers: dict,
    **where,
) -> Check:
    """Check that role ``higher`` has a larger value of ``metric`` over ``which`` blocks than ``lower``."""
    series = {role: ctx.range_series(getattr(ctx.roles, role), metric, which, **where) for role in (higher, lower)}
    est = {role: None if s is None else _mean(s) for role, s in series.items()}
    for role, e in est.items():
        numbers[f"{role}_{which}_{metric}"] = None if e is None else e.value
    hi, lo = est[higher], est[lower]
    if hi is None or lo is None:
        return Check(None, _missing(ctx, metric, est))
    ok = greater(hi, lo, ctx.tol)
    text = (
        f"{which} {what}: {ctx.label(higher)} {_fmt(hi.value, digits, unit)} vs "
        f"{ctx.label(lower)} {_fmt(lo.value, digits, unit)} (expected {higher.upper()} > {lower.upper()})"
    )
    reason = "reversed" if hi.value < lo.value else "difference within the stderr / relative margin"
    hi_series, lo_series = series[higher], series[lower]
    if not ok and hi_series is not None and lo_series is not None:
        text += _per_block(ctx, which, hi_series, lo_series, digits, higher, lower)
    return Check(ok, text, failure=f"{which} {what} of {higher.upper()} not above {lower.upper()} ({reason})")


def _per_block(ctx: _Context, which: Range, hi: Series, lo: Series, digits: int, higher: str, lower: str) -> str:
    """Where a range mean fails, its blocks one by one and those where ``higher`` is above ``lower``:
    one block unlike the rest (a last block feeding a pixel head, say) shows itself. Only when both
    models have every block of the range, and the same blocks."""
    blocks = ctx.blocks(getattr(ctx.roles, higher), which)
    if len(blocks) < 2 or list(hi.layers) != blocks or list(lo.layers) != blocks:
        return ""
    above = [str(b) for b, h, low in zip(blocks, hi.values, lo.values, strict=True) if h > low]
    where_above = f"block {', '.join(above)}" if above else "none"

    def values(s: Series) -> str:
        return ", ".join(_fmt(float(v), digits) for v in s.values)

    return (
        f" [per block {', '.join(map(str, blocks))}: {ctx.label(higher)} {values(hi)}; "
        f"{ctx.label(lower)} {values(lo)}; {higher.upper()} above {lower.upper()} in {where_above}]"
    )


def _control_note(
    ctx: _Context,
    what: str,
    metric: str,
    which: Range,
    digits: int,
    unit: str,
    numbers: dict,
    like_control: dict[str, str],
    roles: tuple[str, ...] = ("cl", "mim"),
) -> list[str]:
    """Say whether each of ``roles`` is indistinguishable from the untrained control on ``metric`` over
    ``which``; the roles that are go into ``like_control`` with that sentence (the verdict's caveat)."""
    if ctx.roles.control is None:
        return []
    control = ctx.estimate(ctx.roles.control, metric, which)
    numbers[f"control_{which}_{metric}"] = None if control is None else control.value
    if control is None:
        return [f"control: {metric} not measured"]
    notes = []
    for role in roles:
        est = ctx.estimate(getattr(ctx.roles, role), metric, which)
        if est is None:
            continue
        same = indistinguishable(est, control, ctx.tol)
        verdict = "indistinguishable from" if same else "differs from"
        notes.append(
            f"{role.upper()}'s {which} {what} {_fmt(est.value, digits, unit)} {verdict} the untrained control's "
            f"{_fmt(control.value, digits, unit)}"
        )
        if same:
            like_control.setdefault(role, notes[-1])
    return notes


def _verdict(
    claim_id: int,
    title: str,
    checks: list[Check],
    numbers: dict,
    notes: Iterable[str] = (),
    like_control: Mapping[str, str] | None = None,
) -> ClaimVerdict:
    """Holds when every check was measured and passed; does not hold when a measured check failed; else
    not measured (a check whose numbers are missing can never let a finding hold). A finding that holds
    while a role in ``like_control`` is indistinguishable from the untrained control on the finding's
    metric is "holds, but CL ≈ untrained": never greener than its evidence. ``summary`` is the one
    sentence that decides: the first failure, what is too small or missing, the caveat, else the first check."""
    measured = [c for c in checks if c.passed is not None]
    failed = [c for c in measured if not c.passed]
    undecided = [c for c in checks if c.undecided]
    caveats = dict(like_control or {})
    like = [role for role in ("cl", "mim", "hybrid") if role in caveats]
    unmeasured = [c for c in checks if c.passed is None]
    if failed:
        status, headline, summary = FAILS, failed[0].failure, failed[0].failure
    elif undecided:
        status, headline = UNDECIDED, "cannot be decided on this run: too few test images"
        summary = undecided[0].failure
    elif len(measured) < len(checks) or not checks:
        status = NOT_MEASURED
        headline = "cannot be decided: part of its evidence is not measured" if measured else ""
        summary = unmeasured[0].text if unmeasured else ""
    elif like:
        status = holds_but(like)
        headline = f"holds, but {' and '.join(r.upper() for r in like)} cannot be told from the untrained control"
        summary = "; ".join(caveats[role] for role in like)
    else:
        status, headline, summary = HOLDS, "", checks[0].text
    parts = [c.text for c in checks] + list(notes)
    evidence = "; ".join(parts)
    if headline:
        evidence = f"{headline}. {evidence}"
    return ClaimVerdict(claim_id, title, status, evidence, numbers, summary)


# ---------------------------------------------------------------------------------------------------
# the claims
# ---------------------------------------------------------------------------------------------------
def claim_distance(ctx: _Context) -> ClaimVerdict:
    numbers: dict = {}
    checks = [_compare(ctx, "attention distance", "attention_distance", "late", 1, " px", "cl", "mim", numbers)]
    early = _compare(ctx, "attention distance", "attention_distance", "early", 1, " px", "cl", "mim", numbers)
    notes = [f"(for reference, {early.text})"] if early.passed is not None else []
    like: dict[str, str] = {}
    notes += _control_note(ctx, "attention distance", "attention_distance", "late", 1, " px", numbers, like)
    title = "Attention distance: CL attends globally, MIM locally (later layers)"
    return _verdict(1, title, checks, numbers, notes, like)


def claim_collapse(ctx: _Context) -> ClaimVerdict:
    numbers: dict = {}
    checks = [_compare(ctx, "NMI", "nmi", "late", 3, "", "mim", "cl", numbers)]
    checks.append(_peaked_rows(ctx, numbers))
    like: dict[str, str] = {}
    notes = _control_note(ctx, "NMI", "nmi", "late", 3, "", numbers, like)
    return _verdict(
        2,
        "Attention collapse: CL's late attention is the same for every query (low NMI, peaked rows)",
        checks,
        numbers,
        notes,
        like,
    )


def _peaked_rows(ctx: _Context, numbers: dict) -> Check:
    """Low NMI is collapse only if CL's rows are peaked: entropy clearly below log N and below the control's."""
    cl = ctx.estimate(ctx.roles.cl, "attention_entropy", "late")
    numbers["cl_late_attention_entropy"] = None if cl is None else cl.value
    if cl is None:
        return Check(None, "attention entropy not measured for CL: cannot tell collapse from near-uniform attention")
    n_tokens = ctx.view.attention_keys(ctx.roles.cl)
    log_n = math.log(n_tokens) if n_tokens else None
    numbers["log_n"] = log_n
    text = f"late attention entropy: {ctx.label('cl')} {_fmt(cl.value, 2)} nats"
    near_uniform = False
    if log_n is not None:
        near_uniform = cl.value >= (1.0 - ctx.tol.rel) * log_n
        text += f" vs log N {_fmt(log_n, 2)} (near-uniform above {_fmt((1 - ctx.tol.rel) * log_n, 2)})"
    if ctx.roles.control is not None:
        control = ctx.estimate(ctx.roles.control, "attention_entropy", "late")
        numbers["control_late_attention_entropy"] = None if control is None else control.value
        if control is not None:
            like_control = indistinguishable(cl, control, ctx.tol)
            near_uniform = near_uniform or like_control
            text += (
                f"; untrained control {_fmt(control.value, 2)} nats "
                f"({'indistinguishable' if like_control else 'distinguishable'})"
            )
    if log_n is None and ctx.roles.control is None:
        return Check(None, text + "; N unknown and no control: cannot tell collapse from near-uniform attention")
    return Check(not near_uniform, text, failure="near-uniform attention, not collapse")


def claim_diversity(ctx: _Context) -> ClaimVerdict:
    numbers: dict = {}
    checks = [
        _compare(ctx, "token cosine", "token_cosine", "late", 3, "", "cl", "mim", numbers),
        _compare(ctx, "effective rank", "effective_rank", "late", 1, "", "mim", "cl", numbers),
    ]
    head = _compare(ctx, "head cosine", "head_cosine", "late", 3, "", "cl", "mim", numbers)
    notes = [f"(supplementary, not decisive: {head.text})"] if head.passed is not None else []
    like: dict[str, str] = {}
    notes += _control_note(ctx, "token cosine", "token_cosine", "late", 3, "", numbers, like)
    notes += _control_note(ctx, "effective rank", "effective_rank", "late", 1, "", numbers, like)
    return _verdict(
        3,
        "Representation diversity: CL's late tokens become similar (high cosine, low rank); MIM's stay diverse",
        checks,
        numbers,
        notes,
        like,
    )


def claim_frequency(ctx: _Context) -> ClaimVerdict:
    numbers: dict = {}
    checks = [_compare(ctx, "high-frequency Δ log amplitude", "fourier_high", "late", 2, "", "mim", "cl", numbers)]
    checks += _noise_checks(ctx, numbers)
    like: dict[str, str] = {}
    notes = _control_note(ctx, "high-frequency Δ log amplitude", "fourier_high", "late", 2, "", numbers, like)
    title = "Frequency: CL is low-pass (shape), MIM keeps high frequencies (texture)"
    return _verdict(4, title, checks, numbers, notes, like)


def band_shares(drops: np.ndarray) -> tuple[float, float] | None:
    """Share of the (positive) accuracy drop in the lowest and in the highest third of the bands."""
    hurt = np.clip(drops, 0.0, None)
    total = float(hurt.sum())
    if len(drops) < 2 or total <= 0:
        return None
    k = max(1, round(len(drops) / 3))
    return float(hurt[:k].sum() / total), float(hurt[-k:].sum() / total)


def _noise_checks(ctx: _Context, numbers: dict) -> list[Check]:
    shares: dict[str, tuple[float, float] | None] = {}
    for role in ("cl", "mim"):
        _, drops = ctx.view.noise_curve(getattr(ctx.roles, role))
        share = band_shares(drops)
        shares[role] = share
        numbers[f"{role}_noise_low_share"] = None if share is None else share[0]
        numbers[f"{role}_noise_high_share"] = None if share is None else share[1]
    cl_shares, mim_shares = shares["cl"], shares["mim"]
    if cl_shares is None or mim_shares is None:
        missing = [ctx.label(r) for r, s in shares.items() if s is None]
        return [Check(None, f"noise robustness not measured (or no accuracy drop) for {', '.join(missing)}")]
    (cl_low, cl_high), (mim_low, mim_high) = cl_shares, mim_shares
    return [
        Check(
            cl_low > mim_low,
            f"share of the noise-induced accuracy drop in the lowest bands: CL {cl_low:.0%} vs MIM {mim_low:.0%} "
            "(expected CL > MIM)",
            failure="CL is not hurt more by low-frequency noise",
        ),
        Check(
            mim_high > cl_high,
            f"share in the highest bands: MIM {mim_high:.0%} vs CL {cl_high:.0%} (expected MIM > CL)",
            failure="MIM is not hurt more by high-frequency noise",
        ),
    ]


# -- probes: accuracies over n test images, with binomial (Wilson) intervals --------------------------
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Probe:
    """One probe accuracy in percent over ``n`` test images (None when the rows do not say)."""

    value: float
    n: int | None
    feature: str
    layer: int

    def interval(self) -> tuple[float, float] | None:
        """95 % Wilson score interval in percent (scipy's ``binomtest``), None without ``n``."""
        return wilson_interval(self.value, self.n) if self.n else None

    def text(self) -> str:
        ci = self.interval()
        span = "" if ci is None else f" [{ci[0]:.1f}–{ci[1]:.1f}, n={self.n}]"
        return f"{self.value:.1f}%{span}"


def wilson_interval(percent: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval (percent) of an accuracy of ``percent`` % over ``n`` test images."""
    from scipy.stats import binomtest

    correct = min(n, max(0, round(percent / 100.0 * n)))
    ci = binomtest(correct, n).proportion_ci(confidence_level=confidence, method="wilson")
    return 100.0 * float(ci.low), 100.0 * float(ci.high)


def difference_interval(a: Probe, b: Probe) -> tuple[float, float] | None:
    """95 % interval of a − b (points) from the two Wilson intervals (Newcombe's hybrid score method);
    None when either test count is unknown."""
    ci_a, ci_b = a.interval(), b.interval()
    if ci_a is None or ci_b is None:
        return None
    diff = a.value - b.value
    low = diff - math.hypot(a.value - ci_a[0], ci_b[1] - b.value)
    high = diff + math.hypot(ci_a[1] - a.value, b.value - ci_b[0])
    return low, high


def probe_greater(a: Probe, b: Probe, need: float) -> bool | None:
    """a beats b: by more than ``need`` points AND with the 95 % interval of a − b above 0.

    False when a − b ≤ ``need`` (reversed, or within the margin); None (too few test images to decide)
    when a − b exceeds the margin but its interval still reaches 0."""
    if a.value - b.value <= need:
        return False
    ci = difference_interval(a, b)
    return None if ci is not None and ci[0] <= 0 else True


def probe_indistinguishable(a: Probe, b: Probe, need: float) -> bool:
    """Neither beats the other: |a − b| ≤ ``need`` points, or the interval of a − b holds 0."""
    ci = difference_interval(a, b)
    return abs(a.value - b.value) <= need or (ci is not None and ci[0] <= 0 <= ci[1])


def _probe_margin(a: Probe, b: Probe, tol: Tolerance) -> float:
    """The relative margin of the tolerance rule (probe rows carry no stderr)."""
    return tol.rel * max(abs(a.value), abs(b.value))


def _too_small(a: Probe, b: Probe, need: float) -> str:
    """Why a difference above the margin is not decided: the interval of the difference and the size of one image."""
    ci = difference_interval(a, b)
    assert ci is not None and a.n and b.n
    return (
        f"too few test images to decide: {a.value - b.value:+.1f} points with 95 % interval {ci[0]:+.1f} to "
        f"{ci[1]:+.1f} (n={min(a.n, b.n)}: one image = {100.0 / min(a.n, b.n):.1f} points; margin {need:.1f})"
    )


def _probe_feature(view: ResultView, model: str) -> str:
    return "cls" if view.series(model, "linear_probe_top1", feature="cls").layers.size else "gap"


def _probe_at(view: ResultView, model: str, layer: int, feature: str) -> Probe | None:
    """``model``'s probe at ``layer`` in percent, with the test count its row was measured on."""
    rows = view.rows(model, "linear_probe_top1", head=None, feature=feature, layer=layer)
    if not rows:
        return None
    scale = view.percent_scale("linear_probe_top1")
    n = rows[0].get("n")
    return Probe(float(rows[0]["value"]) * scale, int(n) if n else None, feature, layer)


def _probe(ctx: _Context, role: str, which: Range = "last") -> Probe | None:
    model = getattr(ctx.roles, role)
    if model is None:
        return None
    feature = _probe_feature(ctx.view, model)
    blocks = ctx.blocks(model, which)
    return _probe_at(ctx.view, model, blocks[-1], feature) if blocks else None


def _probe_check(a: Probe, b: Probe, need: float, text: str, failure: str) -> Check:
    """``a`` beats ``b`` by the probe rule; a difference the test count cannot decide is unmeasured, with why."""
    ok = probe_greater(a, b, need)
    if ok is None:
        too_small = _too_small(a, b, need)
        return Check(None, f"{text}: {too_small}", failure=too_small, undecided=True)
    return Check(ok, text, failure=failure)


def claim_separability(ctx: _Context) -> ClaimVerdict:
    numbers: dict = {}
    cl, mim = _probe(ctx, "cl"), _probe(ctx, "mim")
    numbers.update(cl_last_probe=_value(cl), mim_last_probe=_value(mim))
    checks: list[Check] = []
    if cl is None or mim is None:
        checks.append(Check(None, _missing(ctx, "linear_probe_top1", {"cl": cl, "mim": mim})))
    else:
        checks.append(
            _probe_check(
                cl,
                mim,
                _probe_margin(cl, mim, ctx.tol),
                f"last-layer linear probe: CL {ctx.roles.cl} {cl.text()} ({cl.feature}) vs "
                f"MIM {ctx.roles.mim} {mim.text()} ({mim.feature}) (expected CL > MIM)",
                failure="CL's last layer is not more linearly separable than MIM's",
            )
        )
    checks.append(_mim_best_layer(ctx, numbers))
    notes: list[str] = []
    like: dict[str, str] = {}
    if ctx.roles.control is not None:
        control = _probe(ctx, "control")
        numbers["control_last_probe"] = _value(control)
        checks.append(_probe_vs_control(ctx, cl, control))
        notes += _probe_like_control(ctx, "mim", mim, control, like)
    title = "Linear separability: CL's last layers probe best; MIM's best probe layer is in the middle"
    return _verdict(5, title, checks, numbers, notes, like)


def _probe_like_control(
    ctx: _Context, role: str, probe: Probe | None, control: Probe | None, like: dict[str, str]
) -> list[str]:
    """Whether ``role``'s last-layer probe is indistinguishable from the control's (appended to ``like``)."""
    if probe is None or control is None:
        return []
    same = probe_indistinguishable(probe, control, _probe_margin(probe, control, ctx.tol))
    verdict = "indistinguishable from" if same else "differs from"
    note = f"{role.upper()}'s last-layer probe {probe.text()} {verdict} the untrained control's {control.text()}"
    if same:
        like.setdefault(role, note)
    return [note]


def _mim_best_layer(ctx: _Context, numbers: dict) -> Check:
    model = ctx.roles.mim
    feature = _probe_feature(ctx.view, model)
    series = ctx.view.series(model, "linear_probe_top1", feature=feature)
    last = ctx.view.num_layers(model)
    if len(series) < 2 or last is None or last not in series.layers:
        return Check(None, f"per-layer linear probe not measured for MIM {model}")
    best_layer = int(series.layers[int(np.argmax(series.values))])
    best, at_last = _probe_at(ctx.view, model, best_layer, feature), _probe_at(ctx.view, model, last, feature)
    assert best is not None and at_last is not None
    numbers.update(mim_best_probe_layer=float(best_layer), mim_best_probe=best.value)
    text = (
        f"MIM {model}'s best probe layer: {best_layer} of {last} ({best.text()} vs {at_last.text()} at the last layer)"
    )
    if best_layer == last:
        return Check(False, text, failure="MIM's best probe layer is its last")
    return _probe_check(
        best,
        at_last,
        _probe_margin(best, at_last, ctx.tol),
        text,
        failure=f"MIM's best probe layer ({best_layer}) is not clearly above its last "
        "(difference within the relative margin)",
    )


def _probe_vs_control(ctx: _Context, cl: Probe | None, control: Probe | None) -> Check:
    """CL's last-layer probe must beat the control's by more than ``probe_points`` (a worse CL never holds)."""
    if cl is None or control is None:
        return Check(None, "linear probe not measured for CL or the control")
    return _probe_check(
        cl,
        control,
        ctx.tol.probe_points,
        f"CL last-layer probe {cl.text()} vs untrained control {control.text()} "
        f"(must be > {ctx.tol.probe_points:g} points above)",
        failure="indistinguishable from the untrained control",
    )


def change_centre(view: ResultView, model: str) -> float | None:
    """Centre of representation change over relative depth: Σ l·(1 − cos_l) / Σ (1 − cos_l) / L."""
    series = view.series(model, "depth_cosine")
    keep = series.layers >= 1
    layers, change = series.layers[keep], np.clip(1.0 - series.values[keep], 0.0, None)
    depth = view.num_layers(model)
    if not len(layers) or change.sum() <= 0 or not depth:
        return None
    return float((layers * change).sum() / change.sum() / depth)


def claim_layers(ctx: _Context) -> ClaimVerdict:
    centres = {
        role: change_centre(ctx.view, getattr(ctx.roles, role))
        for role in ("cl", "mim", "control")
        if getattr(ctx.roles, role) is not None
    }
    numbers = {f"{role}_change_centre": value for role, value in centres.items()}
    proxy = "proxy: centre of representation change 1 − depth_cosine over relative depth"
    cl, mim, control = centres.get("cl"), centres.get("mim"), centres.get("control")
    if cl is None or mim is None:
        checks = [Check(None, f"depth_cosine not measured for CL or MIM ({proxy})")]
    else:
        checks = [
            Check(
                cl > mim,
                f"{proxy}: CL {cl:.2f} vs MIM {mim:.2f} (expected CL later)",
                failure="CL's representation does not change later in depth than MIM's",
            )
        ]
    notes: list[str] = []
    like: dict[str, str] = {}
    for role, centre in (("cl", cl), ("mim", mim)):
        if control is None or centre is None:
            continue
        same = indistinguishable(Estimate(centre, math.nan), Estimate(control, math.nan), ctx.tol)
        notes.append(
            f"{role.upper()}'s centre {centre:.2f} {'indistinguishable from' if same else 'differs from'} "
            f"the untrained control's {control:.2f}"
        )
        if same:
            like.setdefault(role, notes[-1])
    title = "Which layers matter: later layers for CL, early layers for MIM (a proxy)"
    return _verdict(6, title, checks, numbers, notes, like)


def claim_hybrid(ctx: _Context) -> ClaimVerdict:
    title = "Hybrid (1 − λ)·L_MIM + λ·L_CL: beats both in probing; early layers like MIM, late like CL"
    if ctx.roles.hybrid is None:
        return ClaimVerdict(7, title, NOT_MEASURED, "no hybrid model given", {})
    numbers: dict = {}
    probes = {role: _probe(ctx, role) for role in ("hybrid", "cl", "mim")}
    numbers.update({f"{role}_last_probe": _value(e) for role, e in probes.items()})
    checks: list[Check] = []
    hybrid, cl, mim = probes["hybrid"], probes["cl"], probes["mim"]
    if hybrid is None or cl is None or mim is None:
        checks.append(Check(None, _missing(ctx, "linear_probe_top1", probes)))
    else:
        best = max(cl, mim, key=lambda p: p.value)
        checks.append(
            _probe_check(  # the probe rule, as for finding 5: beyond the margin, and the interval excludes 0
                hybrid,
                best,
                _probe_margin(hybrid, best, ctx.tol),
                f"last-layer probe: hybrid {hybrid.text()} vs best of CL/MIM {best.text()}",
                failure="the hybrid does not beat both in linear probing",
            )
        )
    checks.append(_closer(ctx, "early", "mim", "cl", numbers))
    checks.append(_closer(ctx, "late", "cl", "mim", numbers))
    like: dict[str, str] = {}
    notes = _probe_like_control(ctx, "hybrid", hybrid, _probe(ctx, "control"), like)
    return _verdict(7, title, checks, numbers, notes, like)


def _closer(ctx: _Context, which: Range, near: str, far: str, numbers: dict) -> Check:
    est = {role: ctx.estimate(getattr(ctx.roles, role), "attention_distance", which) for role in ("hybrid", near, far)}
    for role, e in est.items():
        numbers[f"{role}_{which}_attention_distance"] = None if e is None else e.value
    hybrid, near_est, far_est = est["hybrid"], est[near], est[far]
    if hybrid is None or near_est is None or far_est is None:
        return Check(None, _missing(ctx, "attention_distance", est))
    h = hybrid.value
    ok = abs(h - near_est.value) < abs(h - far_est.value)
    return Check(
        ok,
        f"{which} attention distance: hybrid {h:.1f} px, {near.upper()} {near_est.value:.1f} px, "
        f"{far.upper()} {far_est.value:.1f} px (expected closer to {near.upper()})",
        failure=f"the hybrid's {which} layers are not closer to {near.upper()}",
    )


CLAIMS: tuple[Callable[[_Context], ClaimVerdict], ...] = (
    claim_distance,
    claim_collapse,
    claim_diversity,
    claim_frequency,
    claim_separability,
    claim_layers,
    claim_hybrid,
)


def evaluate_claims(
    results: Results,
    cl: str,
    mim: str,
    control: str | None = None,
    hybrid: str | None = None,
    tolerance: Tolerance = Tolerance(),
) -> list[ClaimVerdict]:
    """Evaluate findings 1–7 for the models labelled ``cl`` and ``mim`` (optionally an untrained
    ``control`` of the same architecture and a ``hybrid``). Raises KeyError for an unknown label."""
    view = ResultView(results)
    known = view.models()
    for role, label in (("cl", cl), ("mim", mim), ("control", control), ("hybrid", hybrid)):
        if label is not None and label not in known:
            raise KeyError(f"{role} {label!r}: no such model in the results; available: {', '.join(known) or 'none'}")
    ctx = _Context(view, Roles(cl, mim, control, hybrid), tolerance)
    return [claim(ctx) for claim in CLAIMS]


def short_title(verdict: ClaimVerdict) -> str:
    """The finding's name without its statement: "Attention distance"."""
    return verdict.title.split(":", 1)[0].split(" (", 1)[0]


def format_claims_table(verdicts: list[ClaimVerdict], width: int = 120, full: bool = False) -> str:
    """One line per finding: id, status, name and the sentence that decides it (cut to ``width``); with
    ``full``, every finding's whole evidence wrapped below its line."""
    status_width = max([len("verdict")] + [len(v.status) for v in verdicts])
    name_width = max([len("finding")] + [len(short_title(v)) for v in verdicts])
    lines = [f"{'#':>2}  {'verdict':<{status_width}}  {'finding':<{name_width}}  why"]
    for v in verdicts:
        line = f"{v.claim_id:>2}  {v.status:<{status_width}}  {short_title(v):<{name_width}}  {v.summary}".rstrip()
        lines.append(line if full or len(line) <= width else line[: width - 1] + "…")
        if full:
            indent = " " * 4
            lines += textwrap.wrap(v.evidence, width=width, initial_indent=indent, subsequent_indent=indent)
    return "\n".join(lines)


def summary_line(verdicts: list[ClaimVerdict], tail: str = "") -> str:
    """One line: "findings 1, 2, 5 of 7 hold; 6: holds, but CL ≈ untrained; 3: does not hold; report: ..."."""
    held = [str(v.claim_id) for v in verdicts if v.status == HOLDS]
    parts = [f"findings {', '.join(held)} of {len(verdicts)} hold" if held else f"no finding of {len(verdicts)} holds"]
    statuses = list(dict.fromkeys(v.status for v in verdicts if v.status != HOLDS))
    statuses.sort(key=lambda status: [HOLDS, UNDECIDED, FAILS, NOT_MEASURED].index(outcome_of(status)))
    for status in statuses:
        parts.append(f"{', '.join(str(v.claim_id) for v in verdicts if v.status == status)}: {status}")
    return "; ".join(parts + ([tail] if tail else []))


def print_warnings(verdicts: list[ClaimVerdict]) -> None:
    """A warning on stderr for each finding the run is too small to decide."""
    for v in verdicts:
        if v.status == UNDECIDED:
            print(f"warning: finding {v.claim_id} cannot be decided on this run ({v.summary}); "
                  "more test images (--num-images) narrow the intervals", file=sys.stderr)  # fmt: skip


@dataclass(frozen=True)
class ClaimsRecord:
    """What ``claims.json`` holds: the roles, the tolerances and every verdict, and ``others``: the
    same findings judged with other roles on the same run (the demo's: MAE as the MIM model)."""

    roles: Roles
    verdicts: list[ClaimVerdict]
    tolerance: Tolerance = Tolerance()
    others: tuple[ClaimsRecord, ...] = ()

    def to_dict(self) -> dict:
        return {
            "roles": asdict(self.roles),
            "tolerance": asdict(self.tolerance),
            "verdicts": [v.to_dict() for v in self.verdicts],
            "others": [other.to_dict() for other in self.others],
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "claims.json") -> ClaimsRecord:
        """Read what :meth:`to_dict` wrote; a malformed record is a ValueError naming ``source``."""
        try:
            roles = Roles(**data["roles"])
            verdicts = [ClaimVerdict(**v) for v in data["verdicts"]]
            tolerance = Tolerance(**data.get("tolerance", {}))
            others = tuple(cls.from_dict(other, source) for other in data.get("others", []))
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{source}: not a vitscope claims file ({err})") from err
        for v in verdicts:
            try:
                outcome_of(v.status)
            except ValueError as err:
                raise ValueError(f"{source}: {err}") from None
        return cls(roles, verdicts, tolerance, others)

    def evaluated_on(self, results: Results) -> ClaimsRecord:
        """The same roles and tolerances (its ``others`` included) judged again on ``results``."""
        fresh = evaluate_claims(results, **vars(self.roles), tolerance=self.tolerance)
        return ClaimsRecord(self.roles, fresh, self.tolerance, tuple(o.evaluated_on(results) for o in self.others))


def save_claims(
    out_dir: str | Path,
    verdicts: list[ClaimVerdict],
    roles: Roles,
    tolerance: Tolerance = Tolerance(),
    others: Iterable[ClaimsRecord] = (),
) -> Path:
    """Write the results directory's ``claims.json`` (the roles, the tolerances, every verdict, the
    verdicts with ``others``' roles and the run id), changing the committed run whole
    (:func:`vitscope.rundir.update_run`)."""
    from vitscope.rundir import update_run

    with update_run(out_dir) as run_dir:
        run_dir.save_claims(ClaimsRecord(roles, verdicts, tolerance, tuple(others)).to_dict())
    return Path(out_dir) / RunDirectory.CLAIMS


def load_claims(out_dir: str | Path) -> ClaimsRecord | None:
    """The results directory's ``claims.json`` if present; a malformed file is a ValueError naming it.

    A record evaluated on another run (its ``run_id`` is not the directory's) is never shown as it is: its
    roles and tolerances are evaluated again on this run's results, with a note on stderr."""
    run_dir = RunDirectory(out_dir)
    data = run_dir.load_claims()
    if data is None:
        return None
    source = str(run_dir.path / run_dir.CLAIMS)
    record = ClaimsRecord.from_dict(data, source)
    if run_dir.claims_are_current(data):
        return record
    print(f"note: {source} was evaluated on run {data.get('run_id') or 'unknown'}, not on this run "
          f"({run_dir.run_id}); its claims are evaluated again on this run", file=sys.stderr)  # fmt: skip
    return record.evaluated_on(run_dir.load_results())
