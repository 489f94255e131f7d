"""The report's figures (matplotlib, Agg backend), one function per figure.

Every function takes loaded runs, writes one PNG and returns its path, or returns None
when the runs hold nothing to draw (the report then says so). Axes carry their units
(optimizer steps, parameter units or, for the ``normalized`` edge's σ, none: unit-norm
deltas; degrees, nats); the grok step is a dashed black line
and the phases (relative to the run's grok step) are shaded; sizes are chosen to stay
readable at the width of a README (about 1,000 pixels).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

from grokedge.analysis_log import PHASES  # noqa: E402
from grokedge.reporting.discover import RunData  # noqa: E402
from grokedge.reporting.edge_series import (  # noqa: E402
    analysed_definition,
    definition_g23,
    definition_sigma,
)
from grokedge.reporting.tables import shrink_dacc  # noqa: E402
from grokedge.spectral.edge_definitions import (  # noqa: E402
    BURN_IN,
    EDGE_DEFINITIONS,
    NORMALIZED,
    PAPER,
)

DPI = 110
PHASE_COLOURS = {"pre": "#f2f2f2", "at": "#fde0c5", "post": "#e3eefa", "late": "#e6f4e2"}
K_COLOURS = {1: "tab:red", 2: "tab:blue", 3: "tab:green", 4: "tab:purple", 5: "tab:gray"}
STEP_LABEL = "optimizer step"

plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "legend.fontsize": 8.5})


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _save(fig: plt.Figure, path: Path) -> Path:
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


def _directions(rows: Sequence[dict[str, Any]], k: int, field: str) -> tuple[list, list]:
    xs, ys = [], []
    for r in rows:
        for d in r.get("directions", []):
            if d.get("k") == k and _finite(d.get(field)):
                xs.append(r["step"])
                ys.append(d[field])
    return xs, ys


# --------------------------------------------------------------------------- one run


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
        if len(values) >= k and _finite(values[k - 1]):
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
            xs, ys = _directions(edge, 1, "grad_frac")
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
            xs, ys = _directions(edge, k, "align")
        ax.plot(xs, ys, marker=".", color=K_COLOURS[k], lw=2.2 if k == 1 else 1.2, label=f"v{k}")
    ax.axhline(0, color="0.4", lw=0.8)
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_ylabel(f"grad·WD alignment on v_k,\n{judged} edge ({_units(judged, True)}, symlog)")

    ax = rest[3]
    xs, ys = _directions(edge, 1, "rotation_deg")
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
    return _save(fig, path)


SHRINK_STYLES = (
    ("shrink", "D-.", "tab:purple", "shrink θ·(1 − d/‖θ‖) (same distance d)"),
    ("shrink_norm", "v-.", "tab:brown", "norm-equal shrink θ·‖θ_edge‖/‖θ‖ (same ‖θ‖)"),
)
"""The ablation row's shrink controls: (row key, line style, colour, label)."""


