"""The causal experiments of one run, by step: ablation, ε-sweep/curvature, path-norm
points and probes (the tables ``scripts/causal_dyck.py`` prints).

Each function takes a run's ``analyses.jsonl`` rows and returns a :class:`Table`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from grokedge.reporting.run_measures import (
    SHRINK_CONTROLS,
    grad_share_by_step,
    shrink_dacc,
    shrink_ratio,
)
from grokedge.reporting.table_format import Table, fmt, ratio_cell

SHRINK_NOTE = (
    "shrink: θ·(1 − d/‖θ‖), θ moved the edge removal's distance d = ‖Δθ‖ toward 0; "
    "norm-equal shrink: θ·‖θ_edge‖/‖θ‖, θ shortened to the norm the edge removal leaves "
    "(the same share of ‖θ‖²). Ratios: |Δacc edge| / (|Δacc control| + 1e-8). "
    "–: not recorded (runs from before these controls)."
)


def ablation_table(rows: Sequence[dict[str, Any]]) -> Table:
    """Ablation rows by step: the edge, v_1, the bulk, random, norm-matched and shrink
    controls."""
    grad_frac = grad_share_by_step(rows)
    columns = [
        "step",
        "phase",
        "base acc",
        "Δacc edge",
        "Δacc v1",
        "Δacc bulk v3,v4",
        "random Δacc mean ± sd",
        "ratio (paper's)",
        "z",
        "matched Δacc mean ± sd",
        "matched ratio",
        *(f"{label} {what}" for _, label in SHRINK_CONTROLS for what in ("Δacc", "ratio")),
        "‖Δθ‖",
        "Δacc edge, unseen",
        "v1 grad share",
    ]
    out = []
    for r in (r for r in rows if r["analysis"] == "ablation"):
        ar, am = r["acc_random"], r["acc_matched"]
        out.append(
            [
                str(r["step"]),
                r["phase"],
                fmt(r["base_acc"]),
                fmt(r["edge"]["dacc"]),
                fmt(r["v1"]["dacc"]),
                fmt(r["bulk"]["dacc"]),
                f"{fmt(ar['random_mean'], 4)} ± {fmt(ar['random_sd'], 4)}",
                _summary_ratio(r, ar),
                fmt(ar["z"], 1),
                f"{fmt(am['random_mean'], 4)} ± {fmt(am['random_sd'], 4)}",
                _summary_ratio(r, am),
                *(
                    cell
                    for key, _ in SHRINK_CONTROLS
                    for cell in (
                        fmt(shrink_dacc(r, key), 4),
                        ratio_cell(shrink_ratio(r, key), r["edge"]["dacc"], shrink_dacc(r, key)),
                    )
                ),
                fmt(r["displacement"], 2),
                fmt(r.get("edge_dacc_unseen")),
                fmt(grad_frac.get(r["edge_step"]), 2),
            ]
        )
    return Table(
        "Ablation (edge = span(v1, v2); 300 test sequences; Δ token accuracy)",
        columns,
        out,
        note=SHRINK_NOTE,
    )


def perturbation_table(rows: Sequence[dict[str, Any]]) -> Table:
    """ε-sweep extremes and curvature (finite difference and exact HVP) by step."""
    columns = ["step", "phase", "σ1"]
    columns += [f"max KL v{k}" for k in (1, 2, 3, 4)]
    columns += ["max \\|ΔL\\| v1", "v1ᵀHv1 FD", "v1ᵀHv1 HVP", "v3ᵀHv3 FD", "v3ᵀHv3 HVP"]
    columns += ["v4ᵀHv4 HVP"]
    out = []
    for r in (r for r in rows if r["analysis"] == "perturbation"):
        ext = r["extremes"]
        curv = {c["k"]: c for c in r["curvature"]}

        def kl(k: int, ext: dict = ext) -> str:
            return fmt(ext.get(str(k), {}).get("max_kl"), 6)

        def cv(k: int, how: str, curv: dict = curv) -> str:
            return fmt(curv.get(k, {}).get(how), 4)

        out.append(
            [str(r["step"]), r["phase"], fmt(r["sigma"][0], 3)]
            + [kl(k) for k in (1, 2, 3, 4)]
            + [fmt(ext.get("1", {}).get("max_abs_delta_loss"), 5)]
            + [cv(1, "fd"), cv(1, "hvp"), cv(3, "fd"), cv(3, "hvp"), cv(4, "hvp")]
        )
    return Table(
        "ε-sweep and curvature (200 test sequences; ε ∈ [−0.03, 0.03], 25 points)", columns, out
    )


def path_points_table(rows: Sequence[dict[str, Any]]) -> Table:
    """(σ_k, |ΔL| at the largest |ε|) per direction by step: the paper's path-norm picture."""
    columns = ["step", "phase"] + [f"v{k}: σ, \\|ΔL\\|" for k in (1, 2, 3, 4)]
    out = []
    for r in (r for r in rows if r["analysis"] == "perturbation"):
        pts = {p["k"]: p for p in r["path_points"]}
        cells = [
            f"{fmt(pts[k]['sigma'], 3)}, {fmt(pts[k]['abs_dloss'], 5)}" if k in pts else "–"
            for k in (1, 2, 3, 4)
        ]
        out.append([str(r["step"]), r["phase"], *cells])
    return Table("Path-norm points (σ_k, |ΔL| at |ε| = 0.03):", columns, out, heading="")


def probe_table(rows: Sequence[dict[str, Any]]) -> Table:
    """Probe R² (grouped K-fold mean ± sd) of the primary target by step."""
    columns = ["step", "phase", "linear R²", "quadratic R²", "MLP R²", "positions"]
    out = []
    for r in (r for r in rows if r["analysis"] == "probe"):
        s = r["scores"][r["primary"]]
        cells = [
            f"{fmt(s[k]['mean'])} ± {fmt(s[k]['sd'])}" if k in s else "–"
            for k in ("linear", "quadratic", "mlp")
        ]
        out.append([str(r["step"]), r["phase"], *cells, str(r["n_samples"])])
    return Table(
        "Probes of depth, last block before the final norm (300 test sequences)", columns, out
    )


def causal_tables(rows: Sequence[dict[str, Any]]) -> list[Table]:
    """The causal experiments' tables by step (ablation, ε/curvature, path points, probes)."""
    return [
        ablation_table(rows),
        perturbation_table(rows),
        path_points_table(rows),
        probe_table(rows),
    ]


def causal_markdown(run_dir: Any, rows: Sequence[dict[str, Any]]) -> str:
    """``scripts/causal_dyck.py``'s output: the run's grok step, then the causal tables."""
    grok = next((r["grok_step"] for r in rows if r.get("grok_step") is not None), None)
    parts = [f"Run directory: `{run_dir}`; grok step: {grok}"]
    parts += [t.markdown() for t in causal_tables(rows)]
    return "\n\n".join(parts) + "\n"


def _summary_ratio(row: dict[str, Any], summary: dict[str, Any]) -> str:
    """The ratio cell of an ablation row's ``acc_random`` / ``acc_matched`` summary."""
    return ratio_cell(
        summary.get("ratio"),
        row["edge"]["dacc"],
        summary.get("random_mean"),
        summary.get("ratio_resolved"),
    )
