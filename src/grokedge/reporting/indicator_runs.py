"""The indicator bench's input from run files: every indicator series of a run, the
trajectories of a task, their change points, and the verdict rule applied over them.

Indicators (names as in the tables; order and labels in ``conf/report/verdicts.yaml``,
``indicators.labels`` / ``edge_labels``):

- ``indicator/<name>``: every scalar the run logged under ``indicator/`` in
  ``metrics.jsonl`` (at the indicator callback's own cadence; discovered, not listed),
  but the diagnostics of ``indicators.not_indicators`` (e.g. ``indicator/llc_converged``).
- ``edge/<definition>/<name>``: the edge's own series under every edge definition, from
  the ``edge_directions`` rows (``definitions[d]``): ``sigma_1`` (σ_1), ``g23`` (σ_2² −
  σ_3², squared σ units), ``gap_ratio`` (R = σ_k*/σ_k*+1), ``kstar`` (k* = argmax_j
  σ_j/σ_j+1, 1-based, ratios with σ_j+1 = 0 skipped), ``grad_frac_v1`` (v_1's gradient
  share); and ``rotation_v1`` (degrees, between consecutive windows) under the analysed
  definition only (the rows record rotation for it alone). Rows from before the
  definitions: their σ, share and rotation under the analysed definition (unrecorded: the
  paper's), as :func:`grokedge.reporting.edge_series.definition_sigma`. What a run lacks
  is skipped.

A trajectory is one training: runs that differ only in the Gram interval (legacy sweeps
at several N) are one, the first kept. Grokked trajectories are judged; runs with ω = 0
that did not grok are the control; every run of a task is searched in the task's one span
(:func:`grokedge.reporting.change_points.search_span`); runs with ω > 0 that did not grok
are neither.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch

from grokedge.edge.definitions import EDGE_DEFINITIONS, PAPER
from grokedge.edge.geometry import g23, kstar_ratio
from grokedge.reporting.change_points import ChangePoint, change_point, search_span
from grokedge.reporting.discover import Collection, RunData
from grokedge.reporting.edge_series import UNRECORDED, analysed_definition, definition_sigma
from grokedge.reporting.event_runs import INTERVAL_OVERRIDES
from grokedge.reporting.indicator_rule import IndicatorChange, IndicatorVerdict, indicator_verdict
from grokedge.reporting.report_conf import indicator_settings
from grokedge.wandb_setup import NOT_CONFIGURATION_KEYS

INDICATOR = "indicator"
EDGE = "edge"
Series = tuple[list[int], list[float]]


def _sigma_values(sigma: list[float]) -> dict[str, float]:
    """The edge's σ-derived scalars of one window (module docstring), by the edge's own
    read-outs (``grokedge.edge.geometry``)."""
    out: dict[str, float] = {}
    s = torch.tensor(sigma, dtype=torch.float64)
    if sigma:
        out["sigma_1"] = sigma[0]
    if len(sigma) >= 3:
        out["g23"] = g23(s)
    if len(sigma) >= 2:
        k = kstar_ratio(s)
        out["kstar"] = float(k)
        if sigma[k] > 0:
            out["gap_ratio"] = sigma[k - 1] / sigma[k]
    return out


def _first(values: Any) -> float | None:
    """The first entry of a read-out list ([k], v_1 first) when finite, else None."""
    if isinstance(values, list) and values and isinstance(values[0], int | float):
        return float(values[0]) if math.isfinite(values[0]) else None
    return None


def _append(out: dict[str, Series], name: str, step: int, value: float) -> None:
    steps, values = out.setdefault(name, ([], []))
    steps.append(step)
    values.append(value)


def run_series(run: RunData) -> dict[str, Series]:
    """{indicator name: (steps, values)} of every indicator the run recorded."""
    out: dict[str, Series] = {}
    skip = set(indicator_settings().get("not_indicators") or [])
    for key in run.metric_keys(INDICATOR):
        if key in skip:
            continue
        steps, values = run.series(key)
        if steps:
            out[key] = (steps, values)
    for d in EDGE_DEFINITIONS:  # σ per definition, legacy rows included (edge_series)
        for step, sigma in definition_sigma(run, d):
            for name, value in _sigma_values(sigma).items():
                _append(out, f"{EDGE}/{d}/{name}", step, value)
    analysed = analysed_definition(run)
    analysed = PAPER if analysed == UNRECORDED else analysed  # rows before the definitions
    for row in run.rows("edge_directions"):
        step = int(row["step"])
        by_definition = row.get("definitions") or {}
        v1 = next((d for d in row.get("directions") or [] if d.get("k") == 1), {})
        for d in EDGE_DEFINITIONS:
            share = _first((by_definition.get(d) or {}).get("grad_frac"))
            if share is None and not by_definition and d == analysed:
                share = _first([v1.get("grad_frac")])
            if share is not None:
                _append(out, f"{EDGE}/{d}/grad_frac_v1", step, share)
        rotation = _first([v1.get("rotation_deg")])  # NaN at the first window: left out
        if rotation is not None:
            _append(out, f"{EDGE}/{analysed}/rotation_v1", step, rotation)
    return out


def has_indicators(collection: Collection) -> bool:
    """Whether any finished run logged an ``indicator/`` series."""
    return any(run.metric_keys(INDICATOR) for run in collection.ok)


def ordered(names: set[str] | list[str]) -> list[str]:
    """``names`` in the order of ``indicators.labels``, then the edge's series per
    definition in the order of ``edge_labels``, then the rest by name."""
    conf = indicator_settings()
    order = list(conf["labels"])
    for d in EDGE_DEFINITIONS:
        order += [f"{EDGE}/{d}/{name}" for name in conf["edge_labels"]]
    rank = {name: i for i, name in enumerate(order)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def label(name: str) -> str:
    """The indicator's name in tables and figures."""
    conf = indicator_settings()
    if name in conf["labels"]:
        return str(conf["labels"][name])
    parts = name.split("/")
    if len(parts) == 3 and parts[0] == EDGE and parts[2] in conf["edge_labels"]:
        return f"{conf['edge_labels'][parts[2]]} ({parts[1]})"
    return name


