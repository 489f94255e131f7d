"""The tables of one run by phase or read-out: the edge lifecycle, the ablation by phase,
the weight-decay read-outs and the gap-flow terms.

Each function takes a :class:`RunData` and returns a :class:`Table` (None where noted).
Phases (pre/at/post/late) are relative to the run's own grok step.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from grokedge.analysis_log import PHASES
from grokedge.reporting.causal_tables import SHRINK_NOTE
from grokedge.reporting.discover import RunData
from grokedge.reporting.run_measures import (
    SHRINK_CONTROLS,
    direction_field,
    shrink_dacc,
    shrink_ratio,
)
from grokedge.reporting.table_format import Table, finite_mean, fmt, ratio_cell

BOOKKEEPING = {"analysis", "step", "phase", "grok_step", "seconds", "trigger"}
"""Fields of an analysis row that are not measurements (left out of the gap-flow table)."""


def lifecycle_phase_table(run: RunData) -> Table:
    """Window means by phase of the gradient share and alignment of v_1..v_4 and rotation."""
    edge = run.rows("edge_directions")
    spectra = {r["step"]: r for r in run.rows("gram_spectrum")}
    columns = ["phase", "windows"]
    columns += [f"grad share v{k}" for k in (1, 2, 3, 4)]
    columns += [f"align v{k}" for k in (1, 2, 3, 4)]
    columns += ["k* (mode)", "v1 rotation (°)"]
    out = []
    for phase in PHASES:
        rows = [r for r in edge if r["phase"] == phase]
        if not rows:
            continue
        kstars = [spectra[r["step"]]["kstar"] for r in rows if r["step"] in spectra]
        mode = statistics.mode(kstars) if kstars else None
        out.append(
            [phase, str(len(rows))]
            + [
                fmt(finite_mean(direction_field(r, k, "grad_frac") for r in rows))
                for k in (1, 2, 3, 4)
            ]
            + [
                fmt(finite_mean(direction_field(r, k, "align") for r in rows), 3)
                for k in (1, 2, 3, 4)
            ]
            + [str(mode) if mode is not None else "–"]
            + [fmt(finite_mean(direction_field(r, 1, "rotation_deg") for r in rows), 1)]
        )
    return Table(
        "Edge lifecycle by phase (window means; alignment in parameter units²)",
        columns,
        out,
        note=f"Grok step: {run.grok_step}. Weight-decay share = 1 − gradient share.",
    )


def ablation_phase_table(run: RunData) -> Table:
    """Ablation Δacc by phase: the edge against the paper's, the norm-matched and the shrink
    controls."""
    rows = run.rows("ablation")
    columns = [
        "phase",
        "ablations",
        "Δacc edge",
        "Δacc v1",
        "Δacc bulk",
        "random Δacc (mean)",
        "matched Δacc (mean)",
        *(f"{label} Δacc (mean)" for _, label in SHRINK_CONTROLS),
        "ratio (paper's, median)",
        "matched ratio (median)",
        *(f"{label} ratio (median)" for _, label in SHRINK_CONTROLS),
    ]
    out = []
    for phase in PHASES:
        sel = [r for r in rows if r["phase"] == phase]
        if not sel:
            continue

        out.append(
            [
                phase,
                str(len(sel)),
                fmt(finite_mean(r["edge"]["dacc"] for r in sel)),
                fmt(finite_mean(r["v1"]["dacc"] for r in sel)),
                fmt(finite_mean(r["bulk"]["dacc"] for r in sel)),
                fmt(finite_mean(r["acc_random"]["random_mean"] for r in sel), 4),
                fmt(finite_mean(r["acc_matched"]["random_mean"] for r in sel), 4),
                *(
                    fmt(finite_mean(shrink_dacc(r, key) for r in sel), 4)
                    for key, _ in SHRINK_CONTROLS
                ),
                _median_ratio(sel, lambda r: r["acc_random"]),
                _median_ratio(sel, lambda r: r["acc_matched"]),
                *(
                    _median_ratio(sel, lambda r, key=key: _shrink_summary(r, key))
                    for key, _ in SHRINK_CONTROLS
                ),
            ]
        )
    return Table(
        "Ablation by phase (means over the phase's ablations)", columns, out, note=SHRINK_NOTE
    )


WD_MEASURES = ("test_acc", "linear_r2", "attn_entropy", "theta_norm", "weight_decay")


def wd_removal_table(run: RunData) -> Table:
    """The weight-decay read-outs (``wd_removal`` rows) by step."""
    columns = ["step", "phase", "trigger", "test acc", "linear R²", "attn entropy (nats)"]
    columns += ["‖θ‖", "ω"]
    out = []
    for r in run.rows("wd_removal"):
        m = r.get("measures", {})
        out.append(
            [str(r["step"]), r["phase"], str(r.get("trigger", "–"))]
            + [fmt(m.get(k), 3) for k in WD_MEASURES]
        )
    return Table("Weight-decay read-outs (wd/*) by step", columns, out)


def _flatten(row: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in row.items():
        if not prefix and key in BOOKKEEPING:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def gapflow_table(run: RunData, max_columns: int = 12) -> Table | None:
    """The gap-flow terms by window: ``gap_flow`` rows if any, else ``gapflow/*`` metrics.

    The columns are whatever numeric fields the rows hold (the GapFlowCallback's), in the
    order first seen; None when the run has neither rows nor metrics.
    """
    rows = run.rows("gap_flow")
    if rows:
        flat = [(r["step"], r.get("phase", "–"), _flatten(r)) for r in rows]
    else:
        keys = run.metric_keys("gapflow")
        if not any("term" in k for k in keys):  # e.g. only the end-of-run agreement
            return None
        by_step: dict[int, dict[str, float]] = {}
        for key in keys:
            for step, value in zip(*run.series(key), strict=True):
                by_step.setdefault(step, {})[key.split("/", 1)[1]] = value
        flat = [(s, "–", v) for s, v in sorted(by_step.items())]
    names: list[str] = []
    for _, _, values in flat:
        names += [k for k in values if k not in names]
    names = names[:max_columns]
    out = [[str(s), p] + [fmt(v.get(k), 4) for k in names] for s, p, v in flat]
    source = "`gap_flow` rows" if rows else "`gapflow/*` metrics"
    return Table(f"Gap-flow terms by window ({source})", ["step", "phase", *names], out)


def _shrink_summary(row: dict[str, Any], key: str) -> dict[str, Any]:
    """A shrink control of an ablation row as a ratio summary (``ratio``, ``random_mean``)."""
    return {"ratio": shrink_ratio(row, key), "random_mean": shrink_dacc(row, key)}


def _median_ratio(rows: list[dict[str, Any]], summary: Any) -> str:
    """The median ratio over the rows whose control is resolved; ``unresolved (...)`` with
    the mean Δ of edge and control when none is (rows without ``ratio_resolved``: a
    finite ratio against a non-zero control counts as resolved)."""
    resolved, edges, controls = [], [], []
    for r in rows:
        s = summary(r)
        ratio, control = s.get("ratio"), s.get("random_mean")
        ok = s.get("ratio_resolved")
        if ok is None:
            ok = ratio is not None and math.isfinite(ratio) and control != 0
        if ok:
            resolved.append(ratio)
        elif control is not None:
            edges.append(r["edge"]["dacc"])
            controls.append(control)
    if resolved:
        return fmt(statistics.median(resolved), 1)
    if controls:
        return ratio_cell(None, finite_mean(edges), finite_mean(controls), False)
    return fmt(None)
