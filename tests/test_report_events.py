"""The event-timing rule (reporting/event_rule.py) on synthetic trajectories whose answer is
known, its pieces against brute force, and the event sections of a report on real run
files."""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from grokedge.reporting import event_rule as E
from grokedge.reporting import event_runs as ER
from grokedge.reporting import event_tables as ET
from grokedge.reporting.discover import RunData, load_run
from tests.real_runs import train

GROKS = [200, 400, 600, 700, 800, 1100, 1300, 1500]  # experiment=edge_controls
NS = [50, 100, 150]  # N0 = 50 and its multiples 2, 3
W = 5
THRESHOLDS = E.timing_thresholds()

StepOf = Callable[[int, int, str], int | None]
"""(grok step, N, definition) -> the event step the run records."""


def detect(step: float, n: int) -> int:
    """The first window step of interval ``n`` at or after ``step``, no earlier than the
    first window 2N: where a window of N detects an event that happens at ``step``."""
    return max(2 * n, math.ceil(step / n) * n)


def _jitter(seed: int, spread: float) -> Callable[[int], float]:
    rng = random.Random(seed)
    table: dict[int, float] = {}
    return lambda g: table.setdefault(g, rng.uniform(-spread, spread))


def _interval_entry(n: int, g: int, step_of: StepOf, first_windows: bool) -> dict[str, Any]:
    steps = {d: {e: step_of(g, n, d) for e in ER.TIMED_EVENTS} for d in ER.DEFINITIONS}
    entry: dict[str, Any] = {"interval": n, "definitions": steps, "events": []}
    if first_windows:
        entry["first_windows"] = {"paper": 2 * n, "burn_in": 3 * n, "normalized": 2 * n}
        entry["start_step"] = n
    return entry


def _run(
    name: str,
    seed: int,
    grok: int | None,
    ns: list[int],
    step_of: StepOf,
    *,
    contract: bool = True,
    grok_steps: dict[str, int | None] | None = None,
    omega: float = 1.0,
    eval_every: int | None = None,
) -> RunData:
    """One run at N0 = ns[0]: with ``contract``, its ``edge_summary`` row holds every N of
    ``ns`` (``intervals``, ``first_windows``); without, only N0 and no first windows nor
    start_step (a legacy row)."""
    g = 0 if grok is None else grok
    row = {
        "analysis": "edge_summary",
        "step": 3000,
        "phase": "late",
        "window": W,
        "edge_definition": "normalized",
        "dominant_changes": [],
        **_interval_entry(ns[0], g, step_of, contract),
    }
    if contract:
        row["intervals"] = {str(n): _interval_entry(n, g, step_of, True) for n in ns}
    summary: dict[str, Any] = {"task": "dyck", "status": "ok", "grok_step": grok}
    task: dict[str, Any] = {"gram_interval": ns[0]}
    if eval_every is not None:
        task["eval_every"] = eval_every
    if grok_steps is not None:
        summary["grok_steps"] = grok_steps
    return RunData(
        path=Path("/nonexistent") / name,
        name=name,
        config={
            "seed": seed,
            "optimizer": {"weight_decay": omega},
            "task": task,
        },
        overrides=[f"seed={seed}", f"task.gram_interval={ns[0]}"],
        summary=summary,
        analyses=[row],
    )


def sweep(
    step_of: StepOf, groks: list[int] = GROKS, *, legacy: bool = False, **kw: Any
) -> list[ER.RunEvents]:
    """One trajectory per grok step (seed i) at every N of :data:`NS`: one run each with
    the contract's ``intervals``, or (``legacy``) one run per N (legacy rows)."""
    runs = []
    for i, g in enumerate(groks):
        if legacy:
            runs += [_run(f"{i}-{n}", i, g, [n], step_of, contract=False, **kw) for n in NS]
        else:
            runs.append(_run(str(i), i, g, NS, step_of, **kw))
    events = [ER.run_events(r) for r in runs]
    assert all(ev is not None for ev in events)
    return events  # type: ignore[return-value]


def fit_of(events: list[ER.RunEvents], definition: str = "paper", grok: str = E.RUN_GROK):
    fits = {(f.event, f.definition): f for f in ER.timing_fits(events, grok)}
    return fits[("flip", definition)]


# ------------------------------------------------------------------ the verdicts


