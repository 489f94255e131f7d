"""The event-timing fit on synthetic event tables whose answer is known, and the event
sections of a report on real run files."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from grokedge.reporting.discover import load_run
from grokedge.reporting.events import (
    INCONCLUSIVE,
    NEITHER,
    TRACKS_GROKKING,
    TRACKS_WINDOW,
    event_timing_table,
    fit_line,
    run_events,
    timing_fit,
)
from tests.real_runs import train

GROKS = [200, 400, 600, 700, 800, 1100, 1300, 1500]
WINDOWS = [300, 600, 900]  # (W + 1)·N for N = 50, 100, 150


def _design(event, seed: int = 0, jitter: float = 50.0):
    """One point per (grok, window) pair: the crossed design of experiment=edge_controls."""
    rng = random.Random(seed)
    return [
        (float(g), float(w), event(g, w) + rng.uniform(-jitter, jitter))
        for g, w in itertools.product(GROKS, WINDOWS)
    ]


def test_an_event_at_the_grok_step_tracks_grokking() -> None:
    fit = timing_fit(_design(lambda g, w: g + 100))
    assert fit.verdict == TRACKS_GROKKING, fit.reason
    assert fit.b_grok == pytest.approx(1, abs=0.1) and fit.c_window == pytest.approx(0, abs=0.1)
    assert fit.on_grok.r2 > 0.9


def test_an_event_at_the_window_step_tracks_the_window() -> None:
    fit = timing_fit(_design(lambda g, w: w))
    assert fit.verdict == TRACKS_WINDOW, fit.reason
    assert fit.c_window == pytest.approx(1, abs=0.1) and fit.b_grok == pytest.approx(0, abs=0.1)
    assert fit.on_window.r2 > 0.9 and fit.on_grok.r2 < 0.2


def test_an_event_at_a_fixed_step_tracks_neither() -> None:
    fit = timing_fit(_design(lambda g, w: 450, jitter=100))
    assert fit.verdict == NEITHER, fit.reason


def test_an_event_at_the_later_of_the_two_tracks_neither() -> None:
    fit = timing_fit(_design(lambda g, w: max(g, w), jitter=0))
    assert fit.verdict == NEITHER, fit.reason
    assert 0.25 < fit.b_grok < 0.9 and 0.1 < fit.c_window < 0.9


def test_too_few_runs_or_one_window_is_inconclusive() -> None:
    few = timing_fit([(g, 600.0, float(g)) for g in GROKS[:4]])
    assert few.verdict == INCONCLUSIVE and "runs" in few.reason
    one_window = timing_fit([(float(g), 600.0, float(g)) for g in GROKS])
    assert one_window.verdict == INCONCLUSIVE and "window steps" in one_window.reason


def test_missing_events_are_counted_not_fitted() -> None:
    points = [(g, w, None if g == 200 else e) for g, w, e in _design(lambda g, w: w)]
    fit = timing_fit(points)
    assert fit.missing == len(WINDOWS) and fit.n == len(points) - len(WINDOWS)
    assert fit.verdict == TRACKS_WINDOW


def test_fit_line_matches_the_closed_form() -> None:
    x = [1.0, 2.0, 4.0, 7.0]
    y = [2.0, 3.5, 9.0, 13.0]
    fit = fit_line(x, y)
    mx, my = sum(x) / 4, sum(y) / 4
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    assert fit.slope == pytest.approx(sxy / sxx)
    assert fit.intercept == pytest.approx(my - fit.slope * mx)
    resid = [b - fit.intercept - fit.slope * a for a, b in zip(x, y, strict=True)]
    ss_tot = sum((b - my) ** 2 for b in y)
    assert fit.r2 == pytest.approx(1 - sum(r * r for r in resid) / ss_tot)


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
    events = run_events(run)
    assert events is not None and events.grok_step == 600
    assert events.window_step == 900
    assert events.steps[("flip", "paper")] == 900
    assert events.artifacts[("flip", "paper")]
    (summary,) = run.rows("edge_summary")
    (flip,) = [e for e in summary["events"] if (e["event"], e["definition"]) == ("flip", "paper")]
    assert {(c["kind"], c["begin"], c["end"]) for c in flip["coinciding"]} >= {("left", 0, 150)}
    # The report's event table says the same (the * marks a window artifact).
    table = event_timing_table([events])
    row = dict(zip(table.columns, table.rows[0], strict=True))
    assert row["flip paper"] == "900*" and row["grok"] == "600" and row["(W+1)·N"] == "900"
    assert "900" in row["dominant left"].split(", ")
    # Metrics: the provenance of every window, the paper flip's step.
    rows = [r for r in run.metrics if "gram/window_first_step" in r]
    assert [r["gram/window_first_step"] for r in rows if r["step"] == 900] == [150.0]
    assert run.last("edge/flip_step_paper") == 900.0
    # The analysed (default, normalized) edge flips at 300, far from the grok step too,
    # but not at a dominant delta's entry or exit: its artifact flag is 0.
    assert run.last("edge/flip_step") == events.steps[("flip", "normalized")] == 300
    assert run.last("edge/flip_window_artifact") == 0.0
