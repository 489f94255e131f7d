"""Event timing: does an event of the edge follow the grok step, or the window arithmetic?

An *event* is the step of a window where something happens to the edge: v_1's gradient
share first falls below ½ (``flip``; ``flip_latest`` for the newest delta alone), the
alignment on v_1 first turns positive (``align``). The ``EdgeAlignmentCallback`` finds them
under every edge definition and writes them into the run's ``edge_summary`` row, at its
Gram interval N and (``intervals``) at every derived N = k·N0 (docs/edge_definitions.md).

The rule (every threshold in ``conf/report/verdicts.yaml``, ``event_timing:``):

1. The unit of evidence is a *trajectory*: the runs of one task, seed, ω, grok step and
   configuration apart from the Gram interval are one training, analysed at several N.
   Its event step at each N comes from the ``intervals`` of its rows and from its runs
   at other N (legacy sweeps), merged.
2. Per trajectory and N, a detection at the definition's first window is *no transition*
   (the first window already satisfies the event) and is left out. With >= 2 N left, a
   fixed step s* is detected at the first window step e_N >= s*, so the detections are
   *consistent* with one step when max_N(e_N − q·N) < min_N(e_N) (q: ``detection_quantum``).
   Inconsistent and non-decreasing in N: *window-driven*; consistent: *fixed*; else
   *unstable*. One N left: *single N*.
3. Across the grokked trajectories: *window-driven* when more than ``window_driven_share``
   of those with a transition are; *no transition* when more than ``no_transition_share``
   of those with the event are; else the N-independent steps of the fixed and single-N
   trajectories (the middle of the steps consistent with every detection,
   (max_N(e_N − q·N) + min_N(e_N)) / 2) are fitted on the grok step by OLS with a
   bootstrap over trajectories (each resample also draws every event step among the steps
   its detections allow, and every grok step within the evaluation interval before it).
   Too few trajectories: *inconclusive*; too few distinct grok steps, or a window step
   (W + 1)·N that correlates with the grok step: *cannot separate*. The slope's interval
   containing 1 and not 0: *tracks grokking* when the median offset (event − grok) is
   within ``offset_tolerance_intervals`` N plus ``offset_tolerance_evaluations``
   evaluation intervals (the grok step is detected up to one evaluation late), else
   *follows grokking with an offset*; containing 0 and not 1: *fixed step*; both or
   neither: *cannot separate*.
   When every trajectory has one N and N differs across them (a legacy sweep), the joint
   fit event = a + b·grok + c·(W + 1)·N is bootstrapped first: c's interval excluding 0
   and b's containing 0 is *window-driven*.
4. ``summary.json``'s ``grok_steps`` (one grok step per threshold/patience) give the
   verdicts once per grok definition; the sensitivity table says whether any changes.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import numpy as np
import yaml

from grokedge.reporting.discover import Collection, RunData
from grokedge.reporting.tables import Table, fmt
from grokedge.spectral.edge_definitions import BURN_IN, EDGE_DEFINITIONS, PAPER
from grokedge.spectral.events import DEFINITION_EVENTS
from grokedge.spectral.window import MIN_WINDOW
from grokedge.wandb_setup import NOT_CONFIGURATION_KEYS

SUMMARY = "edge_summary"
DEFINITIONS = EDGE_DEFINITIONS
TIMED_EVENTS = DEFINITION_EVENTS
RUN_GROK = "run"
"""The grok definition that is each run's own ``grok_step`` (its configured threshold)."""
INTERVAL_OVERRIDES = frozenset(
    {"task.gram_interval", "callbacks.gram.interval", "callbacks.gram.interval_multiples"}
)
"""Overrides that change only the analysis's N, never the training (one trajectory)."""
SKIPPED_DELTAS = "gram/skipped_deltas"

# The verdicts across trajectories.
TRACKS_GROKKING = "tracks grokking"
WINDOW_DRIVEN = "window-driven"
FIXED_STEP = "fixed step"
WITH_OFFSET = "follows grokking with an offset"
NO_TRANSITION = "no transition"
CANNOT_SEPARATE = "cannot separate"
INCONCLUSIVE = "inconclusive"
VERDICTS = (
    TRACKS_GROKKING,
    WINDOW_DRIVEN,
    FIXED_STEP,
    WITH_OFFSET,
    NO_TRANSITION,
    CANNOT_SEPARATE,
    INCONCLUSIVE,
)