def test_a_grok_tracking_event_in_a_crossed_design_tracks_grokking() -> None:
    jitter = _jitter(0, 30)
    fit = fit_of(sweep(lambda g, n, d: detect(g + jitter(g), n)))
    assert fit.verdict == E.TRACKS_GROKKING, fit.reason
    assert fit.n == len(GROKS)  # trajectories, not runs × N
    assert fit.slope_ci[0] <= 1 <= fit.slope_ci[1] and fit.slope_ci[0] > 0
    assert abs(fit.offset) <= NS[0]


def test_legacy_runs_of_one_seed_at_several_n_are_one_trajectory() -> None:
    jitter = _jitter(1, 30)
    events = sweep(lambda g, n, d: detect(g + jitter(g), n), legacy=True)
    assert len(events) == len(GROKS) * len(NS)
    trajs = ER.trajectories(events)
    assert len(trajs) == len(GROKS) and all(sorted(t.per_interval) == NS for t in trajs)
    fit = fit_of(events)
    assert fit.n == len(GROKS) and fit.verdict == E.TRACKS_GROKKING, fit.reason


def test_an_event_2000_steps_after_grok_does_not_track_grokking() -> None:
    jitter = _jitter(2, 30)
    fit = fit_of(sweep(lambda g, n, d: detect(g + 2000 + jitter(g), n)))
    assert fit.verdict == E.WITH_OFFSET, fit.reason
    assert fit.offset == pytest.approx(2000, abs=NS[0] + 30)


@pytest.mark.parametrize(
    ("eval_every", "expected"), [(None, E.WITH_OFFSET), (100, E.TRACKS_GROKKING)]
)
def test_the_offset_tolerance_allows_for_the_grok_evaluation_interval(
    eval_every: int | None, expected: str
) -> None:
    """An event 120 steps before the detected grok step: beyond one N (50), but within one
    N plus one evaluation interval (100), by which the grok step may be detected late."""
    fit = fit_of(sweep(lambda g, n, d: detect(g - 120, n), eval_every=eval_every))
    assert fit.verdict == expected, fit.reason
    assert fit.offset == pytest.approx(-120, abs=NS[0])


@pytest.mark.parametrize("multiple", [W + 1, 4])
def test_an_event_at_a_multiple_of_n_is_window_driven(multiple: int) -> None:
    fit = fit_of(sweep(lambda g, n, d: multiple * n))
    assert fit.verdict == E.WINDOW_DRIVEN, fit.reason
    assert fit.counts[E.WINDOW_DRIVEN] == len(GROKS)
    assert fit.multiple == pytest.approx(multiple)


def test_an_event_at_2n_is_window_driven_where_2n_is_not_the_first_window() -> None:
    """Legacy rows without start_step: burn_in's first window is unknown, so 2N counts as
    a transition (window-driven); paper's first window is derived (2N): no transition."""
    events = sweep(lambda g, n, d: 2 * n, legacy=True)
    burn_in = fit_of(events, "burn_in")
    assert burn_in.verdict == E.WINDOW_DRIVEN, burn_in.reason
    assert burn_in.multiple == pytest.approx(2)
    paper = fit_of(events, "paper")
    assert paper.verdict == E.NO_TRANSITION, paper.reason
    assert paper.counts[E.NO_TRANSITION] == len(GROKS)


def test_first_window_events_are_counted_and_left_out_of_the_fit() -> None:
    jitter = _jitter(3, 30)
    extra = [1000, 1200]  # two more trajectories that see the event only at 2N

    def step_of(g: int, n: int, d: str) -> int:
        return 2 * n if g in extra else detect(g + jitter(g), n)

    fit = fit_of(sweep(step_of, GROKS + extra))
    assert fit.counts[E.NO_TRANSITION] == len(extra)
    assert fit.fitted == len(GROKS) and fit.n == len(GROKS) + len(extra)
    assert fit.verdict == E.TRACKS_GROKKING, fit.reason


def test_a_fixed_step_whatever_grok_is_a_fixed_step() -> None:
    jitter = _jitter(4, 20)
    fit = fit_of(sweep(lambda g, n, d: detect(300 + jitter(g), n)))
    assert fit.verdict == E.FIXED_STEP, fit.reason
    assert fit.slope_ci[0] <= 0 <= fit.slope_ci[1] and fit.slope_ci[1] < 1