@dataclass
class IndicatorRun:
    """One trajectory's indicators: its run, series and (once judged) change points."""

    run: RunData
    series: dict[str, Series]
    changes: dict[str, ChangePoint | None] = field(default_factory=dict)

    @property
    def grok_resolution(self) -> int:
        """``task.eval_every`` of its config (0: unrecorded)."""
        return int((self.run.config.get("task") or {}).get("eval_every") or 0)

    @property
    def is_control(self) -> bool:
        return self.run.grok_step is None and self.run.weight_decay == 0


def _key(run: RunData) -> tuple[Any, ...]:
    """What makes runs one training (as ``event_runs.trajectory_key``, without W)."""
    skip = INTERVAL_OVERRIDES | NOT_CONFIGURATION_KEYS
    overrides = tuple(
        sorted(o for o in run.overrides if o.split("=", 1)[0].lstrip("+~") not in skip)
    )
    return (run.task, run.seed, run.weight_decay, run.grok_step, overrides)


def task_runs(collection: Collection) -> dict[str, list[IndicatorRun]]:
    """{task: its trajectories with any indicator series}, in job order."""
    seen: set[tuple[Any, ...]] = set()
    out: dict[str, list[IndicatorRun]] = {}
    for run in collection.ok:
        if _key(run) in seen:
            continue
        seen.add(_key(run))
        series = run_series(run)
        if series:
            out.setdefault(run.task, []).append(IndicatorRun(run, series))
    return out


def median_grok(runs: list[IndicatorRun]) -> float | None:
    """The median grok step of the grokked runs (None when none grokked)."""
    groks = [r.run.grok_step for r in runs if r.run.grok_step is not None]
    return float(statistics.median(groks)) if groks else None


def task_span(runs: list[IndicatorRun]) -> tuple[float, float] | None:
    """The task's one change-point span (None when no run grokked)."""
    groks = [float(r.run.grok_step) for r in runs if r.run.grok_step is not None]
    return search_span(groks) if groks else None


def task_verdicts(task: str, runs: list[IndicatorRun]) -> list[IndicatorVerdict]:
    """Every indicator of a task judged (fills each run's ``changes``), in :func:`ordered`."""
    span = task_span(runs)
    names = ordered({name for r in runs for name in r.series})
    verdicts = []
    for name in names:
        grokked: list[IndicatorChange] = []
        controls: list[IndicatorChange] = []
        for r in runs:
            grok = r.run.grok_step
            judged = grok is not None or r.is_control
            if span is None or not judged or name not in r.series:
                continue
            steps, values = r.series[name]
            change = change_point(steps, values, span)
            r.changes[name] = change
            target = grokked if grok is not None else controls
            target.append(IndicatorChange(grok, change, r.grok_resolution))
        verdicts.append(indicator_verdict(name, task, grokked, controls))
    return verdicts


def bench(collection: Collection) -> dict[str, tuple[list[IndicatorRun], list[IndicatorVerdict]]]:
    """{task: (its trajectories, the verdict on every indicator)} of a collection."""
    return {task: (runs, task_verdicts(task, runs)) for task, runs in task_runs(collection).items()}
