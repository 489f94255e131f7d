"""The event-timing verdict rule: does an event's step follow the grok step or the window?

Pure: detections in, a verdict out (no file is read but the thresholds' own
``conf/report/verdicts.yaml``, ``event_timing:``). The input per trajectory (one
training analysed at one or several Gram intervals N; :mod:`.event_runs` builds them from
run files) is a :class:`Detections`: the event's step at each N.

1. Per trajectory and N, a detection at the definition's first window is *no transition*
   (the first window already satisfies the event) and is left out. With >= 2 N left, a
   fixed step s* is detected at the first window step e_N >= s*, so the detections are
   *consistent* with one step when max_N(e_N − q·N) < min_N(e_N) (q: ``detection_quantum``).
   Inconsistent and non-decreasing in N: *window-driven*; consistent: *fixed*; else
   *unstable*. One N left: *single N* (:func:`classify`).
2. Across the grokked trajectories (:func:`timing_fit`): *window-driven* when more than
   ``window_driven_share`` of those with a transition are; *no transition* when more than
   ``no_transition_share`` of those with the event are; else the N-independent steps of the
   fixed and single-N trajectories (the middle of the steps consistent with every
   detection, (max_N(e_N − q·N) + min_N(e_N)) / 2) are fitted on the grok step by OLS with
   a bootstrap over trajectories (each resample also draws every event step among the
   steps its detections allow, and every grok step within the evaluation interval before
   it). Too few trajectories: *inconclusive*; too few distinct grok steps, or a window
   step (W + 1)·N that correlates with the grok step: *cannot separate*. The slope's
   interval containing 1 and not 0: *tracks grokking* when the median offset (event −
   grok) is within ``offset_tolerance_intervals`` N plus ``offset_tolerance_evaluations``
   evaluation intervals (the grok step is detected up to one evaluation late), else
   *follows grokking with an offset*; containing 0 and not 1: *fixed step*; both or
   neither: *cannot separate*.
   When every trajectory has one N and N differs across them (a legacy sweep), the joint
   fit event = a + b·grok + c·(W + 1)·N is bootstrapped first: c's interval excluding 0
   and b's containing 0 is *window-driven*.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from grokedge.edge.definitions import PAPER
from grokedge.reporting.report_conf import verdict_thresholds
from grokedge.reporting.table_format import fmt

RUN_GROK = "run"
"""The grok definition that is each run's own ``grok_step`` (its configured threshold)."""

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


def interval_contains(ci: tuple[float, float], x: float) -> bool:
    """Whether the closed interval ``ci`` = (low, high) holds ``x``."""
    return ci[0] <= x <= ci[1]


def interval_text(ci: tuple[float, float]) -> str:
    """An interval as ``[low, high]``, two decimals (a table cell, a verdict's reason)."""
    return f"[{fmt(ci[0], 2)}, {fmt(ci[1], 2)}]"


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
        if not interval_contains(c_ci, 0.0) and interval_contains(b_ci, 0.0):
            window = pairs[0][0].window
            return TimingFit(
                **base,
                **joint,
                multiple=c_full * (window + 1),
                verdict=WINDOW_DRIVEN,
                reason=f"joint fit over {len(pairs)} single-N trajectories: c on (W+1)·N in "
                f"{interval_text(c_ci)} excludes 0, b on grok in {interval_text(b_ci)} "
                "contains 0; step ≈ "
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
        f"slope on grok {fmt(slope, 2)} in {interval_text(ci)} ({t['interval_level']:.0%}, "
        f"{t['bootstrap']} resamples of {len(pairs)} trajectories), median offset "
        f"{fmt(offset, 0)} (tolerance {fmt(tolerance, 0)})"
    )
    single = all(c.label == SINGLE_N for _, c in pairs) and np.ptp(w) == 0
    one_n = f"; one N, one window step {int(w[0])}: a window step is fixed too" if single else ""
    has0, has1 = interval_contains(ci, 0.0), interval_contains(ci, 1.0)
    if has1 and not has0:
        verdict = TRACKS_GROKKING if abs(offset) <= tolerance else WITH_OFFSET
    elif has0 and not has1:
        verdict = FIXED_STEP
    else:
        verdict = CANNOT_SEPARATE
    return TimingFit(**fit, verdict=verdict, reason=f"{numbers}; {split}{one_n}")
