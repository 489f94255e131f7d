"""The paper's claims that grokedge can test, one row each, with a verdict.

``python -m grokedge.report DIR`` writes ``DIR/report/claims.md``: per claim the paper's
number (``conf/report/paper.yaml``), grokedge's (the run or sweep), the control's (ω = 0
runs, other N and seeds, the norm-matched and shrink ablation controls), a verdict and
the file of the report that supports it. Every threshold is in ``conf/report/verdicts.yaml``
(``claims:``; the event fit: ``event_timing:``).

Verdicts: ``holds``, ``window artifact`` (the effect follows the window arithmetic or
appears as much without weight decay), ``not reproduced``, ``inconclusive`` (measured,
but no sound rule or too little to decide) and ``not tested`` (no rows for it; the row
says what is missing). "Treated" runs are the grokked runs with ω ≠ 0; "controls" the
ω = 0 runs. Pure functions over a :class:`Collection`, except :func:`write_claims`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grokedge.reporting import events as E
from grokedge.reporting.discover import Collection, RunData
from grokedge.reporting.edge_series import (
    UNRECORDED,
    analysed_definition,
    definition_compression,
    definition_g23,
    g23_compression,
    g23_peak_step,
)
from grokedge.reporting.paper import mean_sd, paper_values
from grokedge.reporting.tables import (
    AT,
    LATE,
    Table,
    _direction,
    _last_probe,
    _mean,
    _omega,
    _per_run,
    _pipe,
    class_fields,
    fmt,
    shrink_dacc,
)
from grokedge.spectral.edge_definitions import EDGE_DEFINITIONS, PAPER

CLAIMS_MD = "claims.md"
HOLDS = "holds"
WINDOW_ARTIFACT = "window artifact"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive"
NOT_TESTED = "not tested"
VERDICTS = (HOLDS, WINDOW_ARTIFACT, NOT_REPRODUCED, INCONCLUSIVE, NOT_TESTED)

FIT_VERDICTS = {
    E.TRACKS_GROKKING: HOLDS,
    E.WINDOW_DRIVEN: WINDOW_ARTIFACT,
    E.FIXED_STEP: NOT_REPRODUCED,
    E.WITH_OFFSET: NOT_REPRODUCED,
    E.NO_TRANSITION: NOT_REPRODUCED,
}
"""The event rule's verdict (:func:`events.timing_fit`) -> the claim's ("at the grok step"
fails for a step fixed in time, one offset from grokking and one seen only at the first
window); ``cannot separate`` and ``inconclusive`` -> ``inconclusive``."""

NO_TREATED = "no run with ω ≠ 0 grokked"
NO_EDGE = "no edge_summary rows: run with callbacks=gram (the default)"
ABLATION_PHASES = (AT, LATE)
"""The phases of the paper's ablation numbers (at grok, late)."""


@dataclass(frozen=True)
class Claim:
    """One row of ``claims.md``.

    Attributes:
        claim: what the paper says (short, numbered).
        paper, grokedge, control: the three numbers, as text.
        verdict: one of :data:`VERDICTS`.
        why: the rule's outcome, or what is missing (one line).
        support: files of ``report/`` that show it, relative to ``report/``; the first
            that exists is linked.
        definition: the edge definition every number of the row is computed under
            (``paper``, ``burn_in``, ``normalized``; :data:`NO_EDGE_DEFINITION` for a
            claim that reads no edge); numbers of other definitions set beside are
            labelled with theirs.
    """

    claim: str
    paper: str
    grokedge: str
    control: str
    verdict: str
    why: str
    support: tuple[str, ...] = ()
    definition: str = PAPER


def thresholds() -> dict[str, Any]:
    """The ``claims`` block of ``conf/report/verdicts.yaml``."""
    return E.verdict_thresholds()["claims"]


# ----------------------------------------------------------------------------- runs


def treated(collection: Collection) -> list[RunData]:
    """The finished runs that grokked with weight decay (ω ≠ 0 or unrecorded)."""
    return [r for r in collection.ok if r.grok_step is not None and r.weight_decay != 0]


def controls(collection: Collection) -> list[RunData]:
    """The finished ω = 0 runs."""
    return [r for r in collection.ok if r.weight_decay == 0]


def interval(run: RunData) -> int | None:
    """N of the run: its ``edge_summary`` row's, else ``task.gram_interval`` of its config."""
    rows = run.rows(E.SUMMARY)
    if rows and rows[-1].get("interval") is not None:
        return int(rows[-1]["interval"])
    value = (run.config.get("task") or {}).get("gram_interval")
    return None if value is None else int(value)


def control_pairs(collection: Collection) -> list[tuple[RunData, RunData]]:
    """(treated run, ω = 0 run of the same task, seed and N) for every treated run that has
    one."""
    pairs = []
    for run in treated(collection):
        key = (run.task, run.seed, interval(run))
        match = [c for c in controls(collection) if (c.task, c.seed, interval(c)) == key]
        if match:
            pairs.append((run, match[0]))
    return pairs


NO_EDGE_DEFINITION = "none (reads no edge)"
"""The definition cell of a claim whose numbers read no edge (probes, ``wd/*``)."""


