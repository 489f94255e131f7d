"""EdgeEvents without a Trainer: synthetic windows whose read-outs are known by hand."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from grokedge.edge.definitions import EDGE_DEFINITIONS
from grokedge.edge.events import DefinitionEvents, EdgeEvents
from grokedge.edge.provenance import ENTERED, WindowProvenance
from grokedge.edge.spectrum import WindowSpectrum

INTERVAL = 100
STEPS = list(range(100, 800, INTERVAL))
# (first flip_latest, first flip, first align) step per definition
FIRES = {"paper": (200, 300, 400), "burn_in": (300, 400, 500), "normalized": (400, 500, 600)}
GROK = 400
G23 = {100: 2.0, 200: 5.0, 300: 3.0, 400: 2.5, 500: 9.0, 600: 1.0, 700: 1.0}
ROTATION = {100: math.nan, 200: 10.0, 300: 40.0, 400: 5.0, 500: 20.0, 600: 1.0, 700: 2.0}
DOMINANT_AT = 300  # the newest delta owns σ_1² here (and nowhere else)


def _projections(step: int, definition: str) -> tuple[list[float], list[float]]:
    """v_1 projections of 3 deltas: grad share 0.8, then 0.2 for the newest delta alone
    (flip_latest), then 0.2 over the window (flip), then a positive alignment (align)."""
    latest, flip, align = FIRES[definition]
    if step < latest:
        return [2.0, 2.0, 2.0], [-1.0, -1.0, -1.0]
    if step < flip:
        return [2.0, 2.0, 0.5], [-1.0, -1.0, -2.0]
    if step < align:
        return [1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]
    return [1.0, 1.0, 1.0], [2.0, 2.0, 2.0]


def _spans(step: int) -> list[tuple[int, int]]:
    return [(step - 300, step - 200), (step - 200, step - 100), (step - 100, step)]


def _spectrum(step: int, definition: str) -> WindowSpectrum:
    grad, wd = _projections(step, definition)
    eye = torch.eye(3, dtype=torch.float64)
    return WindowSpectrum(
        step=step,
        sigma=torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64),
        eigvecs=eye,
        grad_proj=torch.tensor(grad, dtype=torch.float64)[:, None],
        wd_proj=torch.tensor(wd, dtype=torch.float64)[:, None],
        count=3,
        gram=eye,
        cross_gram=eye,
        wd_gram=eye,
        spans=_spans(step),
        definition=definition,
    )


def _provenance(step: int) -> WindowProvenance:
    share = [0.05, 0.05, 0.9] if step == DOMINANT_AT else [0.3, 0.3, 0.4]
    begin, end = _spans(step)[2]
    return WindowProvenance(
        first_step=step - 300,
        last_step=step,
        holds_burn_in=False,
        delta_energy=[9.0 * s for s in share],
        delta_share=share,
        dominant_index=2,
        dominant_share=share[2],
        dominant_begin=begin,
        dominant_end=end,
    )


def _feed(events: EdgeEvents, steps: list[int]) -> dict[int, dict[str, float]]:
    fired = {}
    for step in steps:
        spectra = {d: _spectrum(step, d) for d in EDGE_DEFINITIONS}
        grad, wd = _projections(step, "paper")
        g = torch.tensor(grad).pow(2).mean().item()
        w = torch.tensor(wd).pow(2).mean().item()
        align = (torch.tensor(grad) * torch.tensor(wd)).mean().item()
        measured = {"grad_frac": [g / (g + w)], "align": [align], "rotation_deg": [ROTATION[step]]}
        grok = GROK if step >= GROK else None
        fired[step] = events.update(step, grok, spectra, _provenance(step), measured, G23[step])
    return fired


def test_each_definition_event_fires_once_at_its_step() -> None:
    events = EdgeEvents(dominance_threshold=0.5, coincidence_windows=1)
    fired = _feed(events, STEPS)
    for name, (latest, flip, align) in FIRES.items():
        for event, at in (("flip_latest", latest), ("flip", flip), ("align", align)):
            key = f"edge/{event}_step_{name}"
            assert [s for s, v in fired.items() if key in v] == [at], key
            assert fired[at][key] == float(at)
            assert events.definition_steps[event][name] == at
    # The analysed edge (measured): flip and align once, at the paper steps.
    assert [s for s, v in fired.items() if "edge/flip_step" in v] == [300]
    assert [s for s, v in fired.items() if "edge/align_step" in v] == [400]
    assert (events.flip_step, events.align_step) == (300, 400)
    # Every window logs every definition's v_1 gradient share.
    assert fired[100]["edge/grad_frac_v1_normalized"] == pytest.approx(0.8)
    assert set(events.readouts) == set(EDGE_DEFINITIONS)
    # g_23: peak 5 at step 200 over 2.5 at the grok step, computed at the first window past it.
    assert [s for s, v in fired.items() if "gram/g23_compression" in v] == [500]
    assert events.g23_compression == pytest.approx(2.0) and events.g23_peak_step == 200
    assert events.finish(GROK) == {}
    assert events.rotation_spike == [300.0, 40.0]
    assert events.windows == len(STEPS)


def test_events_within_the_tolerance_of_a_dominant_change_are_artifacts() -> None:
    events = EdgeEvents(dominance_threshold=0.5, coincidence_windows=1)
    _feed(events, STEPS)
    assert [(c.step, c.kind) for c in events.dominance.changes] == [(DOMINANT_AT, ENTERED)]
    found = {(e["event"], e["definition"]): e for e in events.events(INTERVAL, "paper")}
    assert found[("flip", "paper")]["window_artifact"]  # at the change
    assert found[("flip_latest", "paper")]["window_artifact"]  # one interval before
    assert found[("align", "paper")]["window_artifact"]  # one interval after
    assert not found[("align", "burn_in")]["window_artifact"]  # two intervals after
    assert not found[("flip", "normalized")]["window_artifact"]
    assert found[("rotation_spike", "paper")]["step"] == 300
    assert found[("g23_peak", "paper")]["coinciding"][0]["step"] == DOMINANT_AT
    strict = {
        (e["event"], e["definition"]): e["window_artifact"] for e in events.events(INTERVAL // 2)
    }
    assert strict[("flip", "paper")] and not strict[("flip_latest", "paper")]
    exact = EdgeEvents(coincidence_windows=0)
    _feed(exact, STEPS)
    at_change = {
        (e["event"], e["definition"]) for e in exact.events(INTERVAL) if e["window_artifact"]
    }
    assert at_change == {("flip", "paper"), ("flip_latest", "burn_in"), ("rotation_spike", "paper")}


def test_compression_at_the_end_of_training_when_no_window_is_past_the_grok_step() -> None:
    events = EdgeEvents()
    _feed(events, [100, 200, 300])
    assert events.finish(None) == {} and events.g23_compression is None
    assert events.finish(300) == {"gram/g23_compression": pytest.approx(5.0 / 3.0)}
    assert events.finish(300) == {}


def test_state_round_trip_resumes_identically() -> None:
    whole = EdgeEvents(dominance_threshold=0.5, coincidence_windows=1)
    _feed(whole, STEPS)
    first = EdgeEvents(dominance_threshold=0.5, coincidence_windows=1)
    _feed(first, STEPS[:3])
    buf = io.BytesIO()
    torch.save(json.loads(json.dumps(first.state_dict())), buf)
    buf.seek(0)
    resumed = EdgeEvents(dominance_threshold=0.5, coincidence_windows=1)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.state_dict() == first.state_dict()
    _feed(resumed, STEPS[3:])
    assert resumed.state_dict() == whole.state_dict()
    assert resumed.events(INTERVAL) == whole.events(INTERVAL)
    empty = EdgeEvents()
    empty.load_state_dict({})
    assert empty.state_dict() == EdgeEvents().state_dict()


# ------------------------------------------------------------ per-definition events


def _feed_definitions(events: DefinitionEvents, steps: list[int]) -> dict[int, dict[str, float]]:
    """The synthetic windows of ``_feed``, burn_in's missing before step 300 (its first
    window), as a derived window's events see them."""
    fired = {}
    for step in steps:
        spectra = {d: _spectrum(step, d) for d in EDGE_DEFINITIONS}
        if step < 300:
            spectra["burn_in"] = None
        fired[step] = events.update(step, spectra, _provenance(step))
    return fired


