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
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from vitscope.report.series import ResultView, Series, thirds
from vitscope.results import Results, RunDirectory

HOLDS, FAILS, NOT_MEASURED = "holds", "does not hold", "not measured"
STATUSES = (HOLDS, FAILS, NOT_MEASURED)

Range = Literal["early", "late", "last"]


@dataclass
class ClaimVerdict:
    """One finding's verdict; ``numbers`` holds the values behind it (None where not measured)."""

    claim_id: int
    title: str
    status: str
    evidence: str
    numbers: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


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


def _value(est: Estimate | None) -> float | None:
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


def _missing(ctx: _Context, metric: str, models: dict[str, Estimate | None]) -> str:
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
    ctx: _Context, what: str, metric: str, which: Range, digits: int, unit: str, numbers: dict
) -> list[str]:
    """Say whether CL's value is indistinguishable from the untrained control's."""
    if ctx.roles.control is None:
        return []
    cl = ctx.estimate(ctx.roles.cl, metric, which)
    control = ctx.estimate(ctx.roles.control, metric, which)
    numbers[f"control_{which}_{metric}"] = None if control is None else control.value
    if cl is None or control is None:
        return [f"control: {metric} not measured"]
    same = indistinguishable(cl, control, ctx.tol)
    verdict = "indistinguishable from" if same else "differs from"
    return [
        f"CL's {which} {what} {_fmt(cl.value, digits, unit)} {verdict} the untrained control's "
        f"{_fmt(control.value, digits, unit)}"
    ]


def _verdict(claim_id: int, title: str, checks: list[Check], numbers: dict, notes: Iterable[str] = ()) -> ClaimVerdict:
    """Holds when every check was measured and passed; does not hold when a measured check failed; else
    not measured (a check whose numbers are missing can never let a finding hold)."""
    measured = [c for c in checks if c.passed is not None]
    failed = [c for c in measured if not c.passed]
    if failed:
        status, headline = FAILS, failed[0].failure
    elif len(measured) < len(checks) or not checks:
        status = NOT_MEASURED
        headline = "cannot be decided: part of its evidence is not measured" if measured else ""
    else:
        status, headline = HOLDS, ""
    parts = [c.text for c in checks] + list(notes)
    evidence = "; ".join(parts)
    if headline:
        evidence = f"{headline}. {evidence}"
    return ClaimVerdict(claim_id, title, status, evidence, numbers)


# ---------------------------------------------------------------------------------------------------
# the claims
# ---------------------------------------------------------------------------------------------------
def claim_distance(ctx: _Context) -> ClaimVerdict:
    numbers: dict = {}
    checks = [_compare(ctx, "attention distance", "attention_distance", "late", 1, " px", "cl", "mim", numbers)]
    early = _compare(ctx, "attention distance", "attention_distance", "early", 1, " px", "cl", "mim", numbers)
    notes = [f"(for reference, {early.text})"] if early.passed is not None else []
    notes += _control_note(ctx, "attention distance", "attention_distance", "late", 1, " px", numbers)
    return _verdict(1, "Attention distance: CL attends globally, MIM locally (later layers)", checks, numbers, notes)