def one_definition(runs: list[RunData]) -> tuple[str, list[RunData], int]:
    """(definition, the runs that analysed it, how many analysed another): the paper's
    when some run analysed it, else the most frequent (ties in the order of
    ``EDGE_DEFINITIONS``), so that no row mixes the numbers of two edges; ``("–", [], 0)``
    without runs."""
    by: dict[str, list[RunData]] = {}
    for run in runs:
        by.setdefault(analysed_definition(run), []).append(run)
    if not by:
        return "–", [], 0
    order = [PAPER, *sorted(by, key=lambda d: (-len(by[d]), _definition_rank(d)))]
    chosen = next(d for d in order if d in by)
    return chosen, by[chosen], len(runs) - len(by[chosen])


def _definition_rank(definition: str) -> int:
    names = list(EDGE_DEFINITIONS)
    return names.index(definition) if definition in names else len(names)


def under(definition: str, why: str, left_out: int = 0) -> str:
    """The why of a claim judged on the analysed edge: when that edge is not the paper's,
    it says the verdict is ``definition``'s, not the paper's; and how many runs analysed
    another definition (left out of the row)."""
    if left_out:
        why += f"; {left_out} runs analysed another definition (left out)"
    if definition == PAPER:
        return why
    if definition == UNRECORDED:
        return f"the runs record no edge definition (rows from before the definitions): {why}"
    return (
        f"judged under {definition}, not the paper's definition (the analysed edge; "
        f"callbacks.gram.edge_definition=paper tests the paper's): {why}"
    )


def _where(collection: Collection, run: RunData | None, name: str) -> str:
    """A run's figure relative to ``report/`` (``runs/<job>/`` in a sweep)."""
    if run is None or not collection.is_sweep:
        return name
    return f"runs/{run.name}/{name}"


def _mean_over(runs: Iterable[RunData], get: Callable[[RunData], float | None]) -> float | None:
    return _mean(get(r) for r in runs)