# The classes of one trajectory (NO_TRANSITION and WINDOW_DRIVEN are shared with the verdicts).
MISSING = "missing"
FIXED = "fixed"
UNSTABLE = "unstable"
SINGLE_N = "single N"
CLASSES = (WINDOW_DRIVEN, FIXED, UNSTABLE, SINGLE_N, NO_TRANSITION, MISSING)

THRESHOLD_KEYS = {
    # key: (lowest allowed, highest allowed, integer?)
    "detection_quantum": (0.0, math.inf, False),
    "window_driven_share": (0.0, 1.0, False),
    "no_transition_share": (0.0, 1.0, False),
    "min_trajectories": (2, math.inf, True),
    "min_distinct_grok": (2, math.inf, True),
    "max_abs_corr": (0.0, 1.0, False),
    "bootstrap": (1, math.inf, True),
    "bootstrap_seed": (0, math.inf, True),
    "interval_level": (0.0, 1.0, False),
    "offset_tolerance_intervals": (0.0, math.inf, False),
    "offset_tolerance_evaluations": (0.0, math.inf, False),
}


@cache
def verdict_thresholds() -> dict[str, Any]:
    """The parsed ``conf/report/verdicts.yaml``."""
    text = resources.files("grokedge.conf").joinpath("report", "verdicts.yaml").read_text("utf-8")
    return yaml.safe_load(text)


def timing_thresholds(thresholds: dict[str, Any] | None = None) -> dict[str, Any]:
    """``event_timing`` of ``conf/report/verdicts.yaml`` (or ``thresholds``), checked: one
    ValueError naming the key, its value and what is allowed."""
    t = verdict_thresholds()["event_timing"] if thresholds is None else thresholds
    for key, (low, high, integer) in THRESHOLD_KEYS.items():
        value = t.get(key)
        kind = "an integer" if integer else "a number"
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and (not integer or float(value).is_integer()) and low <= value <= high
        if not ok:
            raise ValueError(
                f"event_timing.{key}={value!r} is not allowed: {kind} in [{low}, {high}] "
                "(conf/report/verdicts.yaml)"
            )
    return t


# ------------------------------------------------------------------------- one run


@dataclass
class IntervalEvents:
    """The events of one run at one Gram interval N.

    Attributes:
        interval: N (optimizer steps per delta).
        steps: {(event, definition): first step or None}.
        first_windows: {definition: step of the definition's first window at this N, or
            None when unknown}.
        artifacts: {(event, definition): True when it coincides with a dominant delta
            entering or leaving the window}.
    """

    interval: int
    steps: dict[tuple[str, str], int | None] = field(default_factory=dict)
    first_windows: dict[str, int | None] = field(default_factory=dict)
    artifacts: dict[tuple[str, str], bool] = field(default_factory=dict)


@dataclass
class RunEvents:
    """The events of one run, from its ``edge_summary`` row.

    Attributes:
        run: the run.
        interval: N of the run's own window (N0); window: W.
        edge_definition: the definition the run analysed.
        grok_step: the detected grok step (None: never grokked).
        grok_steps: {grok definition ("0.95/3", ...): step or None} from summary.json
            (empty when the run wrote none).
        steps, artifacts: at N0, {(event, definition): step or None} and {...: flagged}.
        changes: the dominant-delta changes at N0 ({step, kind, begin, end, share}).
        per_interval: {N: :class:`IntervalEvents`}, N0 included.
        grok_resolution: ``task.eval_every`` of its config, the steps between the
            evaluations that detect grokking (0: unrecorded).
    """

    run: RunData
    interval: int
    window: int
    grok_step: int | None
    edge_definition: str = PAPER
    grok_steps: dict[str, int | None] = field(default_factory=dict)
    steps: dict[tuple[str, str], int | None] = field(default_factory=dict)
    artifacts: dict[tuple[str, str], bool] = field(default_factory=dict)
    changes: list[dict[str, Any]] = field(default_factory=list)
    per_interval: dict[int, IntervalEvents] = field(default_factory=dict)
    grok_resolution: int = 0

    @property
    def window_step(self) -> int:
        """(W + 1)·N0: the step at which the first delta θ(N) − θ(0) leaves the window."""
        return (self.window + 1) * self.interval


