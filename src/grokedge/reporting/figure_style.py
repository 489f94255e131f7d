"""The look every figure of the report shares, and the helpers that draw it.

matplotlib with the Agg backend (files only), one DPI, the colours of the phases and of
v_1..v_5, the step axis's label, the grok step as a dashed black line and the phases
(relative to the run's grok step) shaded. Every figure function of the ``*_figures``
modules takes loaded runs, writes one PNG (:func:`save_figure`) and returns its path, or
returns None when the runs hold nothing to draw (the report then says so). Sizes are
chosen to stay readable at the width of a README (about 1,000 pixels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

from grokedge.analysis_log import PHASES  # noqa: E402
from grokedge.reporting.discover import RunData  # noqa: E402

__all__ = [
    "DPI",
    "K_COLOURS",
    "PHASE_COLOURS",
    "STEP_LABEL",
    "direction_series",
    "is_finite_number",
    "mark_grok",
    "plt",
    "save_figure",
    "shade_phases",
]


DPI = 110


PHASE_COLOURS = {"pre": "#f2f2f2", "at": "#fde0c5", "post": "#e3eefa", "late": "#e6f4e2"}


K_COLOURS = {1: "tab:red", 2: "tab:blue", 3: "tab:green", 4: "tab:purple", 5: "tab:gray"}


STEP_LABEL = "optimizer step"

plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "legend.fontsize": 8.5})


def is_finite_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def save_figure(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def mark_grok(ax: Axes, grok: int | None, label: bool = True) -> None:
    """The grok step as a dashed vertical line (labelled once per figure)."""
    if grok is not None:
        ax.axvline(grok, color="k", ls="--", lw=1.2, label=f"grok step {grok}" if label else None)


def shade_phases(ax: Axes, run: RunData, analysis: str = "edge_directions") -> None:
    """Shade the step ranges of the phases that ``analysis``'s rows carry."""
    rows = run.rows(analysis) or run.analyses
    spans: dict[str, list[int]] = {}
    for r in rows:
        spans.setdefault(r.get("phase", ""), []).append(int(r["step"]))
    present = [p for p in PHASES if p in spans]
    for i, phase in enumerate(present):
        # Each phase runs up to where the next one starts, so the shading has no gaps.
        end = min(spans[present[i + 1]]) if i + 1 < len(present) else max(spans[phase])
        ax.axvspan(min(spans[phase]), end, color=PHASE_COLOURS[phase], zorder=0, lw=0)


def direction_series(rows: Sequence[dict[str, Any]], k: int, field: str) -> tuple[list, list]:
    xs, ys = [], []
    for r in rows:
        for d in r.get("directions", []):
            if d.get("k") == k and is_finite_number(d.get(field)):
                xs.append(r["step"])
                ys.append(d[field])
    return xs, ys