def _v1(field: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda row: _direction(row, 1, field)


def _paper_v1(field: str) -> Callable[[dict[str, Any]], float | None]:
    """v_1's ``field`` under the paper's edge definition (the claims are the paper's),
    whatever edge the run analysed; rows written before the definitions: the edge's."""

    def get(row: dict[str, Any]) -> float | None:
        paper = (row.get("definitions") or {}).get("paper")
        if paper is None:
            return _direction(row, 1, field)
        values = paper.get(field) or []
        return values[0] if values else None

    return get


def _phase_mean(runs: list[RunData], analysis: str, phase: str, get: Callable) -> float | None:
    """Mean over runs of each run's mean of ``get`` over its rows in ``phase``."""
    return _mean_over(runs, lambda r: _per_run(r, analysis, phase, get))


def _not_tested(
    claim: str,
    paper: str,
    missing: str,
    support: tuple[str, ...] = (),
    definition: str = PAPER,
) -> Claim:
    return Claim(claim, paper, "–", "–", NOT_TESTED, missing, support, definition)


def _edge_runs(
    collection: Collection, analysis: str
) -> tuple[str, list[RunData], list[RunData], int]:
    """(definition, treated runs with ``analysis`` rows that analysed it, ω = 0 runs that
    analysed it, treated runs with rows left out for analysing another): the rows of
    claims 4-8 and 11 read the analysed edge's vectors, one definition a row
    (:func:`one_definition`); without rows, the definition the runs analysed."""
    with_rows = [r for r in treated(collection) if r.rows(analysis)]
    definition, runs, left_out = one_definition(with_rows)
    if not with_rows:
        definition = one_definition(collection.ok)[0]
    ctrl = [c for c in controls(collection) if analysed_definition(c) == definition]
    return definition, runs, ctrl, left_out


# ---------------------------------------------------------------- 1, 2: flip and align

EVENT_CLAIMS = {
    "flip": ("1. v_1's gradient share flips at the grok step", "grad_frac"),
    "align": ("2. the alignment on v_1 turns positive at grokking (not with ω = 0)", "align"),
}


def _event_paper(event: str) -> str:
    if event == "flip":
        d, s = paper_values()["dyck_seeds"], paper_values()["scan_seeds"]
        return (
            f"Dyck {d['v1_grad_share_pre']} → {d['v1_grad_share_at']} at grok "
            f"(SCAN {s['v1_grad_share_pre']} → {s['v1_grad_share_at']})"
        )
    a = paper_values()["alignment"]
    return f"{a['v1']}; ω = 0: {a['omega_zero']}"


def _event_control(collection: Collection, event: str) -> str:
    """The ω = 0 runs' event under the paper's definition."""
    evs = [e for e in (E.run_events(r) for r in controls(collection)) if e is not None]
    if not evs:
        text = "no ω = 0 run"
    else:
        steps = [e.steps.get((event, E.PAPER)) for e in evs]
        hit = [str(s) for s in steps if s is not None]
        text = f"ω = 0: {event} in {len(hit)}/{len(evs)} runs under {E.PAPER}" + (
            f" (steps {', '.join(hit)})" if hit else ""
        )
    if event == "align":
        text += "; with ω = 0 the WD part is zero, so the alignment is ≡ 0 by construction"
    return text


def _event_numbers(runs: list[RunData], field: str) -> str:
    pre = _phase_mean(runs, "edge_directions", "pre", _paper_v1(field))
    at = _phase_mean(runs, "edge_directions", AT, _paper_v1(field))
    name = "grad share" if field == "grad_frac" else "alignment"
    return f"v_1 {name} (paper definition) pre {fmt(pre)} → at {fmt(at)}"


def _event_sweep(collection: Collection, event: str, field: str) -> tuple[str, str, str]:
    """(grokedge text, verdict, why) from the event rule over the sweep's grokked
    trajectories (:func:`events.timing_fit`), judged under the paper's definition, the
    other definitions' verdicts and the grok-step sensitivity beside it."""
    events = E.collection_events(collection)
    runs = [r for r in treated(collection) if E.run_events(r) is not None]
    fits = {(f.event, f.definition): f for f in E.timing_fits(events)}
    fit = fits[(event, E.PAPER)]
    verdict = FIT_VERDICTS.get(fit.verdict, INCONCLUSIVE)
    classes = ", ".join(f"{k} {v}" for k, v in fit.counts.items() if v)
    beside = "; ".join(f"{d}: {fits[(event, d)].verdict}" for d in E.DEFINITIONS if d != E.PAPER)
    (sensitivity,) = [s for s in E.grok_sensitivity(events) if s.key == (event, E.PAPER)]
    if len(sensitivity.verdicts) < 2:
        robust = "one grok definition (no grok_steps)"
    elif sensitivity.changes:
        robust = "verdict changes with the grok definition: " + ", ".join(
            f"{k} {v}" for k, v in sensitivity.verdicts.items()
        )
    else:
        robust = f"same verdict under all {len(sensitivity.verdicts)} grok definitions"
    text = (
        f"judged under {E.PAPER}: {_event_numbers(runs, field)}; {fit.n} grokked "
        f"trajectories ({classes or 'none'}); median {event} − grok {fmt(fit.offset, 0)}; "
        f"{fit.flagged}/{fit.n} flagged as window artifacts; {robust}; beside it {beside}"
    )
    return text, verdict, f"{E.PAPER} definition: {fit.verdict} ({fit.reason})"


def _event_run(run: RunData, event: str, field: str) -> tuple[str, str, str]:
    """(grokedge text, verdict, why) of one run under the paper's definition: its step at
    each N it recorded, the within-run class (:func:`events.classify`) and its
    window-artifact flag."""
    ev = E.run_events(run)
    assert ev is not None and ev.grok_step is not None
    (traj,) = E.trajectories([ev])
    det = traj.detections(event, E.PAPER)
    assert det is not None
    kind = E.classify(det, float(E.timing_thresholds()["detection_quantum"]))
    step = ev.steps.get((event, E.PAPER))
    tol = int(thresholds()["at_grok_tolerance_intervals"]) * ev.interval
    head = f"judged under {E.PAPER}: {_event_numbers([run], field)}"
    if step is None:
        why = f"no {event} under the paper's definition"
        return f"{head}; {event} – vs grok {ev.grok_step}", NOT_REPRODUCED, why
    near = "within" if abs(step - ev.grok_step) <= tol else "not within"
    per_n = ", ".join(f"N = {n}: {'–' if s is None else s}" for n, s in det.steps.items())
    text = (
        f"{head}; {event} {step} vs grok {ev.grok_step} ({near} ±{tol}); (W+1)·N = "
        f"{ev.window_step}; {event} at {per_n} ({kind.label})"
    )
    if ev.artifacts.get((event, E.PAPER)):
        changes = [f"{c['kind']} {c['step']}" for c in ev.changes if abs(c["step"] - step) <= tol]
        listed = f" ({', '.join(changes)})" if changes else ""
        return text, WINDOW_ARTIFACT, f"coincides with a dominant delta leaving/entering{listed}"
    if kind.label == E.WINDOW_DRIVEN:
        why = f"its step moves with N (≈ {fmt(kind.slope, 2)}·N) while the grok step stays put"
        return text, WINDOW_ARTIFACT, why
    if kind.label == E.NO_TRANSITION:
        return text, NOT_REPRODUCED, "seen only at the first window: no transition"
    return text, INCONCLUSIVE, "one trajectory cannot tell a step tied to grokking from a fixed one"


def event_claim(collection: Collection, event: str) -> Claim:
    """Claims 1 (``flip``) and 2 (``align``), judged under the paper's edge definition:
    across a sweep the event rule over grokked trajectories (:mod:`events`); in one run,
    its within-run class over N and its window-artifact flag."""
    title, field = EVENT_CLAIMS[event]
    paper = _event_paper(event)
    runs = treated(collection)
    support = ("flip_vs_grok.png", "grok_aligned.png", "lifecycle.png")
    if not any(E.run_events(r) for r in collection.ok):
        return _not_tested(title, paper, NO_EDGE)
    if not any(E.run_events(r) for r in runs):
        return _not_tested(title, paper, NO_TREATED + " with edge_summary rows")
    if collection.is_sweep:
        text, verdict, why = _event_sweep(collection, event, field)
    else:
        text, verdict, why = _event_run(runs[0], event, field)
    control = _event_control(collection, event)
    return Claim(title, paper, text, control, verdict, why, support)


# ------------------------------------------------------------------ 3: g_23 compression

G23_TITLE = "3. g_23 compresses during grokking"


def peak_at_dominant_change(run: RunData, definition: str) -> bool | None:
    """Whether the pre-grok g_23 peak under ``definition`` lies within
    ``coincidence_windows`` Gram intervals of a dominant delta entering or leaving the raw
    window (the ``edge_summary`` row's ``dominant_changes``); None without that row or
    without a peak."""
    rows = run.rows(E.SUMMARY)
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


def compression_verdict(grokked: float, control: float) -> tuple[str, str]:
    """``not reproduced`` when the grokked run barely compresses (≤ 1 +
    ``compression_same_within``) or the control compresses more; ``window artifact`` when
    the control compresses as much (within ``compression_same_within``, relative); else
    ``holds``."""
    within = float(thresholds()["compression_same_within"])
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
    return [v for v in (definition_compression(r, PAPER) for r in runs) if v is not None]


def g23_claim(collection: Collection) -> Claim:
    """Claim 3 under the paper's definition (g_23 from each window's paper-definition σ):
    the treated runs' compression at their grok step against the ω = 0 run of the same
    task, seed and N at the same step; the other definitions' compressions beside."""
    ref = paper_values()["g23_compression"]
    paper = ", ".join(f"{task} {v}×" for task, v in ref.items() if task != "source")
    runs = [r for r in treated(collection) if definition_compression(r, PAPER) is not None]
    first = runs[0] if runs else next(iter(treated(collection)), None)
    support = (_where(collection, first, "lifecycle.png"),)
    if not runs:
        return _not_tested(
            G23_TITLE,
            paper,
            "no paper-definition window (edge_directions rows; callbacks=gram) at or before "
            "a grokked run's grok step",
            support,
        )
    grokked = _compression_mean(_paper_compressions(runs))
    assert grokked is not None
    text = _compressions_text(runs)
    within = float(thresholds()["compression_same_within"])
    majority = float(thresholds()["artifact_majority"])
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
        verdict, why = compression_verdict(paired, ctrl)
    return Claim(G23_TITLE, paper, text, control, verdict, why, support, PAPER)


# -------------------------------------------------------------------- 4-6: the ablation

ControlGet = Callable[[dict[str, Any]], float | None]
ABLATION_CONTROLS: dict[str, tuple[str, tuple[tuple[str, ControlGet], ...]]] = {
    "random": (
        "4. removing the edge hurts beyond random 2-D subspaces",
        (("random", lambda r: r["acc_random"]["random_mean"]),),
    ),
    "matched": (
        "5. ... beyond norm-matched random displacements",
        (("norm-matched", lambda r: r["acc_matched"]["random_mean"]),),
    ),
    "shrink": (
        "6. ... beyond shrinking θ as much (shrink, norm-equal shrink)",
        (
            ("shrink", lambda r: shrink_dacc(r, "shrink")),
            ("norm-equal shrink", lambda r: shrink_dacc(r, "shrink_norm")),
        ),
    ),
}


def _edge_dacc(row: dict[str, Any]) -> float | None:
    return row["edge"]["dacc"]


def beyond(edge: float, control: float) -> bool:
    """|Δ_edge| > 0 and at least ``ratio_beyond_control`` × |Δ_control|."""
    ratio = float(thresholds()["ratio_beyond_control"])
    return abs(edge) > 0 and abs(edge) >= ratio * abs(control)


def _ratio(edge: float, control: float) -> str:
    return "∞" if control == 0 else fmt(abs(edge) / abs(control), 1)


def _ablation_paper(kind: str) -> str:
    if kind != "random":
        return "not done (docs/theory.md §5)"
    p = paper_values()["dyck_seeds"]
    return (
        f"Δacc {mean_sd(p['ablation_edge_dacc_at'])} at grok, "
        f"{mean_sd(p['ablation_edge_dacc_late'])} late; random |Δacc| < "
        f"{p['random_abs_dacc_max']}, ratio > {p['random_ratio_min']}"
    )


def _ablation_phases(runs: list[RunData]) -> list[str]:
    """The phases of :data:`ABLATION_PHASES` in which some run has an ablation."""
    return [p for p in ABLATION_PHASES if any(_per_run(r, "ablation", p, _edge_dacc) for r in runs)]


def _against(
    runs: list[RunData], edge: dict[str, float], label: str, get: ControlGet
) -> tuple[str, list[str]] | None:
    """(cell text, the phases where the edge is not beyond) of one control; None when
    the rows do not hold it."""
    values = {p: _phase_mean(runs, "ablation", p, get) for p in edge}
    if any(v is None for v in values.values()):
        return None
    parts = [
        f"{p} {fmt(v, 4)} (ratio {_ratio(edge[p], v)})" for p, v in values.items() if v is not None
    ]
    failed = [f"{label} {p}" for p, v in values.items() if v is not None and not beyond(edge[p], v)]
    return f"{label} Δacc " + ", ".join(parts), failed


def ablation_claim(collection: Collection, kind: str) -> Claim:
    """Claims 4 (``random``), 5 (``matched``), 6 (``shrink``): the edge's Δacc at grok
    and late (means over treated runs of each run's phase mean) against each control's."""
    title, gets = ABLATION_CONTROLS[kind]
    paper = _ablation_paper(kind)
    definition, runs, _, left_out = _edge_runs(collection, "ablation")
    if not runs:
        missing = "no ablation rows: run with callbacks=full"
        if any(r.rows("ablation") for r in collection.ok):
            missing = NO_TREATED + " with ablation rows"
        return _not_tested(title, paper, missing, definition=definition)
    support = ("sweep_ablation.png", _where(collection, runs[0], "ablation.png"))
    edge = {p: _phase_mean(runs, "ablation", p, _edge_dacc) for p in _ablation_phases(runs)}
    edge_values = {p: v for p, v in edge.items() if v is not None}
    if not edge_values:
        why = "no ablation rows at or late after grok"
        return _not_tested(title, paper, why, support, definition)
    grokedge = "edge Δacc " + ", ".join(f"{p} {fmt(v)}" for p, v in edge_values.items())
    grokedge += f" ({len(runs)} runs)"
    results = {label: _against(runs, edge_values, label, get) for label, get in gets}
    missing = [label for label, r in results.items() if r is None]
    done = [r for r in results.values() if r is not None]
    control = "; ".join(cell for cell, _ in done) or "–"
    if missing:
        why = f"ablation rows without {', '.join(missing)}: rerun with callbacks=full"
        return Claim(title, paper, grokedge, control, NOT_TESTED, why, support, definition)
    ratio = thresholds()["ratio_beyond_control"]
    failed = [f for _, fs in done for f in fs]
    if failed:
        why = f"|Δ_edge| < {ratio} × |Δ_control| ({', '.join(failed)})"
        why = under(definition, why, left_out)
        return Claim(title, paper, grokedge, control, NOT_REPRODUCED, why, support, definition)
    why = f"|Δ_edge| ≥ {ratio} × |Δ_control| ({', '.join(edge_values)})"
    why = under(definition, why, left_out)
    return Claim(title, paper, grokedge, control, HOLDS, why, support, definition)


# --------------------------------------------------------- 7, 8: flatness and curvature

AFTER_GROK = (AT, "post", LATE)
FLAT_TITLE = "7. the loss is flat along the grokked edge (ε-sweep)"
CURVATURE_TITLE = "8. curvature: grokked v_1 late ≪ memorised bulk"
NO_PERTURBATION = "no perturbation rows: run with callbacks=full"


def max_kl(rows: Iterable[dict[str, Any]], ks: tuple[int, ...] = (1, 2)) -> float | None:
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
    and 8 (:func:`_edge_runs` over the ``perturbation`` rows)."""
    definition, runs, ctrl, left_out = _edge_runs(collection, "perturbation")
    missing = None
    if not runs:
        missing = NO_PERTURBATION
        if any(r.rows("perturbation") for r in collection.ok):
            missing = NO_TREATED + " with perturbation rows"
    return definition, runs, ctrl, left_out, missing


def flatness_claim(collection: Collection) -> Claim:
    """Claim 7: the largest KL along v_1, v_2 after grok against ``paper_scale_factor`` ×
    the paper's ≈ 5e-5 (the analysed edge's v_1, v_2)."""
    ref = float(paper_values()["perturbation"]["max_kl_grokked_edge"])
    paper = f"max KL ≈ {ref:g} (grokked edge)"
    definition, runs, ctrl_runs, left_out, missing = _perturbation_runs(collection)
    if missing:
        return _not_tested(FLAT_TITLE, paper, missing, definition=definition)
    support = ("sweep_curvature.png", _where(collection, runs[0], "eps_curves.png"))
    rows = [r for run in runs for r in run.rows("perturbation") if r.get("phase") in AFTER_GROK]
    ours = max_kl(rows)
    if ours is None:
        why = "no perturbation rows at or after grok"
        return _not_tested(FLAT_TITLE, paper, why, support, definition)
    ctrl = max_kl(r for c in ctrl_runs for r in c.rows("perturbation"))
    control = "no ω = 0 run" if ctrl is None else f"ω = 0: max KL {fmt(ctrl, 6)}"
    factor = float(thresholds()["paper_scale_factor"])
    verdict = HOLDS if ours <= factor * ref else NOT_REPRODUCED
    why = f"{'≤' if verdict == HOLDS else '>'} {factor:g} × the paper's {ref:g}"
    text = f"max KL along v_1, v_2 at/after grok {fmt(ours, 6)} ({len(runs)} runs)"
    why = under(definition, why, left_out)
    return Claim(FLAT_TITLE, paper, text, control, verdict, why, support, definition)


def curvature_claim(collection: Collection) -> Claim:
    """Claim 8: late v_1 curvature of the treated runs against the largest bulk (v_3, v_4)
    curvature of the ω = 0 runs of the same edge definition; holds when the bulk is
    ``ratio_beyond_control`` × larger."""
    p = paper_values()["perturbation"]
    paper = f"v_1 late {p['curvature_v1_late']}; "
    paper += f"memorised bulk up to {p['curvature_bulk_memorised_max']}"
    definition, runs, ctrl_runs, left_out, missing = _perturbation_runs(collection)
    if missing:
        return _not_tested(CURVATURE_TITLE, paper, missing, definition=definition)
    support = ("sweep_curvature.png", _where(collection, runs[0], "curvature.png"))
    late = _phase_mean(runs, "perturbation", LATE, lambda r: curvature(r, 1))
    if late is None:
        why = "no late perturbation row with a curvature (run past grok + phase_post)"
        return _not_tested(CURVATURE_TITLE, paper, why, support, definition)
    text = f"v_1 late {fmt(late, 4)} ({len(runs)} runs)"
    bulk = [curvature(r, k) for c in ctrl_runs for r in c.rows("perturbation") for k in (3, 4)]
    bulk = [b for b in bulk if b is not None]
    if not bulk:
        why = under(
            definition,
            "v_1 late measured, but the memorised bulk it is judged against needs an ω = 0 "
            f"run with perturbation rows under {definition}",
            left_out,
        )
        control = f"no ω = 0 run with perturbation rows under {definition}"
        return Claim(CURVATURE_TITLE, paper, text, control, INCONCLUSIVE, why, support, definition)
    ratio = float(thresholds()["ratio_beyond_control"])
    verdict = HOLDS if max(bulk) >= ratio * abs(late) else NOT_REPRODUCED
    sign = "≥" if verdict == HOLDS else "<"
    why = f"bulk max / v_1 late = {_ratio(max(bulk), late)} ({sign} {ratio:g})"
    why = under(definition, why, left_out)
    control = f"ω = 0 bulk v_3, v_4 up to {fmt(max(bulk), 4)}"
    return Claim(CURVATURE_TITLE, paper, text, control, verdict, why, support, definition)


# ------------------------------------------------------------------------- 9: probes

PROBE_TITLE = "9. late probes of depth: linear / quadratic / MLP"
PROBE_KINDS = {"linear": "probe_linear_r2_late", "quadratic": "probe_quadratic_r2_late"}
PROBE_KINDS["mlp"] = "probe_mlp_r2_late"


def _paper_probe(kind: str) -> float:
    entry = paper_values()["dyck_seeds"][PROBE_KINDS[kind]]
    return float(entry["mean"] if isinstance(entry, dict) else entry)


def _final_probe(run: RunData, kind: str) -> float | None:
    """The last probe's mean R² of ``kind`` in any phase (an ω = 0 run may have no late)."""
    rows = run.rows("probe")
    if not rows:
        return None
    return rows[-1]["scores"][rows[-1]["primary"]].get(kind, {}).get("mean")


