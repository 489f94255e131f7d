"""Event timing: does an event of the edge follow the grok step, or the window arithmetic?

An *event* is the step of a window where something happens to the edge: v_1's gradient
share first falls below ½ (``flip``; ``flip_latest`` for the newest delta alone), the
alignment on v_1 first turns positive (``align``), the pre-grok g_23 peak, v_1's largest
rotation. The ``EdgeAlignmentCallback`` finds them under every edge definition and writes
them, with the dominant-delta changes they coincide with, into the run's ``edge_summary``
row (docs/edge_definitions.md).

Across the grokked runs of a sweep that crosses seeds (different grok steps g) with Gram
intervals N (different window steps (W + 1)·N), one least-squares fit

    event_step = a + b·g + c·(W + 1)·N

says which of the two an event follows: b ≈ 1, c ≈ 0 — it tracks grokking; b ≈ 0, c ≈ 1
— it tracks the window; anything else — neither. The thresholds are in
``conf/report/verdicts.yaml``. The one-regressor fits (on g alone, on (W + 1)·N alone)
and their R² are reported beside the joint one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import numpy as np
import yaml

from grokedge.reporting.discover import Collection, RunData
from grokedge.reporting.tables import Table, fmt
from grokedge.spectral.edge_definitions import EDGE_DEFINITIONS
from grokedge.spectral.events import DEFINITION_EVENTS

SUMMARY = "edge_summary"
DEFINITIONS = EDGE_DEFINITIONS
TIMED_EVENTS = DEFINITION_EVENTS

TRACKS_GROKKING = "tracks grokking"
TRACKS_WINDOW = "tracks the window"
NEITHER = "neither"
INCONCLUSIVE = "inconclusive"


@cache
def verdict_thresholds() -> dict[str, Any]:
    """The parsed ``conf/report/verdicts.yaml``."""
    text = resources.files("grokedge.conf").joinpath("report", "verdicts.yaml").read_text("utf-8")
    return yaml.safe_load(text)


@dataclass
class RunEvents:
    """The events of one run, from its ``edge_summary`` row.

    Attributes:
        run: the run.
        interval: N (optimizer steps per delta); window: W.
        edge_definition: the definition the run analysed (its g23_peak and
            rotation_spike events are that edge's).
        grok_step: the detected grok step (None: never grokked).
        steps: {(event, definition): first step or None}.
        artifacts: {(event, definition): True when it coincides with a dominant delta
            entering or leaving the window}.
        changes: the dominant-delta changes ({step, kind, begin, end, share}).
    """

    run: RunData
    interval: int
    window: int
    grok_step: int | None
    edge_definition: str = "paper"
    steps: dict[tuple[str, str], int | None] = field(default_factory=dict)
    artifacts: dict[tuple[str, str], bool] = field(default_factory=dict)
    changes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def window_step(self) -> int:
        """(W + 1)·N: the step at which the first delta θ(N) − θ(0) leaves the window."""
        return (self.window + 1) * self.interval


def run_events(run: RunData) -> RunEvents | None:
    """The events of ``run`` (None when it has no ``edge_summary`` row with provenance)."""
    rows = run.rows(SUMMARY)
    if not rows or "definitions" not in rows[-1]:
        return None
    row = rows[-1]
    out = RunEvents(
        run=run,
        interval=int(row["interval"]),
        window=int(row["window"]),
        grok_step=run.grok_step,
        edge_definition=str(row.get("edge_definition", "paper")),
        changes=list(row.get("dominant_changes") or []),
    )
    for definition, steps in row["definitions"].items():
        for event, step in steps.items():
            out.steps[(event, definition)] = None if step is None else int(step)
    for e in row.get("events") or []:
        key = (e["event"], e["definition"])
        out.artifacts[key] = bool(e["window_artifact"])
        out.steps.setdefault(key, int(e["step"]))
    return out


@dataclass(frozen=True)
class LineFit:
    """y = intercept + slope·x by least squares, with R² and the slope's standard error."""

    n: int
    slope: float
    intercept: float
    r2: float
    slope_se: float


def fit_line(x: list[float], y: list[float]) -> LineFit:
    """Ordinary least squares of y on x (NaN fields where x does not vary or n < 3)."""
    n = len(x)
    xa, ya = np.asarray(x, float), np.asarray(y, float)
    if n < 3 or np.ptp(xa) == 0:
        return LineFit(n, math.nan, math.nan, math.nan, math.nan)
    slope, intercept = np.polyfit(xa, ya, 1)
    resid = ya - (intercept + slope * xa)
    ss_tot = float(((ya - ya.mean()) ** 2).sum())
    r2 = 1 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else math.nan
    se = math.sqrt(float((resid**2).sum()) / (n - 2) / float(((xa - xa.mean()) ** 2).sum()))
    return LineFit(n, float(slope), float(intercept), r2, se)


@dataclass(frozen=True)
class TimingFit:
    """Which of grok step and window step an event follows, across runs.

    Attributes:
        event, definition: what was fitted.
        n: runs with the event (grokked runs only); missing: grokked runs without it.
        flagged: runs whose event coincides with a dominant delta entering or leaving.
        on_grok, on_window: the one-regressor fits.
        b_grok, c_window: the joint fit's slopes (NaN when the regressors do not separate).
        r2_joint: the joint fit's R².
        verdict: ``tracks grokking``, ``tracks the window``, ``neither``, ``inconclusive``.
        reason: why (one line).
    """

    event: str
    definition: str
    n: int
    missing: int
    flagged: int
    on_grok: LineFit
    on_window: LineFit
    b_grok: float
    c_window: float
    r2_joint: float
    verdict: str
    reason: str


def timing_fit(
    points: list[tuple[float, float, float | None]],
    event: str = "flip",
    definition: str = "paper",
    thresholds: dict[str, Any] | None = None,
    flagged: int = 0,
) -> TimingFit:
    """Fit ``event_step`` on grok step and window step over ``points``.

    Args:
        points: one (grok_step, window_step, event_step or None) per grokked run.
        thresholds: ``event_timing`` of ``conf/report/verdicts.yaml`` (default: that file).
        flagged: how many of the events are window artifacts (reported, not fitted).
    """
    t = thresholds or verdict_thresholds()["event_timing"]
    have = [(g, w, e) for g, w, e in points if e is not None]
    missing = len(points) - len(have)
    g = [p[0] for p in have]
    w = [p[1] for p in have]
    e = [p[2] for p in have]
    on_grok, on_window = fit_line(g, e), fit_line(w, e)
    b = c = r2 = math.nan
    n = len(have)
    if n >= 3 and len(set(g)) >= 2 and len(set(w)) >= 2:
        design = np.column_stack([np.ones(n), g, w])
        coef, *_ = np.linalg.lstsq(design, np.asarray(e, float), rcond=None)
        _, b, c = (float(v) for v in coef)
        resid = np.asarray(e, float) - design @ coef
        ss_tot = float(((np.asarray(e) - np.mean(e)) ** 2).sum())
        r2 = 1 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else math.nan
    tol, min_r2 = float(t["slope_tolerance"]), float(t["min_r2"])
    if n < int(t["min_runs"]):
        verdict, reason = INCONCLUSIVE, f"{n} runs with the event (< {t['min_runs']})"
    elif len(set(g)) < int(t["min_distinct"]) or len(set(w)) < int(t["min_distinct"]):
        verdict = INCONCLUSIVE
        reason = (
            f"{len(set(g))} distinct grok steps, {len(set(w))} distinct window steps "
            f"(< {t['min_distinct']}): the two cannot be told apart"
        )
    elif abs(b - 1) <= tol and abs(c) <= tol and _r2_at_least(on_grok.r2, min_r2):
        verdict, reason = TRACKS_GROKKING, f"b = {b:.2f} ≈ 1, c = {c:.2f} ≈ 0"
    elif abs(c - 1) <= tol and abs(b) <= tol and _r2_at_least(on_window.r2, min_r2):
        verdict, reason = TRACKS_WINDOW, f"c = {c:.2f} ≈ 1, b = {b:.2f} ≈ 0"
    else:
        verdict = NEITHER
        reason = f"b = {b:.2f}, c = {c:.2f} (tolerance {tol}, R² ≥ {min_r2} needed)"
    return TimingFit(
        event, definition, n, missing, flagged, on_grok, on_window, b, c, r2, verdict, reason
    )


def _r2_at_least(r2: float, minimum: float) -> bool:
    return math.isfinite(r2) and r2 >= minimum


def collection_events(collection: Collection) -> list[RunEvents]:
    """The events of every finished run that has them, in job order."""
    return [ev for ev in (run_events(r) for r in collection.ok) if ev is not None]


def timing_fits(events: list[RunEvents]) -> list[TimingFit]:
    """One :class:`TimingFit` per (event, definition) over the grokked runs."""
    grokked = [ev for ev in events if ev.grok_step is not None]
    fits = []
    for event in TIMED_EVENTS:
        for definition in DEFINITIONS:
            points = [
                (
                    float(ev.grok_step),
                    float(ev.window_step),
                    _opt(ev.steps.get((event, definition))),
                )
                for ev in grokked
                if ev.grok_step is not None
            ]
            flagged = sum(bool(ev.artifacts.get((event, definition))) for ev in grokked)
            fits.append(timing_fit(points, event, definition, flagged=flagged))
    return fits


def _opt(step: int | None) -> float | None:
    return None if step is None else float(step)


def _step_cell(ev: RunEvents, event: str, definition: str) -> str:
    step = ev.steps.get((event, definition))
    if step is None:
        return "–"
    return f"{step}*" if ev.artifacts.get((event, definition)) else str(step)


def _changes_cell(ev: RunEvents, kind: str) -> str:
    steps = [str(c["step"]) for c in ev.changes if c["kind"] == kind]
    return ", ".join(steps) if steps else "–"


def event_timing_table(events: list[RunEvents]) -> Table:
    """Per run: grok step, (W + 1)·N, the events under each definition, the dominant
    deltas' entries and exits. ``*``: the event coincides with a dominant delta entering
    or leaving the window."""
    columns = ["run", "seed", "ω", "N", "grok", "(W+1)·N"]
    for event in TIMED_EVENTS:
        columns += [f"{event} {d}" for d in DEFINITIONS]
    columns += ["dominant left", "dominant entered"]
    rows = []
    for ev in events:
        row = [
            ev.run.name,
            str(ev.run.seed),
            fmt(ev.run.weight_decay, 1),
            str(ev.interval),
            "–" if ev.grok_step is None else str(ev.grok_step),
            str(ev.window_step),
        ]
        for event in TIMED_EVENTS:
            row += [_step_cell(ev, event, d) for d in DEFINITIONS]
        row += [_changes_cell(ev, "left"), _changes_cell(ev, "entered")]
        rows.append(row)
    return Table(
        "Event timing (optimizer steps; * = coincides with a dominant delta entering or "
        "leaving the window)",
        columns,
        rows,
        note="flip: first window where v_1's gradient share < ½ (flip_latest: the newest "
        "delta's share); align: first positive alignment on v_1. Definitions: paper = the "
        "raw window, burn_in = deltas that begin at or after callbacks.gram.start_step, "
        "normalized = unit-norm deltas (docs/edge_definitions.md).",
    )


def timing_fit_table(fits: list[TimingFit]) -> Table:
    """The fits of every (event, definition) over the grokked runs, with the verdict."""
    rows = [
        [
            f.event,
            f.definition,
            str(f.n),
            str(f.missing),
            f"{f.flagged}/{f.n}",
            f"{fmt(f.on_grok.slope, 2)} (R² {fmt(f.on_grok.r2, 2)})",
            f"{fmt(f.on_window.slope, 2)} (R² {fmt(f.on_window.r2, 2)})",
            fmt(f.b_grok, 2),
            fmt(f.c_window, 2),
            fmt(f.r2_joint, 2),
            f"**{f.verdict}**",
            f.reason,
        ]
        for f in fits
    ]
    t = verdict_thresholds()["event_timing"]
    return Table(
        "Does the event follow the grok step or the window? (grokked runs)",
        [
            "event",
            "definition",
            "runs",
            "grokked runs without it",
            "window artifacts",
            "slope on grok",
            "slope on (W+1)·N",
            "joint b (grok)",
            "joint c (window)",
            "joint R²",
            "verdict",
            "why",
        ],
        rows,
        note=f"Joint fit: event = a + b·grok + c·(W+1)·N. Tracks grokking: |b − 1| ≤ "
        f"{t['slope_tolerance']}, |c| ≤ {t['slope_tolerance']} and R² on grok ≥ {t['min_r2']}; "
        "tracks the window: the same with b and c swapped (conf/report/verdicts.yaml).",
    )


def control_table(events: list[RunEvents]) -> Table | None:
    """The runs that never grokked (e.g. ω = 0): their events, which no grok step can
    explain."""
    rows = []
    for ev in events:
        if ev.grok_step is not None:
            continue
        rows.append(
            [
                ev.run.name,
                str(ev.run.seed),
                fmt(ev.run.weight_decay, 1),
                str(ev.interval),
                *(_step_cell(ev, "flip", d) for d in DEFINITIONS),
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
