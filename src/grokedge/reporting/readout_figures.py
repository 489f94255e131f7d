"""Figures of a run's logged read-outs (``metrics.jsonl`` series): the weight-decay
read-outs ``wd/*`` (one line per run, per ω in a sweep) and the gap-flow terms
``gapflow/*``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from grokedge.reporting.discover import RunData
from grokedge.reporting.figure_style import STEP_LABEL, mark_grok, plt, save_figure

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
    return save_figure(fig, path)


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
    return save_figure(fig, path)