def probe_claim(collection: Collection) -> Claim:
    """Claim 9: each measured late probe R² (the run's last late probe, mean over treated
    runs) within ``probe_r2_tolerance`` of the paper's."""
    paper = " / ".join(mean_sd(paper_values()["dyck_seeds"][v]) for v in PROBE_KINDS.values())
    runs = [r for r in treated(collection) if r.rows("probe")]
    if not runs:
        why = "no probe rows of a grokked run: run with callbacks=full"
        return _not_tested(PROBE_TITLE, paper, why, definition=NO_EDGE_DEFINITION)
    support = ("sweep_probes.png", _where(collection, runs[0], "probes.png"))
    ours = {k: _mean_over(runs, lambda r, k=k: _last_probe(r, k)) for k in PROBE_KINDS}
    measured = {k: v for k, v in ours.items() if v is not None}
    if not measured:
        why = "no late probe row (run past grok + phase_post)"
        return _not_tested(PROBE_TITLE, paper, why, support, NO_EDGE_DEFINITION)
    text = " / ".join(fmt(ours[k]) for k in PROBE_KINDS) + f" ({len(runs)} runs)"
    ctrl = {
        k: _mean_over(controls(collection), lambda r, k=k: _final_probe(r, k)) for k in PROBE_KINDS
    }
    control = "no ω = 0 run with probes"
    if any(v is not None for v in ctrl.values()):
        control = "ω = 0, last probe: " + " / ".join(fmt(ctrl[k]) for k in PROBE_KINDS)
    tol = float(thresholds()["probe_r2_tolerance"])
    off = [k for k, v in measured.items() if abs(v - _paper_probe(k)) > tol]
    unmeasured = [k for k in PROBE_KINDS if k not in measured]
    why = f"|R² − paper's| {'>' if off else '≤'} {tol} ({', '.join(off or measured)})"
    if unmeasured:
        why += f"; not measured: {', '.join(unmeasured)}"
    verdict = NOT_REPRODUCED if off else HOLDS
    return Claim(PROBE_TITLE, paper, text, control, verdict, why, support, NO_EDGE_DEFINITION)


