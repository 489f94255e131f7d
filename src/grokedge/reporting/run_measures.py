"""Measurements read from one run's rows and summary, shared by the tables and the claims.

Pure functions over a run's ``analyses.jsonl`` rows, ``metrics.jsonl`` series and
``summary.json`` (:class:`RunData`): a direction's field of an ``edge_directions`` row,
a run's mean of a quantity over the rows of one phase, its last late probe, its ω, the
ablation row's shrink controls and the class fields of its summary. No formatting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from grokedge.experiments.ablation import paper_ratio
from grokedge.reporting.discover import RunData
from grokedge.reporting.table_format import finite_mean

LATE = "late"
AT = "at"


def direction_field(row: dict[str, Any], k: int, field: str) -> float | None:
    """``field`` of direction v_k in an ``edge_directions`` row (None where it has none)."""
    for d in row.get("directions", []):
        if d.get("k") == k:
            return d.get(field)
    return None


def row_value(row: dict[str, Any], path: Sequence[str]) -> Any:
    """The value at ``path`` (keys, outermost first) of an analysis row; None where a key
    is missing (e.g. a control the row predates)."""
    value: Any = row
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def grad_share_by_step(rows: Sequence[dict[str, Any]]) -> dict[int, float | None]:
    """v_1's gradient share at each Gram window (``edge_directions`` rows)."""
    return {
        r["step"]: r["directions"][0]["grad_frac"]
        for r in rows
        if r["analysis"] == "edge_directions" and r.get("directions")
    }


def phase_mean(
    run: RunData, analysis: str, phase: str, get: Callable[[dict[str, Any]], Any]
) -> float | None:
    """The run's mean of ``get(row)`` over its ``analysis`` rows in ``phase`` (finite
    values only; None without any)."""
    return finite_mean(get(r) for r in run.rows(analysis) if r.get("phase") == phase)


def late_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``late`` rows (none if the run never got there)."""
    return [r for r in rows if r.get("phase") == LATE]


def last_late_probe(run: RunData, kind: str) -> float | None:
    """The last late probe's mean R² of ``kind`` (the paper's "late" probes)."""
    rows = late_rows(run.rows("probe"))
    if not rows:
        return None
    s = rows[-1]["scores"][rows[-1]["primary"]]
    return s.get(kind, {}).get("mean")


def run_omega(run: RunData) -> float | None:
    """The run's weight decay ω: its config's, else its last ``wd/weight_decay`` read-out."""
    omega = run.weight_decay
    return omega if omega is not None else run.last("wd/weight_decay")


SHRINK_CONTROLS = (("shrink", "shrink"), ("shrink_norm", "norm-equal shrink"))
"""The ablation row's deterministic shrink controls: (row key, column label)."""


def shrink_dacc(row: dict[str, Any], key: str) -> float | None:
    """Δacc of the shrink control ``key`` in an ``ablation`` row (None where the row
    predates it)."""
    return (row.get(key) or {}).get("dacc")


def shrink_ratio(row: dict[str, Any], key: str) -> float | None:
    """The paper's ratio of the edge's Δacc against the shrink control ``key`` (None where
    the row predates it), as ``ablation/shrink_ratio`` and ``ablation/shrink_norm_ratio``."""
    edge, control = row["edge"].get("dacc"), shrink_dacc(row, key)
    if edge is None or control is None:
        return None
    return paper_ratio(edge, control)


MARGINS = "class_margins"
"""The summary field of each criterion's margin to its threshold (a dict)."""


def class_fields(summary: dict[str, Any] | None) -> dict[str, Any]:
    """The summary's fields whose key starts with ``class`` (written by the class analysis).

    A ``class/x`` metric (the last logged value; the class *codes* for ``observed`` and
    ``predicted``) is left out when the summary has the field ``class_x`` itself (the
    class *name*): one column per quantity.
    """
    fields = {k: v for k, v in (summary or {}).items() if k.startswith("class")}
    named = {k[len("class_") :] for k in fields if k.startswith("class_")}
    return {
        k: v
        for k, v in fields.items()
        if not (k.startswith("class/") and k[len("class/") :].removesuffix("_code") in named)
    }