def test_too_few_trajectories_are_inconclusive() -> None:
    fit = fit_of(sweep(lambda g, n, d: detect(g, n), GROKS[:4]))
    assert fit.verdict == E.INCONCLUSIVE, fit.reason
    assert f"4 grokked trajectories with the event (< {THRESHOLDS['min_trajectories']})" in (
        fit.reason
    )


def test_missing_events_are_counted_not_fitted() -> None:
    fit = fit_of(sweep(lambda g, n, d: None if g == 200 else detect(g, n)))
    assert fit.missing == 1 and fit.n == len(GROKS) and fit.fitted == len(GROKS) - 1
    assert fit.verdict == E.TRACKS_GROKKING, fit.reason


def _single_n(groks: list[int], ns: list[int], step_of: StepOf) -> list[ER.RunEvents]:
    runs = [
        _run(str(i), i, g, [n], step_of, contract=False)
        for i, (g, n) in enumerate(zip(groks, ns, strict=True))
    ]
    return [ER.run_events(r) for r in runs]  # type: ignore[misc]


# N rising with the grok step: (W + 1)·N and grok collinear (corr ≈ 0.99).
COLLINEAR_N = [40, 70, 100, 120, 140, 180, 220, 250]


@pytest.mark.parametrize("event", ["grok", "window"])
def test_a_collinear_single_n_design_cannot_separate(event: str) -> None:
    window = [(W + 1) * n for n in COLLINEAR_N]
    assert statistics.correlation(GROKS, window) > 0.98
    jitter = _jitter(5, 20)

    def step_of(g: int, n: int, d: str) -> int:
        return detect(g + jitter(g), n) if event == "grok" else (W + 1) * n

    fit = fit_of(_single_n(GROKS, COLLINEAR_N, step_of))
    assert fit.verdict == E.CANNOT_SEPARATE, fit.reason
    assert fit.corr == pytest.approx(statistics.correlation(GROKS, window))


# N crossed with the grok step: corr(grok, (W + 1)·N) small.
CROSSED_N = [150, 50, 100, 150, 50, 100, 50, 150]


def test_a_legacy_single_n_design_finds_a_window_event_by_the_joint_fit() -> None:
    assert abs(statistics.correlation(GROKS, CROSSED_N)) < THRESHOLDS["max_abs_corr"]
    fit = fit_of(_single_n(GROKS, CROSSED_N, lambda g, n, d: 4 * n))
    assert fit.verdict == E.WINDOW_DRIVEN, fit.reason
    assert fit.multiple == pytest.approx(4) and fit.joint_c is not None
    jitter = _jitter(6, 20)
    grok = fit_of(_single_n(GROKS, CROSSED_N, lambda g, n, d: detect(g + jitter(g), n)))
    assert grok.verdict == E.TRACKS_GROKKING, grok.reason


def test_a_grok_definition_that_changes_a_verdict_is_reported() -> None:
    """Under the runs' own grok step the flip tracks grokking; under 0.99/3 every grok
    step is 600 later, so the flip leads it by 600: the table says the verdict changes."""
    jitter = _jitter(7, 20)
    runs = [
        _run(
            str(i),
            i,
            g,
            NS,
            lambda g, n, d: detect(g + jitter(g), n),
            grok_steps={"0.90/1": g, "0.99/3": g + 600},
        )
        for i, g in enumerate(GROKS)
    ]
    events = [ER.run_events(r) for r in runs]
    assert ER.grok_definitions(events) == [E.RUN_GROK, "0.90/1", "0.99/3"]  # type: ignore[arg-type]
    sens = {s.key: s for s in ER.grok_sensitivity(events)}  # type: ignore[arg-type]
    flip = sens[("flip", "paper")]
    assert flip.verdicts == {
        E.RUN_GROK: E.TRACKS_GROKKING,
        "0.90/1": E.TRACKS_GROKKING,
        "0.99/3": E.WITH_OFFSET,
    }
    assert flip.changes
    table = ET.sensitivity_table(list(sens.values()))
    assert table is not None
    row = next(r for r in table.rows if r[:2] == ["flip", "paper"])
    assert row[-1] == "**yes**"
    # Without grok_steps there is nothing to compare: no table.
    assert ET.sensitivity_table(ER.grok_sensitivity(sweep(lambda g, n, d: detect(g, n)))) is None