# ------------------------------------------------------------ 10: weight-decay table

WD_TITLE = "10. more weight decay after grokking: lower linear R² and ‖θ‖ (Table 1)"


def wd_by_omega(collection: Collection) -> dict[float, dict[str, float | None]]:
    """Per known ω, the mean last ``wd/linear_r2`` and ``wd/theta_norm`` of the runs with
    ``wd/*`` read-outs (the runs of :func:`tables.wd_table`)."""
    groups: dict[float, list[RunData]] = {}
    for run in collection.ok:
        omega = _omega(run)
        if run.metric_keys("wd") and omega is not None:
            groups.setdefault(omega, []).append(run)
    return {
        w: {
            k: _mean_over(runs, lambda r, k=k: r.last(f"wd/{k}"))
            for k in ("linear_r2", "theta_norm")
        }
        for w, runs in sorted(groups.items())
    }


def wd_verdict(table: dict[float, dict[str, float | None]]) -> tuple[str, str]:
    """``holds`` when, from the smallest to the largest ω, linear R² and ‖θ‖ each fall by at
    least ``wd_min_relative_drop`` (relative); ``inconclusive`` with fewer than two ω."""
    if len(table) < 2:
        return INCONCLUSIVE, "one ω only (the trend needs ≥ 2: experiment=wd_intervention)"
    drop = float(thresholds()["wd_min_relative_drop"])
    lo, hi = table[min(table)], table[max(table)]
    falls = []
    for key in ("linear_r2", "theta_norm"):
        a, b = lo[key], hi[key]
        if a is None or b is None or a == 0:
            return NOT_TESTED, f"no wd/{key} read-out at ω = {min(table):g} or {max(table):g}"
        falls.append((a - b) / abs(a))
    ok = all(f >= drop for f in falls)
    sign = "≥" if ok else "not all ≥"
    why = f"relative falls of R², ‖θ‖ {fmt(falls[0], 2)}, {fmt(falls[1], 2)} ({sign} {drop})"
    return (HOLDS if ok else NOT_REPRODUCED), why


