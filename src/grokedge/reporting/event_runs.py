"""A run's events from its files, the trajectories they form, and the verdict rule
(:mod:`.event_rule`) applied over them.

An *event* is the step of a window where something happens to the edge: v_1's gradient
share first falls below ½ (``flip``; ``flip_latest`` for the newest delta alone), the
alignment on v_1 first turns positive (``align``). The ``EdgeAlignmentCallback`` finds them
under every edge definition and writes them into the run's ``edge_summary`` row, at its
Gram interval N and (``intervals``) at every derived N = k·N0 (docs/edge_definitions.md).

1. The unit of evidence is a *trajectory*: the runs of one task, seed, ω, grok step and
   configuration apart from the Gram interval are one training, analysed at several N.
   Its event step at each N comes from the ``intervals`` of its rows and from its runs
   at other N (legacy sweeps), merged (:func:`trajectories`).
2. :func:`timing_fits` judges every (event, definition) over the grokked trajectories.
3. ``summary.json``'s ``grok_steps`` (one grok step per threshold/patience) give the
   verdicts once per grok definition; :func:`grok_sensitivity` says whether any changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from grokedge.edge.definitions import BURN_IN, EDGE_DEFINITIONS, PAPER
from grokedge.edge.events import DEFINITION_EVENTS
from grokedge.edge.window import MIN_WINDOW
from grokedge.reporting.discover import Collection, RunData
from grokedge.reporting.event_rule import (
    RUN_GROK,
    Detections,
    TimingFit,
    timing_fit,
    timing_thresholds,
)
from grokedge.wandb_setup import NOT_CONFIGURATION_KEYS

SUMMARY = "edge_summary"
DEFINITIONS = EDGE_DEFINITIONS
TIMED_EVENTS = DEFINITION_EVENTS
INTERVAL_OVERRIDES = frozenset(
    {"task.gram_interval", "callbacks.gram.interval", "callbacks.gram.interval_multiples"}
)
"""Overrides that change only the analysis's N, never the training (one trajectory)."""
SKIPPED_DELTAS = "gram/skipped_deltas"


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
