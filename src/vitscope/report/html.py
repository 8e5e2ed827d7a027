"""The self-contained HTML report: inline CSS, figures embedded as base64 PNG, no external resources.

One ``<section id=...>`` per analysis (ids are stable: see :data:`SECTIONS`), each with a short
"how to read it" note, plus the run summary and the claims table.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vitscope.report.claims import ClaimsRecord, ClaimVerdict
from vitscope.report.explorer import EXPLORER_CSS
from vitscope.report.figures import SavedFigure, hex_color, model_colors
from vitscope.report.series import ResultView


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    how_to_read: str
    paper: str = ""  # the paper figure or section the analysis reproduces


SECTIONS: tuple[Section, ...] = (
    Section(
        "attention-distance",
        "Attention distance",
        "Mean distance in pixels between a query patch and the keys it attends to, weighted by attention. "
        "Dots are single heads, the line is the layer mean (band: ± stderr). Park et al. find CL attends "
        "globally (large distances) and MIM locally, most clearly in later layers; lower layers mix local "
        "and global heads (Raghu et al.). An untrained ViT has near-uniform attention, hence a large distance "
        "too: compare with an untrained control.",
        paper="Park et al. 2023 (CL vs MIM), Sec. 2, Fig. 2 (attention distance); Raghu et al. 2021 (attention distance per head, local and global heads in lower layers)",
    ),
    Section(
        "attention-maps",
        "Attention maps",
        "The attention explorer: one query token's attention over the image's patches, for every model side by "
        "side; choose the image, block and head (or the mean over heads) and click a patch to make it the query. "
        "In CL's later blocks every query attends to the same region (attention collapse: moving the query "
        "does not move the map); MIM's maps stay around the query; an untrained model's are near uniform.",
        paper="Park et al. 2023, Sec. 2 and Fig. 2: attention maps of a few queries (attention collapse)",
    ),
    Section(
        "nmi",
        "Normalized mutual information",
        "NMI between query and key positions: 0 when every query has the same attention distribution, "
        "1 when each query attends to its own keys. CL's later layers have low NMI (collapse), MIM's stay high. "
        "Low NMI means collapse only when rows are peaked: read it together with attention entropy.",
        paper="Park et al. 2023, Sec. 2, Fig. 2 (normalized mutual information)",
    ),
    Section(
        "attention-entropy",
        "Attention entropy",
        "Entropy of each attention row (nats), averaged over queries; the dashed line is log N, the entropy of "
        "uniform attention. Low NMI with entropy well below log N is collapse onto the same few tokens; low NMI "
        "with entropy near log N is near-uniform attention, which an untrained model shows too.",
        paper="not in the papers: a check that low NMI is collapse rather than uniform attention",
    ),
    Section(
        "token-cosine",
        "Token similarity",
        "Mean cosine similarity between different spatial tokens of one image (layer 0 = patch embedding). "
        "CL's tokens become alike in later layers; MIM keeps them diverse.",
        paper="Park et al. 2023, Sec. 2 (token and head similarity of the attention collapse)",
    ),
    Section(
        "head-cosine",
        "Head similarity",
        "Mean cosine similarity between the outputs of different heads for the same token. CL's heads become "
        "redundant in later layers; MIM's stay distinct.",
        paper="Park et al. 2023, Sec. 2 (token and head similarity of the attention collapse)",
    ),
    Section(
        "depth-cosine",
        "Similarity across depth",
        "Cosine similarity of a token between consecutive blocks; 1 − value is how much a block changes the "
        "representation. The claims use where that change is concentrated as a proxy for which layers matter "
        "(later layers for CL, early layers for MIM).",
        paper="Park et al. 2023, Sec. 4 (which layers play a key role)",
    ),
    Section(
        "singular-values",
        "Singular values and effective rank",
        "Singular values of the stacked spatial tokens of a few images (log scale), and their effective rank. "
        "A few dominant singular values (low effective rank) mean the tokens span few directions, as in CL's "
        "later layers; MIM keeps a flatter spectrum.",
        paper="Park et al. 2023, Sec. 3 (singular values of the token representations)",
    ),
    Section(
        "fourier",
        "Frequency content",
        "Log amplitude of the 2-D Fourier transform of the feature maps relative to the zero frequency, from the "
        "lowest to the highest frequency (one line per block, colour = depth); the first figure follows its value "
        "at the highest frequency. Lower = more low-pass. CL's features are low-pass (shape), MIM's keep high "
        "frequencies (texture).",
        paper="Park et al. 2023, Sec. 3 (Fourier analysis of representations; Park & Kim 2022)",
    ),
    Section(
        "noise-robustness",
        "Robustness to frequency-band noise",
        "Accuracy drop when Gaussian noise restricted to one radial frequency band is added to the images, bands "
        "from lowest to highest frequency. CL is hurt more by low-frequency noise, MIM by high-frequency noise.",
        paper="Park et al. 2023, Sec. 3 (robustness to frequency-band noise)",
    ),
    Section(
        "linear-probe",
        "Linear probing per layer",
        "Top-1 accuracy of a linear classifier on each layer's features (CLS token, or the mean of the spatial "
        "tokens); band: 95 % binomial (Wilson) interval over the test images. CL's accuracy rises to the last layer; "
        "MIM's peaks in the middle and falls towards the end. At depth 0 the CLS token is the learned embedding "
        "itself, the same for every image, so its probe is at chance by construction.",
        paper="Park et al. 2023, Sec. 4 (linear probing of intermediate layers); Raghu et al. 2021 (linear probes per layer, CLS vs GAP)",
    ),
    Section(
        "tsne",
        "Token t-SNE",
        "2-D t-SNE of the spatial tokens of a few images: colour = class, marker = image. CL's tokens group by "
        "image and class (linearly separable); MIM's tokens of different images intermingle.",
        paper="Park et al. 2023, Sec. 3 (t-SNE of token representations)",
    ),
    Section(
        "cka",
        "CKA similarity",
        "Linear CKA between the layers of one model or of two models (1 = the same representation up to rotation "
        "and scale). Raghu et al.: a ViT's layers are more uniformly similar across depth than a ResNet's, whose "
        "lower and upper layers form separate blocks.",
        paper="Raghu et al. 2021, Figs. 1–2 (CKA within and between ViTs and ResNets)",
    ),
    Section(
        "residual-ratio",
        "Residual connections",
        "Norm of the residual stream relative to the attention and MLP branch outputs, per block. Large ratios "
        "mean the skip connections carry most of the signal (Raghu et al.).",
        paper="Raghu et al. 2021 (the role of skip connections)",
    ),
    Section(
        "localisation",
        "Spatial localisation",
        "For a few token positions of the last block (red box), linear CKA over images with the input patch "
        "embedding at every position. A model that keeps spatial information to the top shows a peak at the "
        "token's own position (Raghu et al.: ViTs do, more so when trained with a CLS token than with global "
        "pooling).",
        paper="Raghu et al. 2021 (spatial localisation with CLS vs GAP)",
    ),
)

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2329;background:#f6f7f9;line-height:1.45}
header{background:#1f3b57;color:#fff;padding:18px 32px}header h1{margin:0;font-size:1.6em}header p{margin:4px 0 0;opacity:.85}
nav{background:#fff;border-bottom:1px solid #dde1e6;padding:8px 32px;font-size:.9em;display:flex;flex-wrap:wrap;gap:4px 14px}nav a{color:#1f5f99;text-decoration:none;white-space:nowrap}
main{max-width:1180px;margin:0 auto;padding:8px 24px 40px}
section{background:#fff;border:1px solid #dde1e6;border-radius:6px;margin:18px 0;padding:6px 22px 16px}
h2{font-size:1.25em;border-bottom:1px solid #eef0f3;padding-bottom:6px}
p.how{background:#f1f6fb;border-left:4px solid #6d9bc3;padding:8px 12px;margin:8px 0 12px}
figure{display:block;margin:12px 0}figure img{width:100%;height:auto;border:1px solid #eef0f3}figcaption{font-size:.85em;color:#55606b}
p.paper{font-size:.85em;color:#55606b;margin:-4px 0 10px}
.scroll{overflow-x:auto;max-width:100%}table{border-collapse:collapse;font-size:.9em;margin:6px 0}td code,td.spec{word-break:break-all}td,th{border:1px solid #dde1e6;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f1f3f5}
.status{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;white-space:nowrap}
.holds{background:#d7f0dc;color:#17692c}.does-not-hold{background:#f8d8d6;color:#9b1c14}.not-measured{background:#e6e8eb;color:#4a5560}
.undecided,.caveat{background:#fbeccb;color:#7a4e00}
.see{font-size:.85em}
.swatch{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:6px;vertical-align:-1px}
.missing{color:#6b7580;font-style:italic}code{background:#f1f3f5;padding:0 4px;border-radius:3px}
"""