def wd_claim(collection: Collection) -> Claim:
    """Claim 10: the weight-decay intervention's direction (paper Table 1)."""
    rows = paper_values()["wd_intervention"]["rows"]
    lo, hi = rows[min(rows)], rows[max(rows)]
    paper = (
        f"ω {min(rows):g} → {max(rows):g}: linear R² {lo['linear_r2']} → {hi['linear_r2']}, "
        f"‖θ‖ {lo['theta_norm']} → {hi['theta_norm']}"
    )
    table = wd_by_omega(collection)
    if not table:
        why = "no wd/* read-outs: run experiment=wd_intervention (or callbacks.wd_removal)"
        return _not_tested(WD_TITLE, paper, why, definition=NO_EDGE_DEFINITION)
    verdict, why = wd_verdict(table)
    text = "; ".join(
        f"ω {w:g}: R² {fmt(v['linear_r2'])}, ‖θ‖ {fmt(v['theta_norm'], 1)}"
        for w, v in table.items()
    )
    control = "the ω = 0 row" if 0.0 in table else "no ω = 0 read-out"
    support = ("sweep_wd.png", "wd_removal.png", "report.md")
    return Claim(WD_TITLE, paper, text, control, verdict, why, support, NO_EDGE_DEFINITION)


# ------------------------------------------------------------------------ 11: classes