def claim_collapse(ctx: _Context) -> ClaimVerdict:
    numbers: dict = {}
    checks = [_compare(ctx, "NMI", "nmi", "late", 3, "", "mim", "cl", numbers)]
    checks.append(_peaked_rows(ctx, numbers))
    notes = _control_note(ctx, "NMI", "nmi", "late", 3, "", numbers)
    return _verdict(
        2,
        "Attention collapse: CL's late attention is the same for every query (low NMI, peaked rows)",
        checks,
        numbers,
        notes,
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
    notes += _control_note(ctx, "token cosine", "token_cosine", "late", 3, "", numbers)
    notes += _control_note(ctx, "effective rank", "effective_rank", "late", 1, "", numbers)
    return _verdict(
        3,
        "Representation diversity: CL's late tokens become similar (high cosine, low rank); MIM's stay diverse",
        checks,
        numbers,
        notes,
    )


def claim_frequency(ctx: _Context) -> ClaimVerdict:
    numbers: dict = {}
    checks = [_compare(ctx, "high-frequency Δ log amplitude", "fourier_high", "late", 2, "", "mim", "cl", numbers)]
    checks += _noise_checks(ctx, numbers)
    notes = _control_note(ctx, "high-frequency Δ log amplitude", "fourier_high", "late", 2, "", numbers)
    return _verdict(
        4, "Frequency: CL is low-pass (shape), MIM keeps high frequencies (texture)", checks, numbers, notes
    )


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


def _probe_feature(view: ResultView, model: str) -> str:
    return "cls" if view.series(model, "linear_probe_top1", feature="cls").layers.size else "gap"


def _probe(ctx: _Context, role: str, which: Range) -> tuple[Estimate | None, str]:
    model = getattr(ctx.roles, role)
    feature = _probe_feature(ctx.view, model)
    est = ctx.estimate(model, "linear_probe_top1", which, feature=feature)
    scale = ctx.view.percent_scale("linear_probe_top1")
    return (None if est is None else Estimate(est.value * scale, est.stderr * scale)), feature


def claim_separability(ctx: _Context) -> ClaimVerdict:
    numbers: dict = {}
    cl, cl_feat = _probe(ctx, "cl", "last")
    mim, mim_feat = _probe(ctx, "mim", "last")
    numbers.update(cl_last_probe=_value(cl), mim_last_probe=_value(mim))
    checks: list[Check] = []
    if cl is None or mim is None:
        checks.append(Check(None, _missing(ctx, "linear_probe_top1", {"cl": cl, "mim": mim})))
    else:
        checks.append(
            Check(
                greater(cl, mim, ctx.tol),
                f"last-layer linear probe: CL {ctx.roles.cl} {cl.value:.1f}% ({cl_feat}) vs "
                f"MIM {ctx.roles.mim} {mim.value:.1f}% ({mim_feat}) (expected CL > MIM)",
                failure="CL's last layer is not more linearly separable than MIM's",
            )
        )
    checks.append(_mim_best_layer(ctx, numbers))
    if ctx.roles.control is not None:
        checks.append(_probe_vs_control(ctx, cl, numbers))
    return _verdict(
        5, "Linear separability: CL's last layers probe best; MIM's best probe layer is in the middle", checks, numbers
    )


def _mim_best_layer(ctx: _Context, numbers: dict) -> Check:
    model = ctx.roles.mim
    series = ctx.view.series(model, "linear_probe_top1", feature=_probe_feature(ctx.view, model))
    last = ctx.view.num_layers(model)
    if len(series) < 2 or last not in series.layers:
        return Check(None, f"per-layer linear probe not measured for MIM {model}")
    scale = ctx.view.percent_scale("linear_probe_top1")
    values, stderr = series.values * scale, series.stderr * scale
    best = int(np.argmax(values))
    at_last = int(np.flatnonzero(series.layers == last)[0])
    numbers.update(mim_best_probe_layer=float(series.layers[best]), mim_best_probe=float(values[best]))
    best_est, last_est = Estimate(values[best], stderr[best]), Estimate(values[at_last], stderr[at_last])
    best_is_last = series.layers[best] == last
    ok = not best_is_last and greater(best_est, last_est, ctx.tol)
    failure = (
        "MIM's best probe layer is its last"
        if best_is_last
        else f"MIM's best probe layer ({series.layers[best]}) is not clearly above its last "
        "(difference within the stderr / relative margin)"
    )
    return Check(
        bool(ok),
        f"MIM {model}'s best probe layer: {series.layers[best]} of {last} "
        f"({values[best]:.1f}% vs {values[at_last]:.1f}% at the last layer)",
        failure=failure,
    )


def _probe_vs_control(ctx: _Context, cl: Estimate | None, numbers: dict) -> Check:
    control, _ = _probe(ctx, "control", "last")
    numbers["control_last_probe"] = _value(control)
    if cl is None or control is None:
        return Check(None, "linear probe not measured for CL or the control")
    above = cl.value - control.value > max(ctx.tol.probe_points, _margin(cl, control, ctx.tol))
    return Check(
        above,
        f"CL last-layer probe {cl.value:.1f}% vs untrained control {control.value:.1f}% "
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
    notes = []
    if control is not None and cl is not None:
        same = indistinguishable(Estimate(cl, math.nan), Estimate(control, math.nan), ctx.tol)
        notes.append(
            f"CL's centre {cl:.2f} {'indistinguishable from' if same else 'differs from'} "
            f"the untrained control's {control:.2f}"
        )
    return _verdict(
        6, "Which layers matter: later layers for CL, early layers for MIM (a proxy)", checks, numbers, notes
    )


def claim_hybrid(ctx: _Context) -> ClaimVerdict:
    title = "Hybrid (1 − λ)·L_MIM + λ·L_CL: beats both in probing; early layers like MIM, late like CL"
    if ctx.roles.hybrid is None:
        return ClaimVerdict(7, title, NOT_MEASURED, "no hybrid model given", {})
    numbers: dict = {}
    probes = {role: _probe(ctx, role, "last")[0] for role in ("hybrid", "cl", "mim")}
    numbers.update({f"{role}_last_probe": _value(e) for role, e in probes.items()})
    checks: list[Check] = []
    hybrid, cl, mim = probes["hybrid"], probes["cl"], probes["mim"]
    if hybrid is None or cl is None or mim is None:
        checks.append(Check(None, _missing(ctx, "linear_probe_top1", probes)))
    else:
        best = max(cl.value, mim.value)
        checks.append(
            Check(
                hybrid.value >= best,
                f"last-layer probe: hybrid {hybrid.value:.1f}% vs best of CL/MIM {best:.1f}%",
                failure="the hybrid does not beat both in linear probing",
            )
        )
    checks.append(_closer(ctx, "early", "mim", "cl", numbers))
    checks.append(_closer(ctx, "late", "cl", "mim", numbers))
    return _verdict(7, title, checks, numbers)


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


def format_claims_table(verdicts: list[ClaimVerdict], width: int = 100) -> str:
    """A plain-text table: id, status, title, then the evidence wrapped below."""
    lines = [f"{'#':>2}  {'status':<14}  claim", "-" * width]
    for v in verdicts:
        lines.append(f"{v.claim_id:>2}  {v.status:<14}  {v.title}")
        lines += textwrap.wrap(v.evidence, width=width, initial_indent=" " * 20, subsequent_indent=" " * 20)
    return "\n".join(lines)


@dataclass(frozen=True)
class ClaimsRecord:
    """What ``claims.json`` holds: the roles, the tolerances and every verdict."""

    roles: Roles
    verdicts: list[ClaimVerdict]
    tolerance: Tolerance = Tolerance()

    def to_dict(self) -> dict:
        return {
            "roles": asdict(self.roles),
            "tolerance": asdict(self.tolerance),
            "verdicts": [v.to_dict() for v in self.verdicts],
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "claims.json") -> ClaimsRecord:
        """Read what :meth:`to_dict` wrote; a malformed record is a ValueError naming ``source``."""
        try:
            roles = Roles(**data["roles"])
            verdicts = [ClaimVerdict(**v) for v in data["verdicts"]]
            tolerance = Tolerance(**data.get("tolerance", {}))
        except (KeyError, TypeError) as err:
            raise ValueError(f"{source}: not a vitscope claims file ({err})") from err
        bad = [v.status for v in verdicts if v.status not in STATUSES]
        if bad:
            raise ValueError(f"{source}: unknown claim status {bad[0]!r}")
        return cls(roles, verdicts, tolerance)


def save_claims(
    out_dir: str | Path, verdicts: list[ClaimVerdict], roles: Roles, tolerance: Tolerance = Tolerance()
) -> Path:
    """Write the results directory's ``claims.json`` (the roles, the tolerances, every verdict and the run id),
    changing the committed run whole (:func:`vitscope.rundir.update_run`)."""
    from vitscope.rundir import update_run

    with update_run(out_dir) as run_dir:
        run_dir.save_claims(ClaimsRecord(roles, verdicts, tolerance).to_dict())
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
    results = run_dir.load_results()
    fresh = evaluate_claims(results, **vars(record.roles), tolerance=record.tolerance)
    return ClaimsRecord(record.roles, fresh, record.tolerance)
