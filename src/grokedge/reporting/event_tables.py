"""The event-timing tables: every run's event steps per N and definition, the verdicts
over trajectories, their sensitivity to the grok definition, and the runs that never grokked.
"""

from __future__ import annotations

from grokedge.reporting.event_rule import CLASSES, TimingFit, interval_text, timing_thresholds
from grokedge.reporting.event_runs import (
    DEFINITIONS,
    RUN_GROK,
    TIMED_EVENTS,
    IntervalEvents,
    RunEvents,
    Sensitivity,
)
from grokedge.reporting.table_format import Table, fmt


def _step_cell(ie: IntervalEvents, event: str, definition: str) -> str:
    step = ie.steps.get((event, definition))
    if step is None:
        return "–"
    mark = "*" if ie.artifacts.get((event, definition)) else ""
    if ie.first_windows.get(definition) == step:
        mark += "°"
    return f"{step}{mark}"


def _changes_cell(ev: RunEvents, kind: str) -> str:
    steps = [str(c["step"]) for c in ev.changes if c["kind"] == kind]
    return ", ".join(steps) if steps else "–"


def event_timing_table(events: list[RunEvents]) -> Table:
    """Per run and N (its own first, then derived ones): grok step, (W + 1)·N, the events
    under each definition, the dominant deltas' entries and exits (at the run's own N)."""
    columns = ["run", "seed", "ω", "N", "grok", "(W+1)·N"]
    for event in TIMED_EVENTS:
        columns += [f"{event} {d}" for d in DEFINITIONS]
    columns += ["dominant left", "dominant entered"]
    rows = []
    for ev in events:
        for n in sorted(ev.per_interval, key=lambda m: (m != ev.interval, m)):
            ie = ev.per_interval[n]
            own = n == ev.interval
            row = [
                ev.run.name,
                str(ev.run.seed),
                fmt(ev.run.weight_decay, 1),
                str(n) if own else f"{n} (derived)",
                "–" if ev.grok_step is None else str(ev.grok_step),
                str((ev.window + 1) * n),
            ]
            for event in TIMED_EVENTS:
                row += [_step_cell(ie, event, d) for d in DEFINITIONS]
            row += [_changes_cell(ev, "left"), _changes_cell(ev, "entered")] if own else ["", ""]
            rows.append(row)
    return Table(
        "Event timing (optimizer steps; * = coincides with a dominant delta entering or "
        "leaving the window; ° = at the definition's first window: no transition)",
        columns,
        rows,
        note="flip: first window where v_1's gradient share < ½ (flip_latest: the newest "
        "delta's share); align: first positive alignment on v_1. Definitions: paper = the "
        "raw window, burn_in = deltas that begin at or after callbacks.gram.start_step, "
        "normalized = unit-norm deltas (docs/edge_definitions.md). Derived N: windows of "
        "summed base deltas from the same run.",
    )


def timing_fit_table(fits: list[TimingFit]) -> Table:
    """The verdict of every (event, definition) over the grokked trajectories."""
    rows = [
        [
            f.event,
            f.definition,
            str(f.n),
            " / ".join(str(f.counts.get(c, 0)) for c in CLASSES),
            f"{f.flagged}/{f.n}",
            "–" if not f.fitted else f"{fmt(f.slope, 2)} {interval_text(f.slope_ci)}",
            fmt(f.offset, 0),
            fmt(f.multiple, 2),
            f"**{f.verdict}**",
            f.reason,
        ]
        for f in fits
    ]
    t = timing_thresholds()
    return Table(
        "Does the event follow the grok step or the window? (grokked trajectories)",
        [
            "event",
            "definition",
            "trajectories",
            " / ".join(CLASSES),
            "window artifacts",
            "slope on grok [interval]",
            "median event − grok",
            "step / N",
            "verdict",
            "why",
        ],
        rows,
        note="A trajectory is one training (runs of one seed and ω at several N merged). "
        "Within it, a step that moves with N beyond one window (quantum "
        f"{t['detection_quantum']}·N) is window-driven; one consistent with a single step is "
        f"fixed. Window-driven when > {t['window_driven_share']} of the trajectories with a "
        "transition are; else the fixed steps fitted on the grok step (bootstrap over "
        f"trajectories, {t['bootstrap']} resamples, {t['interval_level']:.0%} interval): "
        "tracks grokking when the slope interval holds 1 but not 0 and the median offset is "
        f"within {t['offset_tolerance_intervals']}·N + {t['offset_tolerance_evaluations']} "
        "evaluation interval(s) (else: follows grokking with an offset); fixed step when it "
        "holds 0 but not 1; "
        f"cannot separate when |corr(grok, (W+1)·N)| > {t['max_abs_corr']} "
        "(conf/report/verdicts.yaml).",
    )


def sensitivity_table(sensitivity: list[Sensitivity]) -> Table | None:
    """The verdicts under each grok definition; None when only the run's own exists."""
    if not sensitivity or len(sensitivity[0].verdicts) < 2:
        return None
    keys = list(sensitivity[0].verdicts)
    rows = [
        [
            s.event,
            s.definition,
            *(
                s.verdicts[k] if s.decided(k) else f"{s.verdicts[k]} ({s.grokked[k]} grokked)"
                for k in keys
            ),
            "**yes**" if s.changes else "no",
        ]
        for s in sensitivity
    ]
    return Table(
        "Do the verdicts depend on how the grok step is detected?",
        ["event", "definition", *(f"grok {k}" for k in keys), "changes"],
        rows,
        note=f"grok {RUN_GROK}: each run's own grok_step; threshold/patience: summary.json's "
        "grok_steps (first of `patience` consecutive evaluations at or above the threshold). "
        "A grok definition under which fewer trajectories grokked than a verdict needs "
        "(min_trajectories) shows how many did and is left out of 'changes'.",
    )


def control_table(events: list[RunEvents]) -> Table | None:
    """The runs that never grokked (e.g. ω = 0): their events, which no grok step can
    explain."""
    rows = []
    for ev in events:
        if ev.grok_step is not None:
            continue
        ie = ev.per_interval[ev.interval]
        rows.append(
            [
                ev.run.name,
                str(ev.run.seed),
                fmt(ev.run.weight_decay, 1),
                str(ev.interval),
                *(_step_cell(ie, "flip", d) for d in DEFINITIONS),
                _changes_cell(ev, "left"),
            ]
        )
    if not rows:
        return None
    return Table(
        "Runs that did not grok (control)",
        ["run", "seed", "ω", "N", *(f"flip {d}" for d in DEFINITIONS), "dominant left"],
        rows,
    )