def _status_class(verdict: ClaimVerdict) -> str:
    """CSS classes of a verdict's badge: its outcome, plus ``caveat`` when the status qualifies it (amber,
    never the plain green of "holds")."""
    outcome = verdict.outcome.replace(" ", "-")
    return outcome if verdict.status == verdict.outcome else f"{outcome} caveat"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Rows are pre-escaped HTML cells."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _grid_text(info: dict[str, Any]) -> str:
    """ "7×7", or "56×56 → 7×7" for a model whose grid shrinks stage by stage (CNN, Swin)."""
    grids = [g for g in info.get("grids") or [] if g] or ([info["grid"]] if info.get("grid") else [])
    if not grids:
        return "–"
    first, last = "×".join(map(str, grids[0])), "×".join(map(str, grids[-1]))
    return first if first == last else f"{first} → {last}"


def _attention_text(info: dict[str, Any]) -> str:
    """ "global", "windows 7×7", "windows 14×14 + global" or "none" (a CNN)."""
    if info.get("kind") == "cnn":
        return "none"
    windows = info.get("windows") or []
    sizes = sorted({"×".join(map(str, w)) for w in windows[1:] if w})
    text = " + ".join(f"windows {size}" for size in sizes)
    if any(w is None for w in windows[1:]) or not windows:
        text = f"{text} + global" if text else "global"
    return text


