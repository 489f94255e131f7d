"""Claims 4-8, read from the edge each run analysed (one definition a row): removing the
edge against random, norm-matched and shrink controls (4-6), the flatness of the loss
along the grokked edge (7) and its curvature against the memorised bulk (8).

Rules ``beyond_controls``, ``paper_scale`` and ``curvature_ratio`` of
``conf/report/claims.yaml``; each takes a :class:`Collection` and the claim's
:class:`ClaimSpec` and returns its :class:`Claim`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from grokedge.reporting.claim_rows import (
    HOLDS,
    INCONCLUSIVE,
    NO_TREATED,
    NOT_REPRODUCED,
    NOT_TESTED,
    Claim,
    edge_runs,
    not_tested,
    phase_mean_over,
    under,
)
from grokedge.reporting.claim_table import ClaimSpec, paper_entry
from grokedge.reporting.discover import Collection, RunData
from grokedge.reporting.run_measures import phase_mean, row_value
from grokedge.reporting.table_format import fmt, ratio_cell


def beyond(edge: float, control: float, ratio: float) -> bool:
    """|Δ_edge| > 0 and at least ``ratio`` (``ratio_beyond_control``) × |Δ_control|."""
    return abs(edge) > 0 and abs(edge) >= ratio * abs(control)


def _ratio(edge: float, control: float) -> str:
    """|edge| / |control| as text; a control with no effect (exactly 0) has no ratio:
    ``unresolved (edge Δ e, control Δ c below resolution)``."""
    return ratio_cell(None if control == 0 else abs(edge) / abs(control), edge, control)


def _ablation_phases(runs: list[RunData], phases: Sequence[str], edge: Sequence[str]) -> list[str]:
    """The ``phases`` in which some run has an ablation (the edge's Δacc at ``edge``)."""
    return [
        p
        for p in phases
        if any(phase_mean(r, "ablation", p, lambda x: row_value(x, edge)) for r in runs)
    ]


def _against(
    runs: list[RunData], edge: dict[str, float], label: str, path: Sequence[str], ratio: float
) -> tuple[str, list[str]] | None:
    """(cell text, the phases where the edge is not beyond) of one control, its Δacc at
    ``path`` of the ablation rows; None when the rows do not hold it."""
    values = {p: phase_mean_over(runs, "ablation", p, lambda x: row_value(x, path)) for p in edge}
    if any(v is None for v in values.values()):
        return None
    parts = [
        f"{p} {fmt(v, 4)} (ratio {_ratio(edge[p], v)})" for p, v in values.items() if v is not None
    ]
    failed = [
        f"{label} {p}" for p, v in values.items() if v is not None and not beyond(edge[p], v, ratio)
    ]
    return f"{label} Δacc " + ", ".join(parts), failed


def ablation_claim(collection: Collection, spec: ClaimSpec) -> Claim:
    """Rule ``beyond_controls`` (claims 4-6): the edge's Δacc in each phase (means over
    treated runs of each run's phase mean) against each control's: holds when |Δ_edge| ≥
    ``ratio_beyond_control`` × |Δ_control| in every phase.

    ``measure``: ``phases`` (at, late), ``edge`` (the path of the edge's Δacc in an
    ``ablation`` row) and ``controls`` (each a ``label`` and the ``value`` path of its
    Δacc).
    """
    title, paper, m = spec.title, spec.paper_text(), spec.measure
    edge_path = [str(k) for k in m["edge"]]
    gets = [(str(c["label"]), [str(k) for k in c["value"]]) for c in m["controls"]]
    ratio = float(spec.threshold("ratio_beyond_control"))
    definition, runs, _, left_out = edge_runs(collection, "ablation")
    if not runs:
        missing = "no ablation rows: run with callbacks=full (in Python: AblationCallback)"
        if any(r.rows("ablation") for r in collection.ok):
            missing = NO_TREATED + " with ablation rows"
        return not_tested(title, paper, missing, definition=definition)
    support = spec.support_files(collection, runs[0])
    phases = _ablation_phases(runs, [str(p) for p in m["phases"]], edge_path)
    edge = {
        p: phase_mean_over(runs, "ablation", p, lambda x: row_value(x, edge_path)) for p in phases
    }
    edge_values = {p: v for p, v in edge.items() if v is not None}
    if not edge_values:
        why = "no ablation rows at or late after grok"
        return not_tested(title, paper, why, support, definition)
    grokedge = "edge Δacc " + ", ".join(f"{p} {fmt(v)}" for p, v in edge_values.items())
    grokedge += f" ({len(runs)} runs)"
    results = {label: _against(runs, edge_values, label, path, ratio) for label, path in gets}
    missing = [label for label, r in results.items() if r is None]
    done = [r for r in results.values() if r is not None]
    control = "; ".join(cell for cell, _ in done) or "–"
    if missing:
        why = (
            f"ablation rows without {', '.join(missing)}: rerun with callbacks=full "
            "(in Python: AblationCallback)"
        )
        return Claim(title, paper, grokedge, control, NOT_TESTED, why, support, definition)
    failed = [f for _, fs in done for f in fs]
    if failed:
        why = f"|Δ_edge| < {ratio:g} × |Δ_control| ({', '.join(failed)})"
        why = under(definition, why, left_out)
        return Claim(title, paper, grokedge, control, NOT_REPRODUCED, why, support, definition)
    why = f"|Δ_edge| ≥ {ratio:g} × |Δ_control| ({', '.join(edge_values)})"
    why = under(definition, why, left_out)
    return Claim(title, paper, grokedge, control, HOLDS, why, support, definition)


NO_PERTURBATION = "no perturbation rows: run with callbacks=full (in Python: PerturbationCallback)"


def max_kl(rows: Iterable[dict[str, Any]], ks: Sequence[int] = (1, 2)) -> float | None:
    """The largest ``max_kl`` along v_k, k in ``ks``, over ``perturbation`` rows."""
    values = [
        r["extremes"][str(k)]["max_kl"] for r in rows for k in ks if str(k) in r.get("extremes", {})
    ]
    values = [v for v in values if v is not None and math.isfinite(v)]
    return max(values) if values else None


def curvature(row: dict[str, Any], k: int) -> float | None:
    """v_kᵀHv_k of a ``perturbation`` row: the exact HVP, else the central difference."""
    for c in row.get("curvature", []):
        if c.get("k") == k:
            for how in ("hvp", "fd"):
                v = c.get(how)
                if v is not None and math.isfinite(v):
                    return float(v)
    return None


def _perturbation_runs(
    collection: Collection,
) -> tuple[str, list[RunData], list[RunData], int, str | None]:
    """(definition, treated runs, ω = 0 runs, runs left out, what is missing) of claims 7
    and 8 (:func:`.claim_rows.edge_runs` over the ``perturbation`` rows)."""
    definition, runs, ctrl, left_out = edge_runs(collection, "perturbation")
    missing = None
    if not runs:
        missing = NO_PERTURBATION
        if any(r.rows("perturbation") for r in collection.ok):
            missing = NO_TREATED + " with perturbation rows"
    return definition, runs, ctrl, left_out, missing


def flatness_claim(collection: Collection, spec: ClaimSpec) -> Claim:
    """Rule ``paper_scale`` (claim 7): the largest KL along the analysed edge's directions
    after grok against ``paper_scale_factor`` × the paper's value.

    ``measure``: ``phases`` (the ones after grok), ``directions`` (k of v_k) and
    ``paper_value`` (its path in ``paper.yaml``).
    """
    m, title = spec.measure, spec.title
    ref = float(paper_entry([str(k) for k in m["paper_value"]]))
    paper = spec.paper_text()
    after_grok = {str(p) for p in m["phases"]}
    definition, runs, ctrl_runs, left_out, missing = _perturbation_runs(collection)
    if missing:
        return not_tested(title, paper, missing, definition=definition)
    support = spec.support_files(collection, runs[0])
    rows = [r for run in runs for r in run.rows("perturbation") if r.get("phase") in after_grok]
    ks = tuple(int(k) for k in m["directions"])
    ours = max_kl(rows, ks)
    if ours is None:
        why = "no perturbation rows at or after grok"
        return not_tested(title, paper, why, support, definition)
    ctrl = max_kl((r for c in ctrl_runs for r in c.rows("perturbation")), ks)
    control = "no ω = 0 run" if ctrl is None else f"ω = 0: max KL {fmt(ctrl, 6)}"
    factor = float(spec.threshold("paper_scale_factor"))
    verdict = HOLDS if ours <= factor * ref else NOT_REPRODUCED
    why = f"{'≤' if verdict == HOLDS else '>'} {factor:g} × the paper's {ref:g}"
    text = f"max KL along v_1, v_2 at/after grok {fmt(ours, 6)} ({len(runs)} runs)"
    why = under(definition, why, left_out)
    return Claim(title, paper, text, control, verdict, why, support, definition)


def curvature_claim(collection: Collection, spec: ClaimSpec) -> Claim:
    """Rule ``curvature_ratio`` (claim 8): the late v_1 curvature of the treated runs
    against the largest bulk curvature of the ω = 0 runs of the same edge definition;
    holds when the bulk is ``ratio_beyond_control`` × larger.

    ``measure``: ``phase`` (late), ``direction`` (k of the grokked v_k) and
    ``bulk_directions`` (the ω = 0 runs' v_k).
    """
    m, title, paper = spec.measure, spec.title, spec.paper_text()
    phase, k1 = str(m["phase"]), int(m["direction"])
    bulk_ks = [int(k) for k in m["bulk_directions"]]
    definition, runs, ctrl_runs, left_out, missing = _perturbation_runs(collection)
    if missing:
        return not_tested(title, paper, missing, definition=definition)
    support = spec.support_files(collection, runs[0])
    late = phase_mean_over(runs, "perturbation", phase, lambda r: curvature(r, k1))
    if late is None:
        why = "no late perturbation row with a curvature (run past grok + phase_post)"
        return not_tested(title, paper, why, support, definition)
    text = f"v_1 late {fmt(late, 4)} ({len(runs)} runs)"
    bulk = [curvature(r, k) for c in ctrl_runs for r in c.rows("perturbation") for k in bulk_ks]
    bulk = [b for b in bulk if b is not None]
    if not bulk:
        why = under(
            definition,
            "v_1 late measured, but the memorised bulk it is judged against needs an ω = 0 "
            f"run with perturbation rows under {definition}",
            left_out,
        )
        control = f"no ω = 0 run with perturbation rows under {definition}"
        return Claim(title, paper, text, control, INCONCLUSIVE, why, support, definition)
    ratio = float(spec.threshold("ratio_beyond_control"))
    verdict = HOLDS if max(bulk) >= ratio * abs(late) else NOT_REPRODUCED
    sign = "≥" if verdict == HOLDS else "<"
    why = f"bulk max / v_1 late = {_ratio(max(bulk), late)} ({sign} {ratio:g})"
    why = under(definition, why, left_out)
    control = f"ω = 0 bulk v_3, v_4 up to {fmt(max(bulk), 4)}"
    return Claim(title, paper, text, control, verdict, why, support, definition)
