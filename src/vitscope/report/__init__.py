"""Reporting on saved results: figures, the self-contained HTML report and the claims verdict.

:mod:`.series` reads curves out of tidy rows, :mod:`.claims` judges the papers' findings,
:mod:`.figures` draws, :mod:`.html` lays out, :mod:`.render` puts a results directory's report together.
"""

from vitscope.report.claims import (
    ClaimsRecord,
    ClaimVerdict,
    Roles,
    Tolerance,
    evaluate_claims,
    format_claims_table,
    load_claims,
    save_claims,
)
from vitscope.report.html import SECTIONS
from vitscope.report.render import render_report, roles_from_meta, write_verdict

__all__ = [
    "ClaimsRecord",
    "ClaimVerdict",
    "Roles",
    "Tolerance",
    "SECTIONS",
    "evaluate_claims",
    "format_claims_table",
    "load_claims",
    "render_report",
    "roles_from_meta",
    "save_claims",
    "write_verdict",
]