def test_definition_events_name_their_interval_and_record_first_windows() -> None:
    events = DefinitionEvents(0.5, suffix="_n200", latest_scalars=False)
    fired = _feed_definitions(events, STEPS)
    assert events.first_windows == {"paper": 100, "burn_in": 300, "normalized": 100}
    assert set(fired[100]) == {"edge/grad_frac_v1_paper_n200", "edge/grad_frac_v1_normalized_n200"}
    assert fired[100]["edge/grad_frac_v1_paper_n200"] == pytest.approx(0.8)
    for name, (latest, flip, align) in FIRES.items():
        for event, at in (("flip_latest", latest), ("flip", flip), ("align", align)):
            key = f"edge/{event}_step_{name}_n200"
            assert [s for s, v in fired.items() if key in v] == [at], key
    # burn_in's first window (300) already shows its flip_latest: it fired there.
    assert events.table()["burn_in"] == {"flip": 400, "flip_latest": 300, "align": 500}
    assert [(c.step, c.kind) for c in events.dominance.changes] == [(DOMINANT_AT, ENTERED)]
    rows = {(e["event"], e["definition"]): e for e in events.events(200)}
    assert len(rows) == 9 and rows[("flip", "paper")]["window_artifact"]
    assert not rows[("align", "normalized")]["window_artifact"]  # 300 steps after the change
    assert all(not any(k.startswith("edge/grad_frac_latest") for k in v) for v in fired.values())


def test_definition_events_state_round_trip_and_old_states() -> None:
    whole = DefinitionEvents(0.5, suffix="_n300")
    _feed_definitions(whole, STEPS)
    first = DefinitionEvents(0.5, suffix="_n300")
    _feed_definitions(first, STEPS[:2])  # burn_in has no window yet
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = DefinitionEvents(0.5, suffix="_n300")
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.state_dict() == first.state_dict()
    _feed_definitions(resumed, STEPS[2:])
    assert resumed.state_dict() == whole.state_dict()
    assert resumed.events(300) == whole.events(300)
    # An EdgeEvents state written before first_windows: loads; the first windows of a run
    # already under way are unknown (None), not the first window after the resume.
    events = EdgeEvents()
    _feed(events, STEPS[:2])
    old = events.state_dict()
    del old["first_windows"], old["first_windows_unknown"]
    resumed_old = EdgeEvents()
    resumed_old.load_state_dict(old)
    _feed(resumed_old, STEPS[2:])
    assert resumed_old.first_windows == dict.fromkeys(EDGE_DEFINITIONS)
    assert resumed_old.definition_steps == whole.definition_steps
    fresh = EdgeEvents()
    _feed(fresh, STEPS)
    assert fresh.first_windows == dict.fromkeys(EDGE_DEFINITIONS, 100)