def summary_section(view: ResultView) -> str:
    meta = view.meta
    colors = model_colors(view.models(), view.roles())
    model_rows = []
    for model in view.models():
        info = view.model_meta(model)
        swatch = f'<span class="swatch" style="background:{hex_color(colors[model])}"></span>'
        model_rows.append(
            [
                swatch + _e(model),
                f"<code>{_e(info.get('spec', ''))}</code>",
                _e(info.get("kind", "")),
                _e(info.get("num_layers", "")),
                _e(info.get("num_heads") or "–"),
                _e(info.get("num_prefix_tokens", "")),
                _e(_grid_text(info)),
                _e("×".join(map(str, info.get("patch_size", [])))),
                _e(info.get("num_tokens", "")),
                _e(_attention_text(info)),
            ]
        )
    header = ["model", "spec", "kind", "blocks", "heads", "prefix tokens", "grid", "patch", "N", "attention"]
    models = _table(header, model_rows)
    wall = meta.get("wall_time_s")
    facts = [
        ["data", _e(meta.get("data", "unknown"))],
        ["images", _e(meta.get("num_images", "unknown"))],
        ["seed", _e(meta.get("seed", "unknown"))],
        ["wall time", _e(f"{wall:.1f} s" if isinstance(wall, (int, float)) else "unknown")],
        ["versions", _e(", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items()) or "unknown")],
    ]
    parts = [models, _table(["run", ""], facts), _skipped(meta.get("skipped") or [])]
    notes = meta.get("notes") or []
    if notes:
        parts.append("<p>Notes:</p><ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    return _section("summary", "Run summary", "".join(parts))


def _skipped(skipped: list) -> str:
    if not skipped:
        return "<p>No input files were skipped.</p>"
    items = "".join(
        f"<li><code>{_e(entry[0])}</code>: {_e(entry[1] if len(entry) > 1 else '')}</li>" for entry in skipped[:200]
    )
    more = f"<li>… and {len(skipped) - 200} more</li>" if len(skipped) > 200 else ""
    return f"<details><summary>{len(skipped)} input file(s) skipped</summary><ul>{items}{more}</ul></details>"


# The report sections whose figures show each finding's evidence (ids of SECTIONS).
CLAIM_SECTIONS: dict[int, tuple[str, ...]] = {
    1: ("attention-distance", "attention-maps"),
    2: ("nmi", "attention-entropy", "attention-maps"),
    3: ("token-cosine", "singular-values"),
    4: ("fourier", "noise-robustness"),
    5: ("linear-probe",),
    6: ("depth-cosine", "linear-probe"),
    7: ("attention-distance", "linear-probe"),
}


def _evidence_links(claim_id: int) -> str:
    titles = {section.id: section.title for section in SECTIONS}
    links = [f'<a href="#{_e(sid)}">{_e(titles[sid])}</a>' for sid in CLAIM_SECTIONS.get(claim_id, ())]
    return f'<br><span class="see">see: {" · ".join(links)}</span>' if links else ""


def claims_section(claims: ClaimsRecord | None) -> str:
    if claims is None:
        body = (
            '<p class="missing">Claims not evaluated. Run <code>vitscope claims DIR --cl LABEL --mim LABEL '
            "[--control LABEL] [--hybrid LABEL]</code>, then <code>vitscope report DIR</code>.</p>"
        )
        return _section("claims", "The papers' claims", body)
    tol = claims.tolerance
    body = (
        f"<p>Roles: {_role_text(claims)}. Early = the first third of blocks, late = the last third. A difference "
        f"counts when it exceeds {tol.stderr_factor:g} combined standard errors; two numbers are indistinguishable "
        f"within that margin or {tol.rel:.0%} of their size; CL's probe must beat an untrained control by more "
        f"than {tol.probe_points:g} points.</p>" + _verdict_table(claims)
    )
    for other in claims.others:
        body += f"<h3>The same findings with {_role_text(other)}</h3>" + _verdict_table(other)
    return _section("claims", "The papers' claims", body)


def _role_text(claims: ClaimsRecord) -> str:
    return ", ".join(f"{name.upper()} = <b>{_e(label)}</b>" for name, label in vars(claims.roles).items() if label)


def _verdict_table(claims: ClaimsRecord) -> str:
    rows = [
        [
            _e(v.claim_id),
            f'<span class="status {_status_class(v)}">{_e(v.status)}</span>',
            _e(v.title),
            _e(v.evidence) + _evidence_links(v.claim_id),
        ]
        for v in claims.verdicts
    ]
    return _table(["#", "verdict", "claim", "evidence"], rows)


def figure_html(figure: SavedFigure, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    links = f'<a href="figures/{_e(figure.png.name)}">PNG</a>'
    if figure.svg is not None:
        links = f'<a href="figures/{_e(figure.svg.name)}">SVG</a> · ' + links
    return (
        f'<figure id="fig-{_e(figure.key)}"><img src="data:image/png;base64,{data}" alt="{_e(figure.title)}">'
        f"<figcaption>{_e(figure.title)} ({links})</figcaption></figure>"
    )


def _section(section_id: str, title: str, body: str, how: str = "", paper: str = "") -> str:
    how_html = f'<p class="how"><b>How to read it.</b> {_e(how)}</p>' if how else ""
    if paper:
        how_html += f'<p class="paper"><b>In the papers:</b> {_e(paper)}</p>'

    return f'<section id="{_e(section_id)}"><h2>{_e(title)}</h2>{how_html}{body}</section>'


def analysis_sections(figures: Sequence[tuple[SavedFigure, bytes]], explorer: str = "") -> list[str]:
    out = []
    for section in SECTIONS:
        mine = [figure_html(fig, png) for fig, png in figures if fig.section == section.id]
        if section.id == "attention-maps" and explorer:
            mine.insert(0, explorer)
        body = "".join(mine) or '<p class="missing">Not measured in this run.</p>'
        out.append(_section(section.id, section.title, body, section.how_to_read, section.paper))
    return out


def render_html(
    view: ResultView, figures: Sequence[tuple[SavedFigure, bytes]], claims: ClaimsRecord | None, explorer: str = ""
) -> str:
    """The whole page as one string; ``explorer`` is the attention explorer's HTML (:mod:`.explorer`)."""
    toc = [("summary", "Summary"), ("claims", "Claims")] + [(s.id, s.title) for s in SECTIONS]
    nav = "".join(f'<a href="#{_e(i)}">{_e(t)}</a>' for i, t in toc)
    models = ", ".join(view.models()) or "no models"
    body = [summary_section(view), claims_section(claims)] + analysis_sections(figures, explorer)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>vitscope report: {_e(models)}</title><style>{CSS}{EXPLORER_CSS}</style></head><body>"
        f"<header><h1>What do these Vision Transformers learn?</h1><p>vitscope report: {_e(models)}</p></header>"
        f"<nav>{nav}</nav><main>{''.join(body)}</main></body></html>\n"
    )