def test_a_grok_definition_under_which_too_few_grokked_is_not_a_change() -> None:
    """A threshold that no run reaches leaves every trajectory ungrokked under it: its
    verdict is 'inconclusive' for want of trajectories, which is not a change of verdict."""
    jitter = _jitter(8, 20)
    runs = [
        _run(
            str(i),
            i,
            g,
            NS,
            lambda g, n, d: detect(g + jitter(g), n),
            grok_steps={"0.90/1": g, "0.99/1": None},
        )
        for i, g in enumerate(GROKS)
    ]
    events = [ER.run_events(r) for r in runs]
    flip = {s.key: s for s in ER.grok_sensitivity(events)}[("flip", "paper")]  # type: ignore[arg-type]
    assert flip.verdicts["0.99/1"] == E.INCONCLUSIVE
    assert flip.grokked["0.99/1"] == 0 and flip.grokked["0.90/1"] == len(GROKS)
    assert not flip.decided("0.99/1") and flip.decided("0.90/1")
    assert not flip.changes
    table = ET.sensitivity_table([flip])
    assert table is not None
    assert table.rows[0][-1] == "no"
    assert "(0 grokked)" in table.rows[0][-2]


# --------------------------------------------------------------- against brute force


def test_classify_matches_a_brute_force_search_for_one_step() -> None:
    """A trajectory is fixed exactly when some step s* is detected, at every N, at the first
    window step at or after it (e_N − N < s* <= e_N); window-driven when no such step
    exists and the steps rise with N."""
    rng = random.Random(8)
    seen = set()
    for _ in range(400):
        steps = {n: n * rng.randint(3, 12) for n in NS}
        d = E.Detections(grok_step=500, window=W, steps=steps, first_windows={})
        c = E.classify(d)
        exists = any(all(s - n < star <= s for n, s in steps.items()) for star in range(1, 2000))
        rising = [steps[n] for n in NS] == sorted(steps[n] for n in NS)
        expected = E.FIXED if exists else (E.WINDOW_DRIVEN if rising else E.UNSTABLE)
        assert c.label == expected, steps
        seen.add(c.label)
        if c.label == E.FIXED:
            after = max(s - n for n, s in steps.items())
            assert (c.step, c.interval) == ((after + min(steps.values())) / 2, NS[0])
        if c.label == E.WINDOW_DRIVEN:
            assert c.slope == pytest.approx(
                statistics.linear_regression(NS, [steps[n] for n in NS])[0]
            )
    assert seen == {E.FIXED, E.WINDOW_DRIVEN, E.UNSTABLE}


def test_classify_leaves_out_first_windows_and_missing_n() -> None:
    first = {n: 2 * n for n in NS}
    d = E.Detections(500, W, {50: 250, 100: 300, 150: 300}, first)
    c = E.classify(d)
    assert (c.label, c.at_first, c.step) == (E.FIXED, 1, (max(250 - 50, 300 - 100) + 250) / 2)
    assert (
        E.classify(E.Detections(500, W, {50: None, 100: 600, 150: None}, first)).label == E.SINGLE_N
    )
    assert E.classify(E.Detections(500, W, {n: 2 * n for n in NS}, first)).label == E.NO_TRANSITION
    assert E.classify(E.Detections(500, W, {n: None for n in NS}, first)).label == E.MISSING
    # An unknown first window (None) is not a first window.
    assert E.classify(E.Detections(500, W, {n: 2 * n for n in NS}, {})).label == E.WINDOW_DRIVEN


def test_bootstrap_line_matches_a_loop_over_the_same_resamples() -> None:
    rng = np.random.default_rng(9)
    x = rng.uniform(0, 1000, 8)
    y = 0.7 * x + rng.normal(0, 60, 8)
    t = {**THRESHOLDS, "bootstrap": 300, "bootstrap_seed": 3}
    slope, intercept, (lo, hi) = E.bootstrap_line(x, y, t)
    ref = statistics.linear_regression(x.tolist(), y.tolist())
    assert slope == pytest.approx(ref.slope) and intercept == pytest.approx(ref.intercept)
    idx = np.random.default_rng(3).integers(0, 8, size=(300, 8))  # the same draws
    slopes = [
        statistics.linear_regression(x[i].tolist(), y[i].tolist()).slope
        for i in idx
        if len(set(x[i].tolist())) > 1
    ]
    q = (1 - t["interval_level"]) / 2
    assert lo == pytest.approx(float(np.quantile(slopes, q)))
    assert hi == pytest.approx(float(np.quantile(slopes, 1 - q)))