CLASS_TITLE = "11. three universality classes: modular / Dyck / SCAN"


def observed_classes(runs: list[RunData]) -> dict[str, Counter[str]]:
    """Per task, how often each observed class (``class_observed``) occurs."""
    out: dict[str, Counter[str]] = {}
    for run in runs:
        name = class_fields(run.summary).get("class_observed")
        if name is not None:
            out.setdefault(run.task, Counter())[str(name)] += 1
    return out


def judged_runs(runs: list[RunData]) -> list[RunData]:
    """The runs whose class rests on at least ``class_min_late_windows`` late windows."""
    least = thresholds()["class_min_late_windows"]
    return [
        r
        for r in runs
        if class_fields(r.summary).get("class_late_basis") == "phase"
        and (class_fields(r.summary).get("class_late_windows") or 0) >= least
    ]


def class_verdict(observed: dict[str, Counter[str]]) -> tuple[str, str]:
    """Over the judged runs (:func:`judged_runs`): ``not reproduced`` when a task with at
    least ``class_min_seeds`` of them has a most frequent class other than the paper's;
    ``holds`` when every task of the paper's table has them and matches; else
    inconclusive (saying which tasks have too few)."""
    paper = {k: v["class"] for k, v in paper_values()["classes"].items() if k != "source"}
    enough = thresholds()["class_min_seeds"]
    judged = {t: c for t, c in observed.items() if sum(c.values()) >= enough}
    wrong = [
        f"{t}: {c.most_common(1)[0][0]} ≠ {paper[t]}"
        for t, c in judged.items()
        if t in paper and c.most_common(1)[0][0] != paper[t]
    ]
    if wrong:
        return NOT_REPRODUCED, "; ".join(wrong)
    absent = [t for t in paper if t not in judged]
    if absent:
        return INCONCLUSIVE, (
            f"{', '.join(absent)}: fewer than {enough} grokked runs with >= "
            f"{thresholds()['class_min_late_windows']} late windows (needs all three tasks)"
        )
    return HOLDS, "every task's class is the paper's (rules: conf/callbacks/classes.yaml)"


def _classes_text(observed: dict[str, Counter[str]]) -> str:
    return "; ".join(
        f"{t}: " + ", ".join(f"{n} ({k})" for n, k in c.most_common()) for t, c in observed.items()
    )


