"""Claims 1-3, judged under the paper's edge definition (every window records it): the
events of the edge (``flip``, ``align``) against the grok step, and the compression of
g_23 = σ_2² − σ_3² during grokking.

Rules ``event_timing`` and ``g23_compression`` of ``conf/report/claims.yaml``; each takes
a :class:`Collection` and the claim's :class:`ClaimSpec` and returns its :class:`Claim`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from grokedge.edge.definitions import EDGE_DEFINITIONS, PAPER
from grokedge.reporting.claim_rows import (
    HOLDS,
    INCONCLUSIVE,
    NO_EDGE,
    NO_TREATED,
    NOT_REPRODUCED,
    WINDOW_ARTIFACT,
    Claim,
    control_pairs,
    controls,
    fixed_definition,
    not_tested,
    phase_mean_over,
    treated,
)
from grokedge.reporting.claim_table import ClaimSpec
from grokedge.reporting.discover import Collection, RunData
from grokedge.reporting.edge_series import (
    definition_compression,
    definition_g23,
    g23_compression,
    g23_peak_step,
)
from grokedge.reporting.event_rule import (
    FIXED_STEP,
    NO_TRANSITION,
    TRACKS_GROKKING,
    WINDOW_DRIVEN,
    WITH_OFFSET,
    classify,
    timing_thresholds,
)
from grokedge.reporting.event_runs import (
    DEFINITIONS,
    SUMMARY,
    collection_events,
    grok_sensitivity,
    run_events,
    timing_fits,
    trajectories,
)
from grokedge.reporting.run_measures import AT, direction_field
from grokedge.reporting.table_format import fmt

FIT_VERDICTS = {
    TRACKS_GROKKING: HOLDS,
    WINDOW_DRIVEN: WINDOW_ARTIFACT,
    FIXED_STEP: NOT_REPRODUCED,
    WITH_OFFSET: NOT_REPRODUCED,
    NO_TRANSITION: NOT_REPRODUCED,
}
"""The event rule's verdict (:func:`.event_rule.timing_fit`) -> the claim's ("at the grok step"
fails for a step fixed in time, one offset from grokking and one seen only at the first
window); ``cannot separate`` and ``inconclusive`` -> ``inconclusive``."""


def _paper_v1(field: str) -> Callable[[dict[str, Any]], float | None]:
    """v_1's ``field`` under the paper's edge definition (the claims are the paper's),
    whatever edge the run analysed; rows written before the definitions: the edge's."""

    def get(row: dict[str, Any]) -> float | None:
        paper = (row.get("definitions") or {}).get("paper")
        if paper is None:
            return direction_field(row, 1, field)
        values = paper.get(field) or []
        return values[0] if values else None

    return get


def _event_control(collection: Collection, event: str, note: str) -> str:
    """The ω = 0 runs' event under the paper's definition, then ``note`` (the claim's
    ``measure.control_note``)."""
    evs = [e for e in (run_events(r) for r in controls(collection)) if e is not None]
    if not evs:
        text = "no ω = 0 run"
    else:
        steps = [e.steps.get((event, PAPER)) for e in evs]
        hit = [str(s) for s in steps if s is not None]
        text = f"ω = 0: {event} in {len(hit)}/{len(evs)} runs under {PAPER}" + (
            f" (steps {', '.join(hit)})" if hit else ""
        )
    return text + note


def _event_numbers(runs: list[RunData], field: str, label: str) -> str:
    """v_1's ``field`` (named ``label``) under the paper's definition, pre and at grok."""
    pre = phase_mean_over(runs, "edge_directions", "pre", _paper_v1(field))
    at = phase_mean_over(runs, "edge_directions", AT, _paper_v1(field))
    return f"v_1 {label} (paper definition) pre {fmt(pre)} → at {fmt(at)}"


def _event_sweep(
    collection: Collection, event: str, field: str, label: str
) -> tuple[str, str, str]:
    """(grokedge text, verdict, why) from the event rule over the sweep's grokked
    trajectories (:func:`.event_rule.timing_fit`), judged under the paper's definition, the
    other definitions' verdicts and the grok-step sensitivity beside it."""
    events = collection_events(collection)
    runs = [r for r in treated(collection) if run_events(r) is not None]
    fits = {(f.event, f.definition): f for f in timing_fits(events)}
    fit = fits[(event, PAPER)]
    verdict = FIT_VERDICTS.get(fit.verdict, INCONCLUSIVE)
    classes = ", ".join(f"{k} {v}" for k, v in fit.counts.items() if v)
    beside = "; ".join(f"{d}: {fits[(event, d)].verdict}" for d in DEFINITIONS if d != PAPER)
    (sensitivity,) = [s for s in grok_sensitivity(events) if s.key == (event, PAPER)]
    if len(sensitivity.verdicts) < 2:
        robust = "one grok definition (no grok_steps)"
    elif sensitivity.changes:
        robust = "verdict changes with the grok definition: " + ", ".join(
            f"{k} {v}" for k, v in sensitivity.verdicts.items()
        )
    else:
        decided = [g for g in sensitivity.verdicts if sensitivity.decided(g)]
        robust = (
            f"same verdict under the {len(decided)} of {len(sensitivity.verdicts)} grok "
            "definitions under which enough trajectories grokked"
        )
    text = (
        f"judged under {PAPER}: {_event_numbers(runs, field, label)}; {fit.n} grokked "
        f"trajectories ({classes or 'none'}); median {event} − grok {fmt(fit.offset, 0)}; "
        f"{fit.flagged}/{fit.n} flagged as window artifacts; {robust}; beside it {beside}"
    )
    return text, verdict, f"{PAPER} definition: {fit.verdict} ({fit.reason})"


def _event_run(
    run: RunData, event: str, field: str, label: str, tolerance_intervals: int, quantum: float
) -> tuple[str, str, str]:
    """(grokedge text, verdict, why) of one run under the paper's definition: its step at
    each N it recorded, the within-run class (:func:`.event_rule.classify`) and its
    window-artifact flag."""
    ev = run_events(run)
    assert ev is not None and ev.grok_step is not None
    (traj,) = trajectories([ev])
    det = traj.detections(event, PAPER)
    assert det is not None
    kind = classify(det, quantum)
    step = ev.steps.get((event, PAPER))
    tol = tolerance_intervals * ev.interval
    head = f"judged under {PAPER}: {_event_numbers([run], field, label)}"
    if step is None:
        why = f"no {event} under the paper's definition"
        return f"{head}; {event} – vs grok {ev.grok_step}", NOT_REPRODUCED, why
    near = "within" if abs(step - ev.grok_step) <= tol else "not within"
    per_n = ", ".join(f"N = {n}: {'–' if s is None else s}" for n, s in det.steps.items())
    text = (
        f"{head}; {event} {step} vs grok {ev.grok_step} ({near} ±{tol}); (W+1)·N = "
        f"{ev.window_step}; {event} at {per_n} ({kind.label})"
    )
    if ev.artifacts.get((event, PAPER)):
        changes = [f"{c['kind']} {c['step']}" for c in ev.changes if abs(c["step"] - step) <= tol]
        listed = f" ({', '.join(changes)})" if changes else ""
        return text, WINDOW_ARTIFACT, f"coincides with a dominant delta leaving/entering{listed}"
    if kind.label == WINDOW_DRIVEN:
        why = f"its step moves with N (≈ {fmt(kind.slope, 2)}·N) while the grok step stays put"
        return text, WINDOW_ARTIFACT, why
    if kind.label == NO_TRANSITION:
        return text, NOT_REPRODUCED, "seen only at the first window: no transition"
    return text, INCONCLUSIVE, "one trajectory cannot tell a step tied to grokking from a fixed one"


def event_claim(collection: Collection, spec: ClaimSpec) -> Claim:
    """Rule ``event_timing`` (claims 1 and 2), judged under the paper's edge definition:
    across a sweep the event rule over grokked trajectories (:mod:`.event_rule`); in one
    run, its within-run class over N and its window-artifact flag ("at grok": within
    ``at_grok_tolerance_intervals`` Gram intervals).

    ``measure``: ``event`` (flip, align), ``field`` of v_1 (grad_frac, align) and its
    ``label``, and ``control_note`` (text after the ω = 0 runs' events).
    """
    title, paper, m = spec.title, spec.paper_text(), spec.measure
    event, field, label = str(m["event"]), str(m["field"]), str(m["label"])
    runs = treated(collection)
    support = spec.support_files(collection, None)
    if not any(run_events(r) for r in collection.ok):
        return not_tested(title, paper, NO_EDGE)
    if not any(run_events(r) for r in runs):
        return not_tested(title, paper, NO_TREATED + " with edge_summary rows")
    if collection.is_sweep:
        text, verdict, why = _event_sweep(collection, event, field, label)
    else:
        quantum = float(timing_thresholds(spec.threshold("event_timing"))["detection_quantum"])
        tolerance = int(spec.threshold("at_grok_tolerance_intervals"))
        text, verdict, why = _event_run(runs[0], event, field, label, tolerance, quantum)
    control = _event_control(collection, event, str(m["control_note"]))
    definition = fixed_definition(spec.edge)
    return Claim(title, paper, text, control, verdict, why, support, definition)


def peak_at_dominant_change(run: RunData, definition: str) -> bool | None:
    """Whether the pre-grok g_23 peak under ``definition`` lies within
    ``coincidence_windows`` Gram intervals of a dominant delta entering or leaving the raw
    window (the ``edge_summary`` row's ``dominant_changes``); None without that row or
    without a peak."""
    rows = run.rows(SUMMARY)
    if not rows or run.grok_step is None or "coincidence_windows" not in rows[-1]:
        return None
    peak = g23_peak_step(definition_g23(run, definition), int(run.grok_step))
    if peak is None:
        return None
    tolerance = int(rows[-1]["coincidence_windows"]) * int(rows[-1]["interval"])
    return any(abs(int(c["step"]) - peak) <= tolerance for c in rows[-1]["dominant_changes"])


def times(value: float | None) -> str:
    """A compression as text: two decimals and ×; ∞× when the last g_23 is 0."""
    if value is None:
        return "–"
    return "∞×" if math.isinf(value) else f"{fmt(value, 2)}×"


def _compression_mean(values: list[float]) -> float | None:
    """The mean of compressions (inf when one is: its last g_23 is 0)."""
    if not values:
        return None
    return math.inf if any(math.isinf(v) for v in values) else sum(values) / len(values)


def compression_verdict(grokked: float, control: float, within: float) -> tuple[str, str]:
    """``not reproduced`` when the grokked run barely compresses (≤ 1 + ``within``) or the
    control compresses more; ``window artifact`` when the control compresses as much
    (within ``within``, relative; ``compression_same_within``); else ``holds``."""
    if grokked <= 1 + within:
        return NOT_REPRODUCED, f"grokked {times(grokked)} ≤ 1 + {within}: no compression"
    if math.isinf(grokked) or math.isinf(control):
        gap = 0.0 if grokked == control else (math.inf if math.isinf(grokked) else -math.inf)
    else:
        gap = (grokked - control) / grokked
    text = f"relative difference {fmt(gap, 2)} (same within {within})"
    if abs(gap) <= within:
        return WINDOW_ARTIFACT, text + ": ω = 0 compresses as much"
    if gap < 0:
        return NOT_REPRODUCED, text + ": ω = 0 compresses more"
    return HOLDS, text


def peak_artifacts(runs: list[RunData], definition: str = PAPER) -> tuple[int, int]:
    """(runs whose g_23 peak under ``definition`` lies at a dominant delta's entry or exit,
    runs where that is known)."""
    flags = [f for f in (peak_at_dominant_change(r, definition) for r in runs) if f is not None]
    return sum(flags), len(flags)


def _compressions_text(runs: list[RunData]) -> str:
    """The mean compression under every definition: the paper's first, the others beside
    (each over the runs that have it)."""
    parts = []
    for definition in EDGE_DEFINITIONS:
        values = [definition_compression(r, definition) for r in runs]
        found = [v for v in values if v is not None]
        if found:
            n = f"{len(found)} run" + ("s" if len(found) > 1 else "")
            parts.append(f"{definition} {times(_compression_mean(found))} ({n})")
    return parts[0] + ("; beside: " + ", ".join(parts[1:]) if parts[1:] else "")


def _paper_compressions(runs: list[RunData]) -> list[float]:
    """The runs' compressions under the paper's definition (those that have one)."""
    return [v for v in (definition_compression(r, PAPER) for r in runs) if v is not None]


def g23_claim(collection: Collection, spec: ClaimSpec) -> Claim:
    """Rule ``g23_compression`` (claim 3) under the paper's definition (g_23 from each
    window's paper-definition σ): the treated runs' compression at their grok step against
    the ω = 0 run of the same task, seed and N at the same step; the other definitions'
    compressions beside. ``measure``: documentation only (the ``edge_directions`` rows'
    σ)."""
    paper, title, definition = spec.paper_text(), spec.title, fixed_definition(spec.edge)
    runs = [r for r in treated(collection) if definition_compression(r, PAPER) is not None]
    first = runs[0] if runs else next(iter(treated(collection)), None)
    support = spec.support_files(collection, first)
    if not runs:
        return not_tested(
            title,
            paper,
            "no paper-definition window (edge_directions rows; callbacks=gram) at or before "
            "a grokked run's grok step",
            support,
            definition,
        )
    grokked = _compression_mean(_paper_compressions(runs))
    assert grokked is not None
    text = _compressions_text(runs)
    within = float(spec.threshold("compression_same_within"))
    majority = float(spec.threshold("artifact_majority"))
    flagged, counted = peak_artifacts(runs, PAPER)
    peaks = f"its g_23 peak at a dominant delta's entry or exit in {flagged}/{counted} runs"
    ids = {id(r) for r in runs}
    # The control compresses up to the treated run's grok step: it has none of its own.
    at_paired = [
        (t, g23_compression(definition_g23(c, PAPER), int(t.grok_step or 0)))
        for t, c in control_pairs(collection)
        if id(t) in ids
    ]
    pairs = [(t, v) for t, v in at_paired if v is not None]
    paired = _compression_mean(_paper_compressions([t for t, _ in pairs]))
    ctrl = _compression_mean([v for _, v in pairs])
    control = "no ω = 0 run of the same task, seed and N"
    if paired is not None and ctrl is not None:
        control = (
            f"ω = 0, same task, seed and N, at the paired grok step: paper {times(ctrl)} "
            f"({len(pairs)} pairs; their grokked runs paper {times(paired)})"
        )
    if grokked <= 1 + within:
        verdict, why = NOT_REPRODUCED, f"paper {times(grokked)} ≤ 1 + {within}: no compression"
    elif counted and flagged / counted > majority:
        verdict = WINDOW_ARTIFACT
        why = f"compresses ({times(grokked)}), but {peaks} (> {majority} of them)"
    elif paired is None or ctrl is None:
        verdict = INCONCLUSIVE
        why = (
            f"paper {times(grokked)} > 1 + {within} and {peaks} (≤ {majority} of them): it "
            "compresses, but whether ω = 0 compresses as much needs the ω = 0 run of the same "
            "task, seed and N (sweep optimizer.weight_decay=0,1)"
        )
    else:
        verdict, why = compression_verdict(paired, ctrl, within)
    return Claim(title, paper, text, control, verdict, why, support, definition)