def test_bootstrap_joint_recovers_known_coefficients() -> None:
    g = np.asarray(GROKS, float)
    w = np.asarray([(W + 1) * n for n in CROSSED_N], float)
    b_ci, c_ci, c = E.bootstrap_joint(g, w, 100 + 0.0 * g + 0.5 * w, THRESHOLDS)
    assert c == pytest.approx(0.5) and c_ci == pytest.approx((0.5, 0.5))
    assert b_ci == pytest.approx((0.0, 0.0), abs=1e-9)


@pytest.mark.parametrize("start_step", [0, 1, 50, 99, 100, 101, 250])
def test_derived_first_windows_match_a_brute_force_window(start_step: int) -> None:
    """Deltas θ(jN) − θ((j−1)N) from step 0, windows of the last W; burn_in keeps the
    deltas beginning at or after start_step; the first window has >= 2 deltas kept."""
    for n in NS:
        for definition in ER.DEFINITIONS:
            first = None
            for j in range(1, 100):
                begins = [(k - 1) * n for k in range(max(1, j - W + 1), j + 1)]
                kept = [b for b in begins if definition != "burn_in" or b >= start_step]
                if len(kept) >= 2:
                    first = j * n
                    break
            assert ER.derived_first_window(definition, n, start_step) == first, (n, definition)
    assert ER.derived_first_window("burn_in", 50, None) is None


def test_bad_thresholds_name_the_key() -> None:
    with pytest.raises(ValueError, match=r"event_timing\.interval_level=1\.5"):
        E.timing_thresholds({**THRESHOLDS, "interval_level": 1.5})
    with pytest.raises(ValueError, match=r"event_timing\.bootstrap=None"):
        E.timing_thresholds({k: v for k, v in THRESHOLDS.items() if k != "bootstrap"})


# ------------------------------------------------------------------- a real run


@pytest.mark.slow  # one real Dyck run of 1,000 steps (~30 s on one thread)
def test_seed_42_flip_at_n_150_is_flagged_as_the_first_delta_leaving(tmp_path: Path) -> None:
    """The issue's own case: Dyck seed 42 groks at 600, but with N = 150 the paper's edge
    flips at (W + 1)·N = 900, when θ(150) − θ(0) leaves the window; the run must say so."""
    run_dir = train(
        tmp_path / "n150",
        [
            "task=dyck",
            "seed=42",
            "callbacks=gram",
            "trainer.max_steps=1050",
            "task.gram_interval=150",
            "task.eval_cadence.ood=100000",
        ],
    )
    run = load_run(run_dir)
    events = ER.run_events(run)
    assert events is not None and events.grok_step == 600
    assert events.window_step == 900
    assert events.steps[("flip", "paper")] == 900
    assert events.artifacts[("flip", "paper")]
    (summary,) = run.rows("edge_summary")
    (flip,) = [e for e in summary["events"] if (e["event"], e["definition"]) == ("flip", "paper")]
    assert {(c["kind"], c["begin"], c["end"]) for c in flip["coinciding"]} >= {("left", 0, 150)}
    # The report's event table says the same (the * marks a window artifact); the run's
    # own N comes first.
    table = ET.event_timing_table([events])
    row = dict(zip(table.columns, table.rows[0], strict=True))
    assert row["flip paper"] == "900*" and row["grok"] == "600" and row["(W+1)·N"] == "900"
    assert "900" in row["dominant left"].split(", ")
    # Metrics: the provenance of every window, the paper flip's step.
    rows = [r for r in run.metrics if "gram/window_first_step" in r]
    assert [r["gram/window_first_step"] for r in rows if r["step"] == 900] == [150.0]
    assert run.last("edge/flip_step_paper") == 900.0
    # The analysed (default, normalized) edge flips at 300, far from the grok step too,
    # but not at a dominant delta's entry or exit: its artifact flag is 0. 300 = 2N is
    # normalized's first window: no transition was seen (°).
    assert run.last("edge/flip_step") == events.steps[("flip", "normalized")] == 300
    assert run.last("edge/flip_window_artifact") == 0.0
    assert events.per_interval[150].first_windows["normalized"] == 300
    assert row["flip normalized"].endswith("°")
