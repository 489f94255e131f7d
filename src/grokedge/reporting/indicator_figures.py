"""The indicator bench's figure: grok-aligned small multiples, one PNG per task.

One panel per indicator (titled with its verdict), every grokked seed on the axis
step − grok step (solid, one colour per seed), the ω = 0 runs that did not grok dashed
grey on step − the task's median grok step, a vertical line at 0 and each detected change
point marked (x: change step − the step the run is aligned at; y: the series there). Each
run is drawn over its change-point search span (what the rule saw).
"""

from __future__ import annotations

import math
from pathlib import Path

from grokedge.reporting.figure_style import plt, save_figure
from grokedge.reporting.indicator_rule import IndicatorVerdict
from grokedge.reporting.indicator_runs import IndicatorRun, label, median_grok, task_span

COLUMNS = 4
"""Panels per row (readable at a README's width)."""

PANEL_SIZE = (3.3, 2.5)
"""Inches per panel (width, height)."""


def indicator_figure(
    task: str,
    runs: list[IndicatorRun],
    verdicts: list[IndicatorVerdict],
    path: Path,
) -> Path | None:
    """The grok-aligned small multiples of ``task`` (module docstring) into ``path``; None
    when no run of the task grokked (nothing to align on) or no indicator has a series.

    Args:
        runs, verdicts: :func:`grokedge.reporting.indicator_runs.task_verdicts`' input and
            output (its runs carry their change points).
    """
    reference, span = median_grok(runs), task_span(runs)
    names = [v.indicator for v in verdicts if any(v.indicator in r.series for r in runs)]
    if reference is None or span is None or not names:
        return None
    rows = math.ceil(len(names) / COLUMNS)
    fig, axes = plt.subplots(
        rows,
        COLUMNS,
        figsize=(PANEL_SIZE[0] * COLUMNS, PANEL_SIZE[1] * rows),
        squeeze=False,
    )
    seeds = sorted({r.run.seed for r in runs if r.run.seed is not None})
    cmap = plt.get_cmap("viridis", max(len(seeds), 2))
    colour = {s: cmap(i) for i, s in enumerate(seeds)}
    by_name = {v.indicator: v for v in verdicts}
    for ax, name in zip(axes.flat, names, strict=False):
        for r in runs:
            if name not in r.series:
                continue
            grok = r.run.grok_step
            if grok is None and not r.is_control:
                continue  # ω > 0 without grokking: no step to align on
            origin = float(grok) if grok is not None else reference
            first, last = span
            # What the change-point search saw: the samples in the task's span.
            kept = [(s, v) for s, v in zip(*r.series[name], strict=True) if first <= s <= last]
            if not kept:
                continue
            steps, values = (list(t) for t in zip(*kept, strict=True))
            xs = [s - origin for s in steps]
            style = (
                {"color": colour.get(r.run.seed, "k"), "lw": 1.0}
                if grok is not None
                else {"color": "0.55", "lw": 0.9, "ls": "--"}
            )
            ax.plot(xs, values, **style)
            change = r.changes.get(name)
            if change is not None:
                y = values[steps.index(change.step)] if change.step in steps else change.after
                x = change.step - origin
                ax.scatter([x], [y], marker="v", s=30, zorder=3, color=style["color"])
        ax.axvline(0, color="k", ls="--", lw=1)
        ax.set_title(f"{label(name)}\n{by_name[name].verdict}", fontsize=8.5)
        ax.set_xlabel("step − grok step", fontsize=7.5)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    fig.suptitle(
        f"{task}: indicators aligned at the grok step (solid: grokked seeds; dashed: ω = 0 at "
        f"the median grok step {reference:g}; ▼ change points)",
        fontsize=10,
    )
    return save_figure(fig, path)
