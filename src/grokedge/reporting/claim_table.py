"""The table of the paper's claims (``conf/report/claims.yaml``), read and checked.

One :class:`ClaimSpec` per row of ``claims.md``: the claim's text, the paper's value (a
template over ``paper.yaml``), the edge its numbers are computed under, what is measured,
the rule that judges it, the thresholds of ``verdicts.yaml`` that rule may read, and the
files that support it. This module knows the table's shape only; the rules are in the
``*_claims`` modules and :mod:`.claims` evaluates the table with them.
"""

from __future__ import annotations

import string
from collections.abc import Collection as Container
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from grokedge.reporting.discover import Collection, RunData
from grokedge.reporting.paper import paper_values
from grokedge.reporting.report_conf import report_yaml, verdict_thresholds

CLAIMS_FILE = "claims.yaml"
TOP_KEYS = frozenset({"claims", "rules_text"})
"""The keys of ``claims.yaml`` itself."""
CLAIM_KEYS = ("id", "title", "paper", "edge", "measure", "rule", "thresholds", "support")
"""The keys of one entry, every one required."""
EDGE_KINDS = ("paper", "analysed", "none")
"""``edge`` of an entry: the paper's definition, the run's analysed edge, or no edge."""
RUN_FIGURE = "run:"
"""A ``support`` entry with this prefix is a run's own figure (``runs/<job>/`` in a sweep)."""
CLAIM_THRESHOLDS = "claims"
"""The block of ``verdicts.yaml`` whose keys an entry's ``thresholds`` name one by one."""


@dataclass(frozen=True)
class ClaimSpec:
    """One entry of ``claims.yaml`` (the keys' meaning: the file's header).

    Attributes:
        id: short name; title: the claim's text (numbered).
        paper: ``str.format`` template of the paper's value over ``paper.yaml``'s blocks
            and the fields the rule derives.
        edge: one of :data:`EDGE_KINDS`.
        measure: the rule's parameters (what it reads from the runs).
        rule: the name of the rule in :data:`grokedge.reporting.claims.RULES`.
        thresholds: the ``verdicts.yaml`` keys (of ``claims:``) or blocks the rule reads.
        support: files of ``report/``; :data:`RUN_FIGURE`-prefixed ones are a run's.
    """

    id: str
    title: str
    paper: str
    edge: str
    measure: Mapping[str, Any]
    rule: str
    thresholds: tuple[str, ...]
    support: tuple[str, ...]

    def paper_text(self, **derived: Any) -> str:
        """The paper's value as text: :attr:`paper` filled from ``paper.yaml`` and the
        fields the rule ``derived``."""
        return self.paper.format(**paper_values(), **derived)

    def threshold(self, key: str) -> Any:
        """The threshold ``key`` of ``verdicts.yaml`` (a key of ``claims:``, else a whole
        block); a ValueError when this claim does not declare it."""
        if key not in self.thresholds:
            raise ValueError(
                f"claims.yaml: claim {self.id!r} reads threshold {key!r}, which its "
                f"thresholds {list(self.thresholds)} do not declare"
            )
        return _threshold(key)

    def support_files(self, collection: Collection, run: RunData | None) -> tuple[str, ...]:
        """:attr:`support` relative to ``report/``, a run's figures those of ``run``."""
        return tuple(
            run_figure(collection, run, s[len(RUN_FIGURE) :]) if s.startswith(RUN_FIGURE) else s
            for s in self.support
        )


def run_figure(collection: Collection, run: RunData | None, name: str) -> str:
    """A run's figure relative to ``report/`` (``runs/<job>/`` in a sweep)."""
    if run is None or not collection.is_sweep:
        return name
    return f"runs/{run.name}/{name}"


def paper_entry(path: list[str] | tuple[str, ...]) -> Any:
    """The value at ``path`` (keys, outermost first) of ``paper.yaml``."""
    value: Any = paper_values()
    for key in path:
        value = value[key]
    return value


def _threshold(key: str) -> Any:
    block = verdict_thresholds()[CLAIM_THRESHOLDS]
    return block[key] if key in block else verdict_thresholds()[key]


def _bad(where: str, key: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"claims.yaml: {where}{key}={value!r} is not allowed: {allowed}")