def class_claim(collection: Collection) -> Claim:
    """Claim 11: each task's observed class (``class_observed`` of the grokked runs, read
    from the analysed edge: one definition, :func:`one_definition`) against the paper's
    Table 2."""
    ref = paper_values()["classes"]
    paper = ", ".join(f"{t} {v['class']}" for t, v in ref.items() if t != "source")
    classified = [r for r in treated(collection) if class_fields(r.summary).get("class_observed")]
    definition, runs, left_out = one_definition(classified)
    if not runs:
        why = "no class fields in a grokked run's summary.json: run with callbacks=full"
        return _not_tested(CLASS_TITLE, paper, why, definition=one_definition(collection.ok)[0])
    observed = observed_classes(runs)
    verdict, why = class_verdict(observed_classes(judged_runs(runs)))
    ctrl_runs = [c for c in controls(collection) if analysed_definition(c) == definition]
    ctrl = observed_classes(ctrl_runs)
    control = f"ω = 0: {_classes_text(ctrl)}" if ctrl else "no ω = 0 run with a class"
    why = under(definition, why, left_out)
    text = _classes_text(observed)
    return Claim(CLASS_TITLE, paper, text, control, verdict, why, ("report.md",), definition)


# ------------------------------------------------------------------------ the table


def claims(collection: Collection) -> list[Claim]:
    """Every claim, in the paper's order."""
    return [
        event_claim(collection, "flip"),
        event_claim(collection, "align"),
        g23_claim(collection),
        *(ablation_claim(collection, kind) for kind in ABLATION_CONTROLS),
        flatness_claim(collection),
        curvature_claim(collection),
        probe_claim(collection),
        wd_claim(collection),
        class_claim(collection),
    ]


def _support_cell(claim: Claim, exists: Callable[[str], bool]) -> str:
    found = [s for s in claim.support if exists(s)][:2] or ["report.md"]
    return ", ".join(f"[{s}]({s})" for s in found)


def claims_table(rows: list[Claim], exists: Callable[[str], bool] = lambda _: True) -> Table:
    """The claims as a :class:`Table`; ``exists`` says which support files are there."""
    cells = [
        [
            _pipe(c.claim),
            _pipe(c.definition),
            _pipe(c.paper),
            _pipe(c.grokedge),
            _pipe(c.control),
            f"**{c.verdict}**: {_pipe(c.why)}",
            _support_cell(c, exists),
        ]
        for c in rows
    ]
    return Table(
        "Claims of the paper",
        ["claim", "definition", "paper", "grokedge", "control", "verdict", "support"],
        cells,
    )


RULES = """Rules (thresholds from conf/report/verdicts.yaml; the paper's numbers from
conf/report/paper.yaml). Treated runs: grokked with ω ≠ 0; controls: ω = 0.

Edge definitions (docs/edge_definitions.md): the `definition` column names the one every
number of the row is computed under; a number of another definition set beside is
labelled with its name. The paper's claims are judged under `paper`: g_23 and v_1's
shares exist under every definition at every window (`edge_directions` rows), so claims
1-3 are judged under `paper` with the others beside. Claims 4-8 and 11 read the vectors
of the edge the run analysed (`callbacks.gram.edge_definition`, the default
`normalized`), which exists under that definition only: the row names it (one
definition a row: `paper` when a run analysed it, else the most frequent; runs of
another are left out and counted), and when it is not `paper` the verdict is that edge's
and its reason begins "judged under <definition>, not the paper's definition" — it does
not test the paper's edge. 9 (probes of the hidden states) and 10 (`wd/*`) read no edge.
Numbers: compressions to 2 decimals with ×, shares and R² to 3, as printed by the report's
tables.

- 1, 2: a sweep — the joint fit of the event's step on the grok step and (W + 1)·N
  (paper definition; `event_timing` thresholds): tracks grokking → holds, the window →
  window artifact, neither → not reproduced, else inconclusive. One run — window artifact
  when the event coincides with a dominant delta entering or leaving the window, not
  reproduced when absent, else inconclusive ("at grok": within {at_grok_tolerance_intervals}
  Gram interval(s)).
- 3 (g_23 = σ_2² − σ_3² of the paper-definition σ; compression = its max over the windows
  at or before the grok step over its value at the last of them): mean compression ≤ 1 +
  {compression_same_within} → not reproduced; its pre-grok g_23 peak within
  `coincidence_windows` Gram intervals of a dominant delta entering or leaving the window
  in more than {artifact_majority} of the runs → window artifact; else against the ω = 0
  run of the same task, seed and N, compressed up to the paired grok step: within
  {compression_same_within} (relative) of the grokked → window artifact, above it → not
  reproduced, below → holds; no such run → inconclusive (it compresses; whether ω = 0
  does as much is not measured).
- 4–6: |Δacc edge| ≥ {ratio_beyond_control} × |Δacc control| at grok and late
  (means over runs) → holds, else not reproduced.
- 7: max KL ≤ {paper_scale_factor} × the paper's. 8: ω = 0 bulk (v_3, v_4) curvature ≥
  {ratio_beyond_control} × late v_1 curvature (no ω = 0 run of the same definition:
  inconclusive). 9: every measured late probe R² within
  {probe_r2_tolerance} of the paper's. 10: linear R² and ‖θ‖ each fall by ≥
  {wd_min_relative_drop} (relative) from the smallest to the largest ω; one ω:
  inconclusive. 11: each task's most frequent observed class is the paper's; holds needs
  all three tasks.
"""


def rules() -> str:
    """The verdict rules with the thresholds of ``verdicts.yaml`` filled in."""
    return RULES.format(**thresholds())


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