def ablation_figure(run: RunData, path: Path) -> Path | None:
    """Δacc of removing the edge, v_1 and the bulk against random, norm-matched and shrink
    controls (a shrink no row records, as in runs from before it, is left out)."""
    rows = run.rows("ablation")
    if not rows:
        return None
    fig, (ax, bar) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    steps = [r["step"] for r in rows]

    def series(get: Any) -> list[float]:
        return [get(r) if _finite(get(r)) else math.nan for r in rows]

    ax.plot(
        steps, series(lambda r: r["edge"]["dacc"]), "o-", color="tab:red", label="edge span(v1,v2)"
    )
    ax.plot(steps, series(lambda r: r["v1"]["dacc"]), "s--", color="tab:orange", label="v1 alone")
    ax.plot(
        steps,
        series(lambda r: r["bulk"]["dacc"]),
        "^:",
        color="tab:green",
        label="bulk span(v3,v4)",
    )
    for key, colour, label in (
        ("acc_random", "tab:gray", "20 random 2-D subspaces (paper)"),
        ("acc_matched", "tab:blue", "20 norm-matched displacements"),
    ):
        ax.errorbar(
            steps,
            series(lambda r, key=key: r[key]["random_mean"]),
            yerr=series(lambda r, key=key: r[key]["random_sd"]),
            fmt=".-",
            color=colour,
            capsize=3,
            label=f"{label}, mean ± sd",
        )
    shrinks = [
        (key, style, colour, label)
        for key, style, colour, label in SHRINK_STYLES
        if any(_finite(shrink_dacc(r, key)) for r in rows)
    ]
    for key, style, colour, label in shrinks:
        dacc = series(lambda r, key=key: shrink_dacc(r, key))
        ax.plot(steps, dacc, style, color=colour, label=label)
    ax.axhline(0, color="0.4", lw=0.8)
    shade_phases(ax, run, "ablation")
    mark_grok(ax, run.grok_step)
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel("Δ token accuracy after removal")
    ax.set_title("Ablation against random controls")
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)

    phases = [p for p in PHASES if any(r["phase"] == p for r in rows)]
    groups = (
        ("edge", lambda r: r["edge"]["dacc"], "tab:red"),
        ("random", lambda r: r["acc_random"]["random_mean"], "tab:gray"),
        ("matched", lambda r: r["acc_matched"]["random_mean"], "tab:blue"),
        *((key, lambda r, key=key: shrink_dacc(r, key), colour) for key, _, colour, _ in shrinks),
    )
    width = 0.8 / len(groups)
    for i, (label, get, colour) in enumerate(groups):
        means, sds = [], []
        for p in phases:
            vals = [get(r) for r in rows if r["phase"] == p and _finite(get(r))]
            means.append(statistics.fmean(vals) if vals else math.nan)
            sds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
        xs = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(phases))]
        bar.bar(xs, means, width, yerr=sds, capsize=3, color=colour, label=label)
    bar.set_xticks(range(len(phases)), phases)
    bar.set_xlabel("phase (relative to the grok step)")
    bar.set_ylabel("mean Δ token accuracy")
    bar.set_title("By phase (mean ± sd over ablations)")
    bar.axhline(0, color="0.4", lw=0.8)
    bar.legend()
    bar.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def _pick_steps(rows: Sequence[dict[str, Any]], n: int = 4) -> list[dict[str, Any]]:
    """Up to n rows: the first, the grok-triggered one, and evenly spread others, last included."""
    if len(rows) <= n:
        return list(rows)
    idx = {0, len(rows) - 1}
    idx |= {i for i, r in enumerate(rows) if r.get("trigger") == "grok"}
    for i in range(1, n):
        if len(idx) >= n:
            break
        idx.add(round(i * (len(rows) - 1) / (n - 1)))
    return [rows[i] for i in sorted(idx)[:n]]


def eps_figure(run: RunData, path: Path) -> Path | None:
    """ε-curves: Δloss and KL(base‖perturbed) along v_1..v_4 at up to four steps."""
    rows = _pick_steps(run.rows("perturbation"))
    if not rows:
        return None
    fig, axes = plt.subplots(2, len(rows), figsize=(3.2 * len(rows) + 1, 6), squeeze=False)
    for col, r in enumerate(rows):
        for k in (1, 2, 3, 4):
            pts = sorted(
                (s["epsilon"], s["delta_loss"], s["kl"]) for s in r["sweep"] if s["direction"] == k
            )
            if not pts:
                continue
            eps, dl, kl = zip(*pts, strict=True)
            axes[0][col].plot(eps, dl, color=K_COLOURS[k], label=f"v{k}")
            axes[1][col].plot(eps, kl, color=K_COLOURS[k], label=f"v{k}")
        axes[0][col].set_title(f"step {r['step']} ({r['phase']})")
        axes[1][col].set_xlabel("ε (parameter units)")
        for row in (0, 1):
            axes[row][col].grid(alpha=0.3)
            axes[row][col].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    axes[0][0].set_ylabel("Δ test loss (nats/token)")
    axes[1][0].set_ylabel("KL(base ‖ perturbed) (nats)")
    axes[0][-1].legend(loc="upper center")
    fig.suptitle(f"{run.name}: loss along θ + ε v_k (grok step {run.grok_step})")
    return _save(fig, path)