def template_fields(template: str) -> set[str]:
    """The top-level names a ``str.format`` template reads (``a`` of ``{a[b]:g}``)."""
    names = set()
    for _, field, _, _ in string.Formatter().parse(template):
        if field:
            names.add(field.split("[")[0].split(".")[0])
    return names


def parse_claim(entry: Any, index: int) -> ClaimSpec:
    """One entry of ``claims:``, checked for its keys and their types."""
    where = f"claims[{index}]."
    if not isinstance(entry, dict):
        raise _bad("", f"claims[{index}]", entry, "a mapping with keys " + ", ".join(CLAIM_KEYS))
    unknown = set(entry) - set(CLAIM_KEYS)
    if unknown:
        raise _bad(where, sorted(unknown)[0], "(unknown key)", "keys " + ", ".join(CLAIM_KEYS))
    for key in CLAIM_KEYS:
        if key not in entry:
            raise _bad(where, key, None, "every entry needs it")
    for key in ("id", "title", "paper", "rule"):
        if not isinstance(entry[key], str) or not entry[key]:
            raise _bad(where, key, entry[key], "a non-empty string")
    if entry["edge"] not in EDGE_KINDS:
        raise _bad(where, "edge", entry["edge"], "one of " + ", ".join(EDGE_KINDS))
    if not isinstance(entry["measure"], dict):
        raise _bad(where, "measure", entry["measure"], "a mapping (the rule's parameters)")
    for key in ("thresholds", "support"):
        items = entry[key]
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise _bad(where, key, items, "a list of strings")
    return ClaimSpec(
        id=entry["id"],
        title=entry["title"],
        paper=entry["paper"],
        edge=entry["edge"],
        measure=dict(entry["measure"]),
        rule=entry["rule"],
        thresholds=tuple(entry["thresholds"]),
        support=tuple(entry["support"]),
    )


def parse_claim_table(data: Any) -> tuple[ClaimSpec, ...]:
    """The entries of a parsed ``claims.yaml``, checked: known keys, unique ids, and every
    threshold named exists in ``verdicts.yaml``."""
    if not isinstance(data, dict) or set(data) != TOP_KEYS:
        keys = sorted(data) if isinstance(data, dict) else data
        raise _bad("", "(top-level keys)", keys, "exactly " + ", ".join(sorted(TOP_KEYS)))
    if not isinstance(data["claims"], list) or not data["claims"]:
        raise _bad("", "claims", data["claims"], "a non-empty list of entries")
    specs = tuple(parse_claim(entry, i) for i, entry in enumerate(data["claims"]))
    seen: set[str] = set()
    known = set(verdict_thresholds()[CLAIM_THRESHOLDS]) | set(verdict_thresholds())
    for i, spec in enumerate(specs):
        if spec.id in seen:
            raise _bad(f"claims[{i}].", "id", spec.id, "an id no other entry has")
        seen.add(spec.id)
        for key in spec.thresholds:
            if key not in known:
                allowed = f"a key of verdicts.yaml's {CLAIM_THRESHOLDS}: block, or a block"
                raise _bad(f"claims[{i}].", "thresholds", key, allowed)
    return specs


def check_rules(specs: tuple[ClaimSpec, ...], rules: Mapping[str, Container[str]]) -> None:
    """Every entry's rule exists in ``rules`` ({rule name: the paper fields it derives}),
    and its paper template reads only ``paper.yaml``'s blocks and those fields."""
    for i, spec in enumerate(specs):
        if spec.rule not in rules:
            raise _bad(f"claims[{i}].", "rule", spec.rule, "one of " + ", ".join(sorted(rules)))
        allowed = set(paper_values()) | set(rules[spec.rule])
        unknown = template_fields(spec.paper) - allowed
        if unknown:
            raise _bad(
                f"claims[{i}].",
                "paper",
                spec.paper,
                f"fields of paper.yaml's blocks or the rule's own ({sorted(unknown)} are neither)",
            )


def claim_specs() -> tuple[ClaimSpec, ...]:
    """The parsed and checked ``conf/report/claims.yaml`` entries, in the paper's order."""
    return parse_claim_table(report_yaml(CLAIMS_FILE))


def rules_text() -> str:
    """The verdict rules as ``claims.md`` prints them, ``verdicts.yaml``'s ``claims:``
    thresholds filled in."""
    return str(report_yaml(CLAIMS_FILE)["rules_text"]).format(
        **verdict_thresholds()[CLAIM_THRESHOLDS]
    )
