"""Figures of one run's causal experiments: the ablation of the edge against random,
norm-matched and shrink controls, the ε-curves, the curvature per direction (also of a
grokked run beside its ω = 0 run) and the probes of depth, over steps.
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
    K_COLOURS,
    STEP_LABEL,
    is_finite_number,
    mark_grok,
    plt,
    save_figure,
    shade_phases,
)
from grokedge.reporting.run_measures import shrink_dacc

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
        return [get(r) if is_finite_number(get(r)) else math.nan for r in rows]

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
        if any(is_finite_number(shrink_dacc(r, key)) for r in rows)
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
            vals = [get(r) for r in rows if r["phase"] == p and is_finite_number(get(r))]
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
    return save_figure(fig, path)


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
    return save_figure(fig, path)


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
                if c["k"] == k and is_finite_number(c.get("hvp"))
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
    return save_figure(fig, path)


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
    return save_figure(fig, path)
