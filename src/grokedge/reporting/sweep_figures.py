"""Figures across the runs of a sweep: per configuration, mean ± sd over seeds of v_1's
gradient share and the test accuracy over steps, and bars per phase of any per-run
quantity.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from grokedge.analysis_log import PHASES
from grokedge.reporting.discover import RunData
from grokedge.reporting.figure_style import (
    STEP_LABEL,
    direction_series,
    is_finite_number,
    plt,
    save_figure,
)


def _mean_sd_curves(
    runs: Sequence[RunData], get: Any
) -> tuple[list[int], list[float], list[float]]:
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for step, value in zip(*get(run), strict=True):
            by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    means = [statistics.fmean(by_step[s]) for s in steps]
    sds = [statistics.stdev(by_step[s]) if len(by_step[s]) > 1 else 0.0 for s in steps]
    return steps, means, sds


def sweep_lifecycle_figure(groups: dict[str, list[RunData]], path: Path) -> Path | None:
    """Per configuration, mean ± sd over seeds: v_1's gradient share and test accuracy."""
    if not any(
        r.rows("edge_directions") or r.series("test/acc")[1] for rs in groups.values() for r in rs
    ):
        return None
    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (group, runs) in enumerate(groups.items()):
        c = colours[i % len(colours)]
        label = f"{group} (n={len(runs)})"
        for ax, get in (
            (a, lambda r: direction_series(r.rows("edge_directions"), 1, "grad_frac")),
            (b, lambda r: r.series("test/acc")),
        ):
            xs, m, sd = _mean_sd_curves(runs, get)
            if xs:
                ax.plot(xs, m, color=c, label=label)
                ax.fill_between(
                    xs,
                    [x - s for x, s in zip(m, sd, strict=True)],
                    [x + s for x, s in zip(m, sd, strict=True)],
                    color=c,
                    alpha=0.2,
                )
            for run in runs:
                if run.grok_step is not None:
                    ax.axvline(run.grok_step, color=c, ls="--", lw=1)
    a.set_ylabel("v1 gradient share\n(mean ± sd over seeds)")
    a.set_ylim(-0.03, 1.03)
    b.set_ylabel("test token accuracy\n(mean ± sd over seeds)")
    b.set_xlabel(STEP_LABEL)
    a.set_title("Across seeds; dashed: each seed's grok step")
    for ax in (a, b):
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def sweep_bars_figure(
    groups: dict[str, list[RunData]], path: Path, title: str, ylabel: str, get: Any
) -> Path | None:
    """Bars per configuration and phase: mean ± sd over seeds of ``get(run, phase)``."""
    data: dict[str, dict[str, list[float]]] = {}
    for group, runs in groups.items():
        for phase in PHASES:
            vals = [v for v in (get(r, phase) for r in runs) if is_finite_number(v)]
            if vals:
                data.setdefault(group, {})[phase] = vals
    if not data:
        return None
    phases = [p for p in PHASES if any(p in d for d in data.values())]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / len(data)
    for i, (group, by_phase) in enumerate(data.items()):
        xs = [j + (i - (len(data) - 1) / 2) * width for j in range(len(phases))]
        means = [statistics.fmean(by_phase[p]) if p in by_phase else math.nan for p in phases]
        sds = [
            statistics.stdev(by_phase[p]) if len(by_phase.get(p, [])) > 1 else 0.0 for p in phases
        ]
        ax.bar(xs, means, width, yerr=sds, capsize=3, label=f"{group} (n={len(groups[group])})")
    ax.set_xticks(range(len(phases)), phases)
    ax.set_xlabel("phase (relative to each run's grok step)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.axhline(0, color="0.4", lw=0.8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)
