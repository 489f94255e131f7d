"""The claims table (``conf/report/claims.yaml``) is well formed, its checks reject bad
entries with one clear error, and the rows of ``claims.md`` come from it."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from grokedge.reporting import claim_table as CT
from grokedge.reporting import claims as C
from grokedge.reporting.discover import Collection, RunData
from grokedge.reporting.paper import paper_values
from grokedge.reporting.report_conf import report_yaml, verdict_thresholds


def _raw() -> dict[str, Any]:
    """A private copy of the parsed claims.yaml (the cached one stays untouched)."""
    return copy.deepcopy(report_yaml(CT.CLAIMS_FILE))


def test_every_claim_is_well_formed() -> None:
    raw = _raw()
    assert set(raw) == CT.TOP_KEYS
    specs = C.checked_specs()
    assert len(specs) == len(raw["claims"])
    thresholds = verdict_thresholds()
    for i, (entry, spec) in enumerate(zip(raw["claims"], specs, strict=True)):
        assert set(entry) == set(CT.CLAIM_KEYS), entry  # every key known, none missing
        # Titles are numbered in the table's order: claims.md rows are the paper's claims.
        assert re.match(rf"{i + 1}\. \S", spec.title), spec.title
        assert spec.rule in C.RULES
        assert spec.edge in CT.EDGE_KINDS
        assert spec.measure, spec.id  # the rule's parameters are declared, never implied
        for key in spec.thresholds:
            assert key in thresholds["claims"] or key in thresholds, (spec.id, key)
        fields = CT.template_fields(spec.paper)
        assert fields <= set(paper_values()) | set(C.RULES[spec.rule].paper_fields), spec.id
        if not C.RULES[spec.rule].paper_fields:
            assert spec.paper_text()  # formats from paper.yaml alone
        assert all(s.endswith((".png", ".md")) for s in spec.support), spec.support
    assert len({s.id for s in specs}) == len(specs)
    # Every threshold of the claims block is read by some claim (none is dead).
    used = {k for s in specs for k in s.thresholds}
    assert set(thresholds["claims"]) <= used


def test_every_rule_is_used() -> None:
    assert {s.rule for s in C.checked_specs()} == set(C.RULES)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e: e.update(colour="red"), "claims[0].colour='(unknown key)'"),
        (lambda e: e.pop("rule"), "claims[0].rule=None"),
        (lambda e: e.update(edge="both"), "claims[0].edge='both' is not allowed: one of"),
        (lambda e: e.update(title=""), "claims[0].title='' is not allowed"),
        (lambda e: e.update(thresholds=["no_such"]), "claims[0].thresholds='no_such'"),
        (lambda e: e.update(support="a.png"), "claims[0].support='a.png'"),
    ],
)
def test_a_bad_entry_is_one_clear_error(change: Any, message: str) -> None:
    raw = _raw()
    change(raw["claims"][0])
    with pytest.raises(ValueError, match=re.escape(message)):
        CT.parse_claim_table(raw)


def test_duplicate_ids_and_unknown_top_keys_are_rejected() -> None:
    raw = _raw()
    raw["claims"][1]["id"] = raw["claims"][0]["id"]
    with pytest.raises(ValueError, match=r"claims\[1\]\.id='flip'"):
        CT.parse_claim_table(raw)
    raw = _raw()
    raw["extra"] = 1
    with pytest.raises(ValueError, match="top-level keys"):
        CT.parse_claim_table(raw)


def test_unknown_rule_and_unknown_paper_field_are_rejected() -> None:
    specs = CT.parse_claim_table(_raw())
    rules = {name: rule.paper_fields for name, rule in C.RULES.items()}
    bad_rule = (dataclasses.replace(specs[0], rule="guess"),)
    with pytest.raises(ValueError, match="claims\\[0\\].rule='guess' is not allowed: one of "):
        CT.check_rules(bad_rule, rules)
    bad_paper = (dataclasses.replace(specs[0], paper="{nowhere[x]}"),)
    with pytest.raises(ValueError, match=r"\['nowhere'\] are neither"):
        CT.check_rules(bad_paper, rules)


def test_a_rule_reads_only_the_thresholds_its_claim_declares(tmp_path: Path) -> None:
    spec = next(s for s in C.checked_specs() if s.id == "flatness")
    assert (
        spec.threshold("paper_scale_factor") == verdict_thresholds()["claims"]["paper_scale_factor"]
    )
    with pytest.raises(ValueError, match="'flatness' reads threshold 'probe_r2_tolerance'"):
        spec.threshold("probe_r2_tolerance")


def test_the_row_comes_from_the_table(tmp_path: Path) -> None:
    """A claim's title, paper text and support are the table's: change them there and the
    row follows (here with no runs to test: every rule's not-tested row)."""
    run = RunData(tmp_path / "r", "r", summary={"task": "dyck", "status": "ok"})
    collection = Collection(tmp_path, [run], is_sweep=False)
    for spec in C.checked_specs():
        if C.RULES[spec.rule].paper_fields:
            continue  # its paper text needs the rule's own fields
        changed = dataclasses.replace(spec, title="99. edited", paper="edited {grok_step[source]}")
        row = C.RULES[spec.rule].judge(collection, changed)
        assert row.claim == "99. edited"
        assert row.paper == f"edited {paper_values()['grok_step']['source']}"