def derived_first_window(definition: str, interval: int, start_step: int | None) -> int | None:
    """The step of ``definition``'s first window at ``interval`` for a row that does not
    record it, derived exactly from the recording rule (deltas θ(jN) − θ((j−1)N) from step
    0, a window from :data:`MIN_WINDOW` deltas): ``paper``/``normalized`` MIN_WINDOW·N,
    ``burn_in`` the window whose MIN_WINDOW-th delta is the MIN_WINDOW-th to begin at or after
    ``start_step`` (None when ``start_step`` is unrecorded)."""
    if definition != BURN_IN:
        return MIN_WINDOW * interval
    if start_step is None:
        return None
    first_begin = -(-int(start_step) // interval)  # the first delta beginning >= start_step
    return (first_begin + MIN_WINDOW) * interval


def _interval_events(row: dict[str, Any], exact: bool) -> IntervalEvents:
    """One N's events from an ``edge_summary`` row or one of its ``intervals`` entries;
    ``exact``: first windows may be derived (no delta was skipped)."""
    n = int(row["interval"])
    out = IntervalEvents(interval=n)
    for definition, steps in (row.get("definitions") or {}).items():
        for event, step in steps.items():
            out.steps[(event, definition)] = None if step is None else int(step)
    for e in row.get("events") or []:
        key = (e["event"], e["definition"])
        out.artifacts[key] = bool(e.get("window_artifact"))
        if e.get("step") is not None:
            out.steps.setdefault(key, int(e["step"]))
    recorded = row.get("first_windows")
    start = row.get("start_step")
    for definition in DEFINITIONS:
        if isinstance(recorded, dict) and definition in recorded:
            step = recorded[definition]
            out.first_windows[definition] = None if step is None else int(step)
        elif exact:
            out.first_windows[definition] = derived_first_window(
                definition, n, None if start is None else int(start)
            )
        else:
            out.first_windows[definition] = None
    return out


def run_events(run: RunData) -> RunEvents | None:
    """The events of ``run`` (None when it has no ``edge_summary`` row with provenance)."""
    rows = run.rows(SUMMARY)
    if not rows or "definitions" not in rows[-1]:
        return None
    row = rows[-1]
    summary = run.summary or {}
    # A skipped (non-finite) delta shifts every later window: first windows not derivable.
    exact = not summary.get(SKIPPED_DELTAS)
    base = _interval_events(row, exact)
    grok_steps = summary.get("grok_steps")
    out = RunEvents(
        run=run,
        interval=base.interval,
        window=int(row["window"]),
        grok_step=run.grok_step,
        edge_definition=str(row.get("edge_definition", PAPER)),
        grok_steps={str(k): None if v is None else int(v) for k, v in (grok_steps or {}).items()},
        steps=dict(base.steps),
        artifacts=dict(base.artifacts),
        changes=list(row.get("dominant_changes") or []),
        grok_resolution=int((run.config.get("task") or {}).get("eval_every") or 0),
    )
    out.per_interval[base.interval] = base
    for entry in (row.get("intervals") or {}).values():
        ie = _interval_events(entry, exact)
        out.per_interval.setdefault(ie.interval, ie)
    return out


def collection_events(collection: Collection) -> list[RunEvents]:
    """The events of every finished run that has them, in job order."""
    return [ev for ev in (run_events(r) for r in collection.ok) if ev is not None]


# -------------------------------------------------------------------- trajectories


@dataclass(frozen=True)
class Detections:
    """One trajectory's detections of one (event, definition), the input of the rule.

    Attributes:
        grok_step: the trajectory's grok step (optimizer steps).
        window: W (deltas per window).
        steps: {N: event step, or None when it never happened at that N}.
        first_windows: {N: the definition's first window step at N, None when unknown}.
        flagged: some detection coincides with a dominant delta entering or leaving.
        grok_resolution: steps between the evaluations that detect grokking: the grok
            step lies up to this after the true one (0: exact or unknown).
    """

    grok_step: int
    window: int
    steps: dict[int, int | None]
    first_windows: dict[int, int | None] = field(default_factory=dict)
    flagged: bool = False
    grok_resolution: int = 0


@dataclass
class Trajectory:
    """One training, analysed at one or several N (one run or several).

    Attributes:
        runs: its runs, in job order.
        window: W; grok_step: the runs' grok step; grok_steps: by grok definition;
        grok_resolution: the evaluation interval that detected it (0: unknown).
        per_interval: {N: :class:`IntervalEvents`}, merged over runs (the first run that
            has an N gives it: a derived window equals a direct run at that N).
    """

    runs: list[RunEvents]
    window: int
    grok_step: int | None
    grok_steps: dict[str, int | None]
    per_interval: dict[int, IntervalEvents]
    grok_resolution: int = 0

    @property
    def name(self) -> str:
        return "+".join(ev.run.name for ev in self.runs)

    def grok(self, grok_definition: str = RUN_GROK) -> int | None:
        """The grok step under ``grok_definition`` (the run's own where not recorded)."""
        if grok_definition == RUN_GROK or not self.grok_steps:
            return self.grok_step
        return self.grok_steps.get(grok_definition)

    def detections(
        self, event: str, definition: str, grok_definition: str = RUN_GROK
    ) -> Detections | None:
        """The rule's input for one (event, definition); None when it did not grok."""
        grok = self.grok(grok_definition)
        if grok is None:
            return None
        ns = sorted(self.per_interval)
        key = (event, definition)
        return Detections(
            grok_step=grok,
            window=self.window,
            steps={n: self.per_interval[n].steps.get(key) for n in ns},
            first_windows={n: self.per_interval[n].first_windows.get(definition) for n in ns},
            flagged=any(self.per_interval[n].artifacts.get(key) for n in ns),
            grok_resolution=self.grok_resolution,
        )


def trajectory_key(ev: RunEvents) -> tuple[Any, ...]:
    """What makes runs one training: task, seed, ω, grok step, W and every override but
    the Gram interval's (and ``seed=``, ``resume=``). The grok step is part of it because
    runs that do not share it cannot be one training (e.g. a sweep whose seeds were not
    recorded)."""
    overrides = tuple(
        sorted(
            o
            for o in ev.run.overrides
            if o.split("=", 1)[0].lstrip("+~") not in INTERVAL_OVERRIDES | NOT_CONFIGURATION_KEYS
        )
    )
    return (ev.run.task, ev.run.seed, ev.run.weight_decay, ev.grok_step, ev.window, overrides)


def trajectories(events: list[RunEvents]) -> list[Trajectory]:
    """The runs of ``events`` grouped into trajectories, in order of first appearance."""
    out: dict[tuple[Any, ...], Trajectory] = {}
    for ev in events:
        key = trajectory_key(ev)
        if key not in out:
            out[key] = Trajectory(
                [], ev.window, ev.grok_step, dict(ev.grok_steps), {}, ev.grok_resolution
            )
        t = out[key]
        t.runs.append(ev)
        for n, ie in sorted(ev.per_interval.items(), key=lambda kv: kv[0] != ev.interval):
            t.per_interval.setdefault(n, ie)  # the run's own N first, then derived ones
        for k, v in ev.grok_steps.items():
            t.grok_steps.setdefault(k, v)
    return list(out.values())


@dataclass(frozen=True)
class TrajectoryClass:
    """What one trajectory says about one (event, definition).

    Attributes:
        label: one of :data:`CLASSES`.
        step: for ``fixed`` and ``single N``, the N-independent estimate of the event's
            step: the middle of the steps s* consistent with every detection left
            (max_N(e_N − q·N) < s* <= min_N(e_N)), so that the detection's lag of up to one
            window (larger at larger N) does not bias a fit across trajectories.
        half_width: half the width of those consistent steps (the fit's resamples draw
            the step uniformly among them).
        interval, detected: the smallest N left and the step detected there (for ``fixed``
            and ``single N``).
        slope: the within-run OLS slope of the step on N (``window-driven``, in multiples
            of N), else NaN.
        at_first: detections at the first window, left out.
    """

    label: str
    step: float | None = None
    half_width: float = 0.0
    interval: int | None = None
    detected: int | None = None
    slope: float = math.nan
    at_first: int = 0


def classify(d: Detections, quantum: float = 1.0) -> TrajectoryClass:
    """The class of one trajectory's detections (module docstring, step 2)."""
    seen = {n: s for n, s in d.steps.items() if s is not None}
    if not seen:
        return TrajectoryClass(MISSING)
    left = {n: s for n, s in seen.items() if d.first_windows.get(n) != s}
    at_first = len(seen) - len(left)
    if not left:
        return TrajectoryClass(NO_TRANSITION, at_first=at_first)
    ns = sorted(left)
    steps = [left[n] for n in ns]
    after = max(s - quantum * n for n, s in zip(ns, steps, strict=True))
    middle = (after + min(steps)) / 2
    half = (min(steps) - after) / 2
    if len(ns) == 1:
        return TrajectoryClass(SINGLE_N, middle, half, ns[0], steps[0], at_first=at_first)
    if after < min(steps):
        return TrajectoryClass(FIXED, middle, half, ns[0], steps[0], at_first=at_first)
    if all(b >= a for a, b in zip(steps, steps[1:], strict=False)):
        slope = float(np.polyfit(np.asarray(ns, float), np.asarray(steps, float), 1)[0])
        return TrajectoryClass(WINDOW_DRIVEN, slope=slope, at_first=at_first)
    return TrajectoryClass(UNSTABLE, at_first=at_first)


# ----------------------------------------------------------------------- bootstrap


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    """The central ``level`` percentile interval of the finite ``samples``."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return math.nan, math.nan
    tail = (1 - level) / 2
    lo, hi = np.quantile(finite, [tail, 1 - tail])
    return float(lo), float(hi)


def _resamples(n: int, t: dict[str, Any]) -> tuple[np.random.Generator, np.ndarray]:
    """The bootstrap's generator (fixed seed: reproducible) and [B, n] trajectory indices
    drawn with replacement from it."""
    rng = np.random.default_rng(int(t["bootstrap_seed"]))
    return rng, rng.integers(0, n, size=(int(t["bootstrap"]), n))


def bootstrap_line(
    x: np.ndarray,
    y: np.ndarray,
    t: dict[str, Any],
    y_half: np.ndarray | None = None,
    x_lag: np.ndarray | None = None,
) -> tuple[float, float, tuple[float, float]]:
    """(slope, intercept, slope's percentile interval) of y on x by OLS, the interval from
    resampling the points with replacement (resamples where x does not vary are dropped).

    Args:
        x, y: [n] points.
        y_half: [n] or None: y_i is only known to lie in y_i ± y_half[i] (an event
            detection's quantisation); each resample draws it uniformly in there.
        x_lag: [n] or None: x_i is only known to lie in [x_i − x_lag[i], x_i] (a grok
            step detected at the first evaluation after it); drawn likewise.
    """
    slope, intercept = (float(v) for v in np.polyfit(x, y, 1))
    rng, idx = _resamples(len(x), t)
    xs, ys = x[idx], y[idx]
    if y_half is not None:
        ys = ys + rng.uniform(-1.0, 1.0, size=idx.shape) * y_half[idx]
    if x_lag is not None:
        xs = xs - rng.uniform(0.0, 1.0, size=idx.shape) * x_lag[idx]
    xc = xs - xs.mean(axis=1, keepdims=True)
    sxx = (xc**2).sum(axis=1)
    sxy = (xc * (ys - ys.mean(axis=1, keepdims=True))).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        slopes = np.where(sxx > 0, sxy / np.where(sxx > 0, sxx, 1.0), np.nan)
    return slope, intercept, _percentiles(slopes, float(t["interval_level"]))


def bootstrap_joint(
    g: np.ndarray, w: np.ndarray, y: np.ndarray, t: dict[str, Any]
) -> tuple[tuple[float, float], tuple[float, float], float]:
    """Percentile intervals of b and c in y = a + b·g + c·w (OLS, resampling the points)
    and the full-sample c; rank-deficient resamples are dropped."""
    design = np.column_stack([np.ones_like(g), g, w])
    c_full = float(np.linalg.lstsq(design, y, rcond=None)[0][2])
    _, idx = _resamples(len(g), t)
    xs, ys = design[idx], y[idx]  # [B, n, 3], [B, n]
    xtx = np.einsum("bni,bnj->bij", xs, xs)
    xty = np.einsum("bni,bn->bi", xs, ys)
    ok = np.linalg.matrix_rank(xtx) == 3
    coef = np.full((len(idx), 3), np.nan)
    if ok.any():
        coef[ok] = np.linalg.solve(xtx[ok], xty[ok][..., None])[..., 0]
    level = float(t["interval_level"])
    return _percentiles(coef[:, 1], level), _percentiles(coef[:, 2], level), c_full


def _contains(ci: tuple[float, float], x: float) -> bool:
    return ci[0] <= x <= ci[1]


def _ci(ci: tuple[float, float]) -> str:
    return f"[{fmt(ci[0], 2)}, {fmt(ci[1], 2)}]"


# -------------------------------------------------------------------------- verdict


@dataclass(frozen=True)
class TimingFit:
    """The verdict on one (event, definition) across trajectories.

    Attributes:
        event, definition: what was judged; grok_definition: the grok step used.
        n: grokked trajectories; counts: {class: trajectories} (:data:`CLASSES`).
        flagged: trajectories with a detection at a dominant delta's entry or exit.
        fitted: trajectories in the fit on the grok step (0: no fit).
        slope, intercept: that fit (event step on grok step); slope_ci: its bootstrap
            percentile interval; offset: the median event − grok step (steps); corr: the
            correlation of grok and (W + 1)·N over the fitted trajectories (NaN when
            (W + 1)·N does not vary).
        joint_b, joint_c: the joint fit's intervals (legacy single-N designs only).
        multiple: the event step in multiples of N (window-driven only, else NaN).
        verdict: one of :data:`VERDICTS`; reason: why, with its numbers (one line).
    """

    event: str
    definition: str
    n: int
    counts: dict[str, int]
    verdict: str
    reason: str
    grok_definition: str = RUN_GROK
    flagged: int = 0
    fitted: int = 0
    slope: float = math.nan
    intercept: float = math.nan
    slope_ci: tuple[float, float] = (math.nan, math.nan)
    offset: float = math.nan
    corr: float = math.nan
    joint_b: tuple[float, float] | None = None
    joint_c: tuple[float, float] | None = None
    multiple: float = math.nan

    @property
    def missing(self) -> int:
        """Grokked trajectories without the event."""
        return self.counts.get(MISSING, 0)


def timing_fit(
    detections: list[Detections],
    event: str = "flip",
    definition: str = PAPER,
    thresholds: dict[str, Any] | None = None,
    grok_definition: str = RUN_GROK,
) -> TimingFit:
    """The verdict on one (event, definition) over grokked trajectories (module docstring).

    Args:
        detections: one per grokked trajectory.
        thresholds: ``event_timing`` of ``conf/report/verdicts.yaml`` (default: that file).
    """
    t = timing_thresholds(thresholds)
    classes = [classify(d, float(t["detection_quantum"])) for d in detections]
    counts = {c: 0 for c in CLASSES} | Counter(c.label for c in classes)
    base = {
        "event": event,
        "definition": definition,
        "n": len(detections),
        "counts": counts,
        "grok_definition": grok_definition,
        "flagged": sum(d.flagged for d in detections),
    }
    split = ", ".join(f"{counts[c]} {c}" for c in CLASSES if counts[c])
    with_event = len(detections) - counts[MISSING]
    minimum = int(t["min_trajectories"])
    if with_event < minimum:
        return TimingFit(
            **base,
            verdict=INCONCLUSIVE,
            reason=f"{with_event} grokked trajectories with the event (< {minimum}); {split}",
        )
    if counts[NO_TRANSITION] / with_event > float(t["no_transition_share"]):
        return TimingFit(
            **base,
            verdict=NO_TRANSITION,
            reason=f"{counts[NO_TRANSITION]}/{with_event} trajectories detect it only at the "
            f"definition's first window (> {t['no_transition_share']}); {split}",
        )
    transitions = with_event - counts[NO_TRANSITION]
    if counts[WINDOW_DRIVEN] / transitions > float(t["window_driven_share"]):
        multiple = statistics.median(c.slope for c in classes if c.label == WINDOW_DRIVEN)
        return TimingFit(
            **base,
            multiple=multiple,
            verdict=WINDOW_DRIVEN,
            reason=f"{counts[WINDOW_DRIVEN]}/{transitions} trajectories with a transition move "
            f"it with N (> {t['window_driven_share']}); median step ≈ {fmt(multiple, 2)}·N; "
            f"{split}",
        )
    pairs = [(d, c) for d, c in zip(detections, classes, strict=True) if c.step is not None]
    if len(pairs) < minimum:
        return TimingFit(
            **base,
            verdict=INCONCLUSIVE,
            reason=f"{len(pairs)} trajectories with an N-independent step (fixed or single "
            f"N; < {minimum}); {split}",
        )
    return _fit_on_grok(pairs, base, t, split)


def _fit_on_grok(
    pairs: list[tuple[Detections, TrajectoryClass]],
    base: dict[str, Any],
    t: dict[str, Any],
    split: str,
) -> TimingFit:
    """Step 3 of the rule past the class counts: the bootstrap fits and their guards."""
    g = np.asarray([d.grok_step for d, _ in pairs], float)
    y = np.asarray([c.step for _, c in pairs], float)
    ns = np.asarray([c.interval for _, c in pairs], float)
    w = np.asarray([(d.window + 1) * c.interval for d, c in pairs], float)
    base = base | {"fitted": len(pairs)}
    distinct, need = len(set(g.tolist())), int(t["min_distinct_grok"])
    if distinct < need:
        return TimingFit(
            **base,
            verdict=CANNOT_SEPARATE,
            reason=f"{distinct} distinct grok steps over {len(pairs)} trajectories (< {need})",
        )
    corr = math.nan
    if np.ptp(w) > 0:
        corr = float(np.corrcoef(g, w)[0, 1])
        if abs(corr) > float(t["max_abs_corr"]):
            return TimingFit(
                **base,
                corr=corr,
                verdict=CANNOT_SEPARATE,
                reason=f"corr(grok, (W+1)·N) = {fmt(corr, 2)} over {len(pairs)} trajectories "
                f"(|corr| > {t['max_abs_corr']}): grok and window steps collinear",
            )
    base = base | {"corr": corr}
    joint: dict[str, Any] = {}
    if all(c.label == SINGLE_N for _, c in pairs) and np.ptp(w) > 0:
        # The detected steps: a window event is detected at a multiple of N exactly.
        detected = np.asarray([c.detected for _, c in pairs], float)
        b_ci, c_ci, c_full = bootstrap_joint(g, w, detected, t)
        joint = {"joint_b": b_ci, "joint_c": c_ci}
        if not _contains(c_ci, 0.0) and _contains(b_ci, 0.0):
            window = pairs[0][0].window
            return TimingFit(
                **base,
                **joint,
                multiple=c_full * (window + 1),
                verdict=WINDOW_DRIVEN,
                reason=f"joint fit over {len(pairs)} single-N trajectories: c on (W+1)·N in "
                f"{_ci(c_ci)} excludes 0, b on grok in {_ci(b_ci)} contains 0; step ≈ "
                f"{fmt(c_full * (window + 1), 2)}·N",
            )
    half = np.asarray([c.half_width for _, c in pairs], float)
    lag = np.asarray([d.grok_resolution for d, _ in pairs], float)
    slope, intercept, ci = bootstrap_line(g, y, t, half, lag)
    offset = float(np.median(y - g))
    # The event is detected up to one N after it, the grok step up to one evaluation.
    tolerance = float(t["offset_tolerance_intervals"]) * float(np.median(ns)) + float(
        t["offset_tolerance_evaluations"]
    ) * float(np.median(lag))
    fit = base | joint | {"slope": slope, "intercept": intercept, "slope_ci": ci}
    fit["offset"] = offset
    numbers = (
        f"slope on grok {fmt(slope, 2)} in {_ci(ci)} ({t['interval_level']:.0%}, "
        f"{t['bootstrap']} resamples of {len(pairs)} trajectories), median offset "
        f"{fmt(offset, 0)} (tolerance {fmt(tolerance, 0)})"
    )
    single = all(c.label == SINGLE_N for _, c in pairs) and np.ptp(w) == 0
    one_n = f"; one N, one window step {int(w[0])}: a window step is fixed too" if single else ""
    has0, has1 = _contains(ci, 0.0), _contains(ci, 1.0)
    if has1 and not has0:
        verdict = TRACKS_GROKKING if abs(offset) <= tolerance else WITH_OFFSET
    elif has0 and not has1:
        verdict = FIXED_STEP
    else:
        verdict = CANNOT_SEPARATE
    return TimingFit(**fit, verdict=verdict, reason=f"{numbers}; {split}{one_n}")


def grok_definitions(events: list[RunEvents]) -> list[str]:
    """:data:`RUN_GROK` and every grok definition some run's ``grok_steps`` records."""
    return [RUN_GROK, *sorted({k for ev in events for k in ev.grok_steps})]


def timing_fits(events: list[RunEvents], grok_definition: str = RUN_GROK) -> list[TimingFit]:
    """One :class:`TimingFit` per (event, definition) over the grokked trajectories."""
    trajs = trajectories(events)
    fits = []
    for event in TIMED_EVENTS:
        for definition in DEFINITIONS:
            dets = [t.detections(event, definition, grok_definition) for t in trajs]
            fits.append(
                timing_fit(
                    [d for d in dets if d is not None],
                    event,
                    definition,
                    grok_definition=grok_definition,
                )
            )
    return fits


@dataclass(frozen=True)
class Sensitivity:
    """The verdicts of one (event, definition) under each grok definition.

    Attributes:
        verdicts: {grok definition: verdict}, :data:`RUN_GROK` first.
        grokked: {grok definition: trajectories that grokked under it}.
        min_grokked: the fewest grokked trajectories a verdict needs (``min_trajectories``);
            a grok definition under which fewer grokked (e.g. a threshold no run reaches)
            decides nothing and is left out of :attr:`changes`.
    """

    event: str
    definition: str
    verdicts: dict[str, str]
    grokked: dict[str, int] = field(default_factory=dict)
    min_grokked: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.event, self.definition)

    def decided(self, grok_definition: str) -> bool:
        """Whether enough trajectories grokked under ``grok_definition`` to judge."""
        return self.grokked.get(grok_definition, self.min_grokked) >= self.min_grokked

    @property
    def changes(self) -> bool:
        """Whether the verdicts under the grok definitions that decide differ."""
        return len({v for g, v in self.verdicts.items() if self.decided(g)}) > 1


def grok_sensitivity(events: list[RunEvents]) -> list[Sensitivity]:
    """The verdicts once per grok definition (:func:`grok_definitions`)."""
    definitions = grok_definitions(events)
    by_grok = {g: timing_fits(events, g) for g in definitions}
    trajs = trajectories(events)
    grokked = {g: sum(t.grok(g) is not None for t in trajs) for g in definitions}
    least = int(timing_thresholds()["min_trajectories"])
    out = []
    for i, fit in enumerate(by_grok[RUN_GROK]):
        verdicts = {g: fits[i].verdict for g, fits in by_grok.items()}
        out.append(Sensitivity(fit.event, fit.definition, verdicts, grokked, least))
    return out


# -------------------------------------------------------------------------- tables


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
            "–" if not f.fitted else f"{fmt(f.slope, 2)} {_ci(f.slope_ci)}",
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