def curvature_figure(
    runs: Sequence[RunData], path: Path, labels: Sequence[str] | None = None
) -> Path | None:
    """v_kᵀHv_k (exact HVP, test loss) per direction over steps; one line style per run.

    With two runs (grokked, ω = 0) both share the axes: solid the first, dashed the second.
    """
    runs = [r for r in runs if r.rows("perturbation")]
    if not runs:
        return None
    labels = list(labels or [r.name for r in runs])
    fig, ax = plt.subplots(figsize=(9, 4.5))
    styles = ["o-", "s--", "^:", "d-."]
    values: list[float] = []
    for i, run in enumerate(runs):
        rows = run.rows("perturbation")
        for k in (1, 2, 3, 4):
            pts = [
                (r["step"], c["hvp"])
                for r in rows
                for c in r["curvature"]
                if c["k"] == k and _finite(c.get("hvp"))
            ]
            if pts:
                xs, ys = zip(*pts, strict=True)
                values += ys
                ax.plot(xs, ys, styles[i % 4], color=K_COLOURS[k], label=f"v{k}, {labels[i]}")
        mark_grok(ax, run.grok_step, label=i == 0)
    # Log scale while every curvature is positive; symlog only when a direction is concave.
    scale = "log" if values and min(values) > 0 else "symlog"
    if scale == "log":
        ax.set_yscale("log")
    else:
        ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel(f"v_kᵀ H v_k, test loss\n(nats / parameter unit², {scale})")
    ax.set_title("Curvature along the edge directions (exact HVP)")
    ax.legend(ncol=2 if len(runs) > 1 else 1, loc="upper right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def probes_figure(run: RunData, path: Path) -> Path | None:
    """Probe R² (linear, quadratic, MLP; grouped K-fold mean ± sd) over steps."""
    rows = run.rows("probe")
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    for kind, colour in (("linear", "tab:blue"), ("quadratic", "tab:orange"), ("mlp", "tab:green")):
        pts = [
            (
                r["step"],
                r["scores"][r["primary"]][kind]["mean"],
                r["scores"][r["primary"]][kind]["sd"],
            )
            for r in rows
            if kind in r["scores"][r["primary"]]
        ]
        if pts:
            xs, ys, sds = zip(*pts, strict=True)
            ax.errorbar(xs, ys, yerr=sds, fmt="o-", capsize=3, color=colour, label=kind)
    for r in rows:
        ax.annotate(r["phase"], (r["step"], 0.02), xycoords=("data", "axes fraction"), ha="center")
    mark_grok(ax, run.grok_step)
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel(f"R² of {rows[0]['primary']} (grouped K-fold)")
    ax.set_title("Probes of the last block (before the final norm), by step and phase")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


WD_PANELS = (
    ("wd/test_acc", "test token accuracy"),
    ("wd/linear_r2", "linear probe R²"),
    ("wd/attn_entropy", "attention entropy (nats)"),
    ("wd/theta_norm", "‖θ‖ (parameter units)"),
)


def wd_figure(
    runs: Sequence[RunData], path: Path, labels: Sequence[str] | None = None
) -> Path | None:
    """The weight-decay read-outs (wd/*) over steps, one line per run (per ω in a sweep)."""
    runs = [r for r in runs if r.metric_keys("wd")]
    if not runs:
        return None
    labels = list(labels or [r.name for r in runs])
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    for ax, (key, label) in zip(axes.flat, WD_PANELS, strict=True):
        for run, name in zip(runs, labels, strict=True):
            xs, ys = run.series(key)
            if ys:
                ax.plot(xs, ys, "o-", label=name)
            removed = run.last("wd/removed_step")
            if removed is not None and len(runs) == 1:
                ax.axvline(removed, color="tab:red", ls=":", label=f"ω changed at {removed:.0f}")
        if len(runs) == 1:
            mark_grok(ax, runs[0].grok_step)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel(STEP_LABEL)
    axes[0][0].legend()
    fig.suptitle("Weight-decay intervention read-outs")
    return _save(fig, path)


def gapflow_figure(run: RunData, path: Path) -> Path | None:
    """The gap-flow terms, their balance, and predicted against observed dg/dt (gapflow/*)."""
    keys = run.metric_keys("gapflow")
    if not keys:
        return None
    terms = [k for k in keys if "term" in k]
    balance = [k for k in keys if "balance" in k]
    rates = [k for k in keys if ("predicted" in k or "observed" in k) and k not in terms]
    panels = [(terms, "term (gap units / step, symlog)"), (balance, "Term 3 / |Term 2|")]
    panels += [(rates, "dg/dt (gap units / step, symlog)")]
    panels = [(ks, label) for ks, label in panels if ks]
    if not terms or not panels:  # only the end-of-run agreement counts: no terms to draw
        return None
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(9, 3.2 * len(panels)), sharex=True, squeeze=False
    )
    for ax, (ks, label) in zip(axes[:, 0], panels, strict=True):
        for key in ks:
            xs, ys = run.series(key)
            ax.plot(xs, ys, ".-", label=key.split("/", 1)[1])
        if "symlog" in label:
            ax.set_yscale("symlog", linthresh=1e-6)
        ax.axhline(0, color="0.4", lw=0.8)
        mark_grok(ax, run.grok_step)
        ax.set_ylabel(label)
        ax.legend(loc="upper right", ncol=2)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel(STEP_LABEL)
    axes[0, 0].set_title(f"{run.name}: gap flow equation, measured")
    return _save(fig, path)


# ------------------------------------------------------------------------- a sweep


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
            (a, lambda r: _directions(r.rows("edge_directions"), 1, "grad_frac")),
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
    return _save(fig, path)


def sweep_bars_figure(
    groups: dict[str, list[RunData]], path: Path, title: str, ylabel: str, get: Any
) -> Path | None:
    """Bars per configuration and phase: mean ± sd over seeds of ``get(run, phase)``."""
    data: dict[str, dict[str, list[float]]] = {}
    for group, runs in groups.items():
        for phase in PHASES:
            vals = [v for v in (get(r, phase) for r in runs) if _finite(v)]
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
    return _save(fig, path)
