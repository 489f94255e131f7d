"""The lifecycle figure of one run's spectral edge: σ_j of the paper's window (and of the
analysed definition's), g_23 against its pre-grok peak and v_1's gradient share under
every edge definition, the alignment on v_1..v_4 and the rotation of v_1 beside the test
accuracy. Axes carry their units (parameter units or, for the ``normalized`` edge's σ,
none: unit-norm deltas).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes

from grokedge.edge.definitions import (
    BURN_IN,
    EDGE_DEFINITIONS,
    NORMALIZED,
    PAPER,
)
from grokedge.reporting.discover import RunData
from grokedge.reporting.edge_series import (
    analysed_definition,
    definition_g23,
    definition_sigma,
)
from grokedge.reporting.figure_style import (
    K_COLOURS,
    STEP_LABEL,
    direction_series,
    is_finite_number,
    mark_grok,
    plt,
    save_figure,
    shade_phases,
)

SIGMA_UNITS = {
    PAPER: "parameter units",
    BURN_IN: "parameter units",
    NORMALIZED: "dimensionless: unit-norm deltas",
}
"""The unit of σ_j of each edge definition's window (docs/edge_definitions.md); g_23 and
the alignment are in its square."""


DEFINITION_STYLES = {PAPER: ("-", 2.4), BURN_IN: (":", 1.4), NORMALIZED: ("--", 1.4)}
"""(line style, width) of each definition where several share an axis (the paper's
thickest: the claims are judged under it)."""


def _units(definition: str, squared: bool = False) -> str:
    unit = SIGMA_UNITS.get(definition, "units of the analysed window")
    if squared and definition in (PAPER, BURN_IN):
        return "squared parameter units"
    return unit


def _definition_series(
    edge: Sequence[dict[str, Any]], definition: str, field: str, k: int
) -> tuple[list[int], list[float]]:
    """(steps, values) of ``definitions[definition][field][k - 1]`` of ``edge_directions``
    rows (the windows where that definition has a k-th direction)."""
    xs, ys = [], []
    for r in edge:
        values = ((r.get("definitions") or {}).get(definition) or {}).get(field) or []
        if len(values) >= k and is_finite_number(values[k - 1]):
            xs.append(r["step"])
            ys.append(values[k - 1])
    return xs, ys


def _sigma_panel(ax: Axes, run: RunData, definition: str) -> None:
    """σ_j of ``definition``'s window over steps (log)."""
    sigmas = definition_sigma(run, definition)
    width = max((len(s) for _, s in sigmas), default=0)
    for j in range(width):
        pts = [(step, s[j]) for step, s in sigmas if len(s) > j and s[j] > 0]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker=".", color=K_COLOURS.get(j + 1), label=f"σ{j + 1}")
    ax.set_yscale("log")
    ax.set_ylabel(f"σ_j, {definition} edge\n({_units(definition)})")


def lifecycle_figure(run: RunData, path: Path) -> Path | None:
    """The paper definition's edge beside the analysed one: σ_j of the paper's window (and
    of the analysed definition's when it is another; each in its units), g_23 relative to
    its pre-grok peak and v_1's gradient share under every definition, the alignment on
    v_1..v_4 of the paper's edge, and the rotation of the analysed edge's v_1 with the test
    accuracy. Runs whose rows predate the definitions: their analysed edge only."""
    edge = run.rows("edge_directions")
    if not run.rows("gram_spectrum") and not edge:
        return None
    analysed = analysed_definition(run)
    has_definitions = any(r.get("definitions") for r in edge)
    judged = PAPER if has_definitions else analysed
    shown = [d for d in EDGE_DEFINITIONS if definition_sigma(run, d)] or [judged]
    sigma_panels = [judged] + ([analysed] if analysed != judged and analysed in shown else [])
    grok = run.grok_step
    n = len(sigma_panels) + 4
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.6 * n), sharex=True)
    for ax, definition in zip(axes, sigma_panels, strict=False):
        _sigma_panel(ax, run, definition)
    axes[0].set_title(
        f"{run.name}: the spectral edge over training "
        f"(claims judged under {judged}; analysed edge: {analysed})"
    )
    rest = axes[len(sigma_panels) :]

    ax = rest[0]
    for d in shown:
        rows = definition_g23(run, d)
        peak = [r["g23"] for r in rows if grok is None or r["step"] <= grok]
        top = max(peak, default=0.0)
        pts = [(r["step"], r["g23"] / top) for r in rows if top > 0 and r["g23"] > 0]
        if pts:
            xs, ys = zip(*pts, strict=True)
            style, width = DEFINITION_STYLES.get(d, ("-", 1.4))
            ax.plot(xs, ys, style, marker=".", lw=width, label=d)
    ax.set_yscale("log")
    ax.set_ylabel("g_23 / its max up to grok\n(dimensionless; 1/value\nat grok = compression)")

    ax = rest[1]
    for d in shown:
        xs, ys = _definition_series(edge, d, "grad_frac", 1)
        if not has_definitions:
            xs, ys = direction_series(edge, 1, "grad_frac")
        style, width = DEFINITION_STYLES.get(d, ("-", 1.4))
        ax.plot(xs, ys, style, marker=".", color=K_COLOURS[1], lw=width, label=f"v1, {d}")
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("gradient share\nof energy on v_1")
    wd = ax.secondary_yaxis("right", functions=(lambda x: 1 - x, lambda x: 1 - x))
    wd.set_ylabel("weight-decay share")

    ax = rest[2]
    for k in (1, 2, 3, 4):
        xs, ys = _definition_series(edge, judged, "align", k)
        if not has_definitions:
            xs, ys = direction_series(edge, k, "align")
        ax.plot(xs, ys, marker=".", color=K_COLOURS[k], lw=2.2 if k == 1 else 1.2, label=f"v{k}")
    ax.axhline(0, color="0.4", lw=0.8)
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_ylabel(f"grad·WD alignment on v_k,\n{judged} edge ({_units(judged, True)}, symlog)")

    ax = rest[3]
    xs, ys = direction_series(edge, 1, "rotation_deg")
    ax.plot(xs, ys, marker=".", color=K_COLOURS[1], label=f"v1 rotation, {analysed} edge")
    ax.set_ylabel("v1 rotation per window (°)")
    ax.set_xlabel(STEP_LABEL)
    steps, acc = run.series("test/acc")
    if acc:
        twin = ax.twinx()
        twin.plot(steps, acc, color="0.3", lw=1, label="test accuracy")
        twin.set_ylabel("test token accuracy")
        twin.set_ylim(0, 1.02)
        twin.legend(loc="lower right")
    for i, ax in enumerate(axes):
        shade_phases(ax, run)
        mark_grok(ax, grok)
        ax.legend(loc="upper right", ncol=3 if i < n - 1 else 1)
        ax.grid(alpha=0.3)
    return save_figure(fig, path)
