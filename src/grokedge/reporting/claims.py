"""The paper's claims that grokedge can test, one row each, with a verdict: the engine that
evaluates the claims table (``conf/report/claims.yaml``).

``python -m grokedge.report DIR`` writes ``DIR/report/claims.md``: per claim the paper's
number (``conf/report/paper.yaml``), grokedge's (the run or sweep), the control's (ω = 0
runs, other N and seeds, the norm-matched and shrink ablation controls), a verdict and
the file of the report that supports it. Each entry of the table names its rule; the
rules (:data:`RULES`) live in :mod:`.edge_claims`, :mod:`.causal_claims` and
:mod:`.readout_claims`; every threshold is in ``conf/report/verdicts.yaml``. Verdicts and
the row: :mod:`.claim_rows`. Pure functions over a :class:`Collection`, except
:func:`write_claims`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from grokedge.reporting.causal_claims import ablation_claim, curvature_claim, flatness_claim
from grokedge.reporting.claim_rows import Claim
from grokedge.reporting.claim_table import ClaimSpec, check_rules, claim_specs, rules_text
from grokedge.reporting.discover import Collection
from grokedge.reporting.edge_claims import event_claim, g23_claim
from grokedge.reporting.readout_claims import (
    WD_DERIVED_FIELDS,
    class_claim,
    probe_claim,
    wd_claim,
)
from grokedge.reporting.table_format import Table, escape_pipes


class ClaimRule(NamedTuple):
    """A rule of the claims table: the function that judges a claim, and the fields it
    derives for the claim's paper template (beyond ``paper.yaml``'s blocks)."""

    judge: Callable[[Collection, ClaimSpec], Claim]
    paper_fields: frozenset[str] = frozenset()


RULES: dict[str, ClaimRule] = {
    "event_timing": ClaimRule(event_claim),
    "g23_compression": ClaimRule(g23_claim),
    "beyond_controls": ClaimRule(ablation_claim),
    "paper_scale": ClaimRule(flatness_claim),
    "curvature_ratio": ClaimRule(curvature_claim),
    "probe_tolerance": ClaimRule(probe_claim),
    "wd_trend": ClaimRule(wd_claim, WD_DERIVED_FIELDS),
    "class_match": ClaimRule(class_claim),
}
"""The rules a ``claims.yaml`` entry may name (its ``rule``)."""

CLAIMS_MD = "claims.md"


def checked_specs() -> tuple[ClaimSpec, ...]:
    """The claims table, checked: its shape (:func:`.claim_table.parse_claim_table`), and
    every entry's rule and paper template against :data:`RULES`."""
    specs = claim_specs()
    check_rules(specs, {name: rule.paper_fields for name, rule in RULES.items()})
    return specs


def claim(collection: Collection, claim_id: str) -> Claim:
    """The row of the claim ``claim_id`` (its ``id`` in ``claims.yaml``)."""
    specs = {spec.id: spec for spec in checked_specs()}
    if claim_id not in specs:
        raise ValueError(f"claim_id={claim_id!r} is not in claims.yaml: one of {list(specs)}")
    spec = specs[claim_id]
    return RULES[spec.rule].judge(collection, spec)


def claims(collection: Collection) -> list[Claim]:
    """Every claim of the table, in its (the paper's) order."""
    return [RULES[spec.rule].judge(collection, spec) for spec in checked_specs()]


def _support_cell(row: Claim, exists: Callable[[str], bool]) -> str:
    """Links to the first two support files that exist (else to report.md)."""
    found = [s for s in row.support if exists(s)][:2] or ["report.md"]
    return ", ".join(f"[{s}]({s})" for s in found)


def claims_table(rows: list[Claim], exists: Callable[[str], bool] = lambda _: True) -> Table:
    """The claims as a :class:`Table`; ``exists`` says which support files are there."""
    cells = [
        [
            escape_pipes(c.claim),
            escape_pipes(c.definition),
            escape_pipes(c.paper),
            escape_pipes(c.grokedge),
            escape_pipes(c.control),
            f"**{c.verdict}**: {escape_pipes(c.why)}",
            _support_cell(c, exists),
        ]
        for c in rows
    ]
    return Table(
        "Claims of the paper",
        ["claim", "definition", "paper", "grokedge", "control", "verdict", "support"],
        cells,
    )


def rules() -> str:
    """The verdict rules (``claims.yaml``'s ``rules_text``) with the thresholds of
    ``verdicts.yaml`` filled in."""
    return rules_text()


def claims_markdown(collection: Collection, exists: Callable[[str], bool] = lambda _: True) -> str:
    """``claims.md``: title, the table, the rules."""
    table = claims_table(claims(collection), exists)
    head = f"# The paper's claims, tested: `{collection.root}`\n\nBack to [report.md](report.md).\n"
    return "\n".join([head, table.markdown(), "", rules()])


def write_claims(collection: Collection, out: Path) -> Path:
    """Write ``out/claims.md`` (``out``: the report directory); returns its path."""
    path = out / CLAIMS_MD
    text = claims_markdown(collection, lambda rel: (out / rel).is_file())
    path.write_text(text, encoding="utf-8")
    return path
