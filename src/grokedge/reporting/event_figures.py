"""Figures of the event timing (see :mod:`grokedge.reporting.event_runs`).

- ``flip_scatter_figure``: per edge definition, each grokked run's flip step against its
  grok step at every N it recorded (derived N included), coloured by N, with the identity
  (flip = grok) and each N's window step (W + 1)·N: the eye sees at once which of the two
  lines the points follow.
- ``grok_aligned_figure``: v_1's gradient share of every seed on the step axis and on
  the step − grok step axis, one row per definition. A flip that tracks grokking lines up
  on the right; one that tracks the window lines up on the left.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from grokedge.reporting.event_rule import TimingFit
from grokedge.reporting.event_runs import DEFINITIONS, RunEvents
from grokedge.reporting.figure_style import STEP_LABEL, plt, save_figure

GRAD_SHARE = "v_1 gradient share"


def share_series(ev: RunEvents, definition: str, field: str = "grad_frac") -> tuple[list, list]:
    """(steps, v_1's ``field``) of one definition's windows (``edge_directions`` rows)."""
    xs, ys = [], []
    for row in ev.run.rows("edge_directions"):
        d = (row.get("definitions") or {}).get(definition)
        if d and d.get(field) and d[field][0] is not None:
            xs.append(int(row["step"]))
            ys.append(float(d[field][0]))
    return xs, ys


def flip_scatter_figure(
    events: list[RunEvents], fits: list[TimingFit], path: Path, event: str = "flip"
) -> Path | None:
    """Flip step against grok step per definition (grokked runs), one colour per N: the
    run's own N and every N derived from it. Hollow: a detection at the definition's first
    window (no transition). None if no flips."""
    grokked = [ev for ev in events if ev.grok_step is not None]
    points: dict[str, dict[int, list[tuple[int, int, bool]]]] = {d: {} for d in DEFINITIONS}
    window_steps: dict[int, int] = {}
    for ev in grokked:
        for n, ie in ev.per_interval.items():
            window_steps[n] = (ev.window + 1) * n
            for definition in DEFINITIONS:
                step = ie.steps.get((event, definition))
                if step is not None:
                    first = ie.first_windows.get(definition) == step
                    points[definition].setdefault(n, []).append((ev.grok_step, step, first))
    if not any(points[d] for d in DEFINITIONS):
        return None
    intervals = sorted(window_steps)
    colours = dict(zip(intervals, ["tab:blue", "tab:orange", "tab:green", "tab:red"], strict=False))
    verdicts = {(f.event, f.definition): f.verdict for f in fits}
    fig, axes = plt.subplots(1, len(DEFINITIONS), figsize=(13, 4.3), sharey=True)
    top = max([ev.grok_step or 0 for ev in grokked] + list(window_steps.values()) + [1])
    for ax, definition in zip(axes, DEFINITIONS, strict=True):
        for n in intervals:
            c = colours.get(n, "tab:gray")
            pts = points[definition].get(n, [])
            moved = [(g, s) for g, s, first in pts if not first]
            firsts = [(g, s) for g, s, first in pts if first]
            if moved:
                ax.scatter(*zip(*moved, strict=True), color=c, s=28, label=f"N = {n}", zorder=3)
            if firsts:
                ax.scatter(
                    *zip(*firsts, strict=True), facecolors="none", edgecolors=c, s=28, zorder=3
                )
            ax.axhline(window_steps[n], color=c, ls=":", lw=1.2)
        ax.plot([0, top * 1.1], [0, top * 1.1], color="0.3", lw=1, label="event = grok")
        ax.set_xlabel("grok step")
        ax.set_title(f"{definition}: {verdicts.get((event, definition), '')}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{event} step (dotted: (W + 1)·N; hollow: first window)")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(f"When does the edge {event}? Each point a grokked run at one N")
    return save_figure(fig, path)


def grok_aligned_figure(
    events: list[RunEvents], path: Path, interval: int | None = None
) -> Path | None:
    """v_1's gradient share per seed on the step and the step − grok step axes.

    Args:
        interval: the N whose runs are drawn (default: 100 if present, else the most
            common N).
    """
    if not events:
        return None
    counts = Counter(ev.interval for ev in events)
    n = (
        interval
        if interval is not None
        else (100 if 100 in counts else counts.most_common(1)[0][0])
    )
    runs = [ev for ev in events if ev.interval == n]
    if not any(share_series(ev, d)[0] for ev in runs for d in DEFINITIONS):
        return None
    fig, axes = plt.subplots(
        len(DEFINITIONS), 2, figsize=(12, 3.0 * len(DEFINITIONS)), sharey=True, squeeze=False
    )
    seeds = sorted({ev.run.seed for ev in runs if ev.run.seed is not None})
    cmap = plt.get_cmap("viridis", max(len(seeds), 2))
    colour = {s: cmap(i) for i, s in enumerate(seeds)}
    for row, definition in enumerate(DEFINITIONS):
        left, right = axes[row]
        for ev in runs:
            xs, ys = share_series(ev, definition)
            if not xs:
                continue
            if ev.grok_step is None:  # the control: step axis only, grey
                left.plot(xs, ys, color="0.7", lw=0.8)
                continue
            c = colour.get(ev.run.seed, "k")
            left.plot(xs, ys, color=c, lw=1.1, label=f"seed {ev.run.seed} (grok {ev.grok_step})")
            left.axvline(ev.grok_step, color=c, ls="--", lw=0.8)
            right.plot([x - ev.grok_step for x in xs], ys, color=c, lw=1.1)
        left.axvline(runs[0].window_step, color="k", ls=":", lw=1.2)
        right.axvline(0, color="k", ls="--", lw=1)
        left.set_ylabel(f"{definition}\n{GRAD_SHARE}")
        for ax in (left, right):
            ax.axhline(0.5, color="0.5", lw=0.7)
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
    axes[0, 0].set_title(f"N = {n}: step axis (dotted: (W + 1)·N; grey: ω = 0)")
    axes[0, 1].set_title("grok-aligned: step − grok step")
    axes[-1, 0].set_xlabel(STEP_LABEL)
    axes[-1, 1].set_xlabel("optimizer steps since the grok step")
    axes[0, 0].legend(loc="lower left", fontsize=7, ncol=2)
    return save_figure(fig, path)
