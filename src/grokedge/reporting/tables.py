"""The report's tables, from the runs' ``analyses.jsonl``, ``metrics.jsonl`` and summaries.

Each function returns a :class:`Table` (title, columns, formatted cells): rendered as
markdown in ``report.md`` and logged as a ``wandb.Table``. Per run: the causal
experiments by step (ablation, ε-sweep/curvature, path-norm points, probes: the tables
``scripts/causal_dyck.py`` prints), the edge lifecycle and the ablation by phase, the
weight-decay read-outs, the gap-flow terms and the run's class. Per sweep: mean ± sd over
seeds per configuration, the weight-decay-intervention table (the paper's Table 1) and
the universality-class table, each beside the paper's values (``conf/report/paper.yaml``).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from grokedge.analysis_log import PHASES
from grokedge.reporting.discover import Collection, RunData
from grokedge.reporting.paper import mean_sd, paper_values
from grokedge.spectral.ablation import paper_ratio
from grokedge.spectral.classes import OBSERVED_RULES, PREDICTED_RULES, decisive_thresholds

LATE = "late"
AT = "at"
BOOKKEEPING = {"analysis", "step", "phase", "grok_step", "seconds", "trigger"}


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for a table: fixed ``digits``, scientific when tiny or huge, "–" if none."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if x != 0 and (abs(x) < 10**-digits or abs(x) >= 1e4):
        return f"{x:.2e}"
    return f"{x:.{digits}f}"


def mean_sd_text(values: Iterable[float | None], digits: int = 3) -> str:
    """``mean ± sd`` of the finite values (sample sd; the mean alone for one), "–" if none."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return "–"
    if len(xs) == 1:
        return fmt(xs[0], digits)
    return f"{fmt(statistics.fmean(xs), digits)} ± {fmt(statistics.stdev(xs), digits)}"


@dataclass
class Table:
    """A titled table of formatted cells.

    ``heading`` is the markdown prefix of the title (``"###"``; ``""``: a plain paragraph).
    """

    title: str
    columns: list[str]
    rows: list[list[str]]
    heading: str = "###"
    note: str = ""

    def markdown(self) -> str:
        title = f"{self.heading} {self.title}" if self.heading else self.title
        lines = [title, ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "---|" * len(self.columns))
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines)

    @property
    def key(self) -> str:
        """A short identifier (W&B table key): the title up to its first parenthesis."""
        head = self.title.split("(")[0].strip().lower()
        return "".join(c if c.isalnum() else "_" for c in head).strip("_")


def _pipe(text: str) -> str:
    return text.replace("|", "\\|")


# ------------------------------------------------------------------- per run, by step
# (moved here from scripts/causal_dyck.py, which now prints these)


def grad_share_by_step(rows: Sequence[dict[str, Any]]) -> dict[int, float | None]:
    """v_1's gradient share at each Gram window (``edge_directions`` rows)."""
    return {
        r["step"]: r["directions"][0]["grad_frac"]
        for r in rows
        if r["analysis"] == "edge_directions" and r.get("directions")
    }


SHRINK_CONTROLS = (("shrink", "shrink"), ("shrink_norm", "norm-equal shrink"))
"""The ablation row's deterministic shrink controls: (row key, column label)."""

SHRINK_NOTE = (
    "shrink: θ·(1 − d/‖θ‖), θ moved the edge removal's distance d = ‖Δθ‖ toward 0; "
    "norm-equal shrink: θ·‖θ_edge‖/‖θ‖, θ shortened to the norm the edge removal leaves "
    "(the same share of ‖θ‖²). Ratios: |Δacc edge| / (|Δacc control| + 1e-8). "
    "–: not recorded (runs from before these controls)."
)


def shrink_dacc(row: dict[str, Any], key: str) -> float | None:
    """Δacc of the shrink control ``key`` in an ``ablation`` row (None where the row
    predates it)."""
    return (row.get(key) or {}).get("dacc")


def shrink_ratio(row: dict[str, Any], key: str) -> float | None:
    """The paper's ratio of the edge's Δacc against the shrink control ``key`` (None where
    the row predates it), as ``ablation/shrink_ratio`` and ``ablation/shrink_norm_ratio``."""
    edge, control = row["edge"].get("dacc"), shrink_dacc(row, key)
    if edge is None or control is None:
        return None
    return paper_ratio(edge, control)


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
                fmt(ar["ratio"], 1),
                fmt(ar["z"], 1),
                f"{fmt(am['random_mean'], 4)} ± {fmt(am['random_sd'], 4)}",
                fmt(am["ratio"], 1),
                *(
                    cell
                    for key, _ in SHRINK_CONTROLS
                    for cell in (fmt(shrink_dacc(r, key), 4), fmt(shrink_ratio(r, key), 1))
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


# ---------------------------------------------------------------- per run, by phase


def _direction(row: dict[str, Any], k: int, field: str) -> float | None:
    for d in row.get("directions", []):
        if d.get("k") == k:
            return d.get(field)
    return None


def _mean(values: Iterable[float | None]) -> float | None:
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return statistics.fmean(xs) if xs else None


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
            + [fmt(_mean(_direction(r, k, "grad_frac") for r in rows)) for k in (1, 2, 3, 4)]
            + [fmt(_mean(_direction(r, k, "align") for r in rows), 3) for k in (1, 2, 3, 4)]
            + [str(mode) if mode is not None else "–"]
            + [fmt(_mean(_direction(r, 1, "rotation_deg") for r in rows), 1)]
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

        def med(xs: list[float | None]) -> float | None:
            ys = [x for x in xs if x is not None and math.isfinite(x)]
            return statistics.median(ys) if ys else None

        out.append(
            [
                phase,
                str(len(sel)),
                fmt(_mean(r["edge"]["dacc"] for r in sel)),
                fmt(_mean(r["v1"]["dacc"] for r in sel)),
                fmt(_mean(r["bulk"]["dacc"] for r in sel)),
                fmt(_mean(r["acc_random"]["random_mean"] for r in sel), 4),
                fmt(_mean(r["acc_matched"]["random_mean"] for r in sel), 4),
                *(fmt(_mean(shrink_dacc(r, key) for r in sel), 4) for key, _ in SHRINK_CONTROLS),
                fmt(med([r["acc_random"]["ratio"] for r in sel]), 1),
                fmt(med([r["acc_matched"]["ratio"] for r in sel]), 1),
                *(fmt(med([shrink_ratio(r, key) for r in sel]), 1) for key, _ in SHRINK_CONTROLS),
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


MARGINS = "class_margins"
"""The summary field of each criterion's margin to its threshold (a dict)."""


def class_fields(summary: dict[str, Any] | None) -> dict[str, Any]:
    """The summary's fields whose key starts with ``class`` (written by the class analysis).

    A ``class/x`` metric (the last logged value; the class *codes* for ``observed`` and
    ``predicted``) is left out when the summary has the field ``class_x`` itself (the
    class *name*): one column per quantity.
    """
    fields = {k: v for k, v in (summary or {}).items() if k.startswith("class")}
    named = {k[len("class_") :] for k in fields if k.startswith("class_")}
    return {
        k: v
        for k, v in fields.items()
        if not (k.startswith("class/") and k[len("class/") :].removesuffix("_code") in named)
    }


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return fmt(value)
    if isinstance(value, dict | list):
        return _pipe(str(value))
    return "–" if value is None else _pipe(str(value))


def run_class_table(run: RunData) -> Table | None:
    """The run's class fields beside the paper's class of its task; None without any."""
    fields = class_fields(run.summary)
    if not fields:
        return None
    paper = paper_values()["classes"].get(run.task, {})
    rows = [[k, _cell(v)] for k, v in fields.items() if k != MARGINS]
    rows += [[f"margin: {k}", fmt(v)] for k, v in (fields.get(MARGINS) or {}).items()]
    rows.append(["paper: class of this task", str(paper.get("class", "–"))])
    return Table("Universality class (summary.json)", ["field", "value"], rows)


# ------------------------------------------------------------------------- per sweep


def late_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``late`` rows (none if the run never got there)."""
    return [r for r in rows if r.get("phase") == LATE]


def _per_run(run: RunData, analysis: str, phase: str, get: Callable[[dict], Any]) -> float | None:
    return _mean(get(r) for r in run.rows(analysis) if r.get("phase") == phase)


def _last_probe(run: RunData, kind: str) -> float | None:
    """The last late probe's mean R² of ``kind`` (the paper's "late" probes)."""
    rows = late_rows(run.rows("probe"))
    if not rows:
        return None
    s = rows[-1]["scores"][rows[-1]["primary"]]
    return s.get(kind, {}).get("mean")


def seeds_table(collection: Collection) -> Table:
    """Per configuration, mean ± sd over its seeds, and the paper's 3-seed Dyck row."""
    p = paper_values()["dyck_seeds"]
    columns = [
        "configuration",
        "seeds",
        "grokked",
        "grok step",
        "final test acc",
        "v1 grad share, at",
        "v1 grad share, late",
        "v1 rotation late (°)",
        "Δacc edge, at",
        "Δacc edge, late",
        "matched Δacc, late",
        *(f"{label} Δacc, late" for _, label in SHRINK_CONTROLS),
        "linear R², late",
        "MLP R², late",
    ]
    out = []
    for group, runs in collection.groups().items():
        out.append(
            [
                _pipe(group),
                ", ".join(str(r.seed) if r.seed is not None else r.name for r in runs),
                f"{sum(r.grok_step is not None for r in runs)}/{len(runs)}",
                mean_sd_text([r.grok_step for r in runs], 0),
                mean_sd_text([r.last("test/acc") for r in runs]),
                mean_sd_text(
                    [
                        _per_run(r, "edge_directions", AT, lambda x: _direction(x, 1, "grad_frac"))
                        for r in runs
                    ]
                ),
                mean_sd_text(
                    [
                        _per_run(
                            r, "edge_directions", LATE, lambda x: _direction(x, 1, "grad_frac")
                        )
                        for r in runs
                    ]
                ),
                mean_sd_text(
                    [
                        _per_run(
                            r, "edge_directions", LATE, lambda x: _direction(x, 1, "rotation_deg")
                        )
                        for r in runs
                    ],
                    2,
                ),
                mean_sd_text(
                    [_per_run(r, "ablation", AT, lambda x: x["edge"]["dacc"]) for r in runs]
                ),
                mean_sd_text(
                    [_per_run(r, "ablation", LATE, lambda x: x["edge"]["dacc"]) for r in runs]
                ),
                mean_sd_text(
                    [
                        _per_run(r, "ablation", LATE, lambda x: x["acc_matched"]["random_mean"])
                        for r in runs
                    ],
                    4,
                ),
                *(
                    mean_sd_text(
                        [
                            _per_run(r, "ablation", LATE, lambda x, key=key: shrink_dacc(x, key))
                            for r in runs
                        ]
                    )
                    for key, _ in SHRINK_CONTROLS
                ),
                mean_sd_text([_last_probe(r, "linear") for r in runs]),
                mean_sd_text([_last_probe(r, "mlp") for r in runs]),
            ]
        )
    grok = paper_values()["grok_step"]["dyck"]
    out.append(
        [
            "**paper, Dyck ω = 1** (3 seeds)",
            ", ".join(str(s) for s in grok),
            "3/3",
            ", ".join(str(v) for v in grok.values()),
            "–",
            str(p["v1_grad_share_at"]),
            str(paper_values()["classes"]["dyck"]["late_grad_share"]),
            str(paper_values()["classes"]["dyck"]["rotation_deg"]),
            mean_sd(p["ablation_edge_dacc_at"]),
            mean_sd(p["ablation_edge_dacc_late"]),
            "not done",
            *("not done" for _ in SHRINK_CONTROLS),
            mean_sd(p["probe_linear_r2_late"]),
            mean_sd(p["probe_mlp_r2_late"]),
        ]
    )
    return Table(
        "Across seeds (mean ± sd over the seeds of each configuration)",
        columns,
        out,
        note=(
            (
                "Overrides shared by every configuration: `" + ",".join(collection.common()) + "`. "
                if collection.common()
                else ""
            )
            + "Phases are relative to each run's own grok step; 'late' values are means over "
            "the run's late windows/ablations, then mean ± sd over seeds; late probes: the "
            "run's last late probe. Paper: "
            + p["source"]
            + " and "
            + paper_values()["grok_step"]["source"]
            + "."
        ),
    )


def omega_text(omega: float | None) -> str:
    """ω as a table cell ("?" when the run did not record it)."""
    return "?" if omega is None else f"{omega:g}"


def _omega(run: RunData) -> float | None:
    omega = run.weight_decay
    return omega if omega is not None else run.last("wd/weight_decay")


def wd_table(collection: Collection) -> Table | None:
    """The weight-decay intervention (paper Table 1): final wd/* read-outs per ω.

    Runs that logged ``wd/*`` read-outs only (the fork of ``experiment=wd_intervention`` or
    an in-run removal); None when there are none. Values: the last read-out of each run,
    mean ± sd over the runs of one ω.
    """
    paper = paper_values()["wd_intervention"]
    by_omega: dict[float | None, list[RunData]] = {}
    for run in collection.ok:
        if run.metric_keys("wd"):
            by_omega.setdefault(_omega(run), []).append(run)
    if not by_omega:
        return None
    columns = ["ω", "runs", "steps"]
    names = {"test_acc": "test acc", "linear_r2": "linear R²", "attn_entropy": "attn entropy"}
    names["theta_norm"] = "‖θ‖"
    for key in paper["columns"]:
        columns += [names[key], f"paper {names[key]}"]
    out = []
    for omega in sorted(by_omega, key=lambda w: (w is None, w or 0.0)):
        runs = by_omega[omega]
        ref = paper["rows"].get(omega, {}) if omega is not None else {}
        row = [omega_text(omega), str(len(runs))]
        last_steps = [r.series("wd/theta_norm")[0] for r in runs]
        row.append(", ".join(str(s[-1]) for s in last_steps if s) or "–")
        for key in paper["columns"]:
            row += [mean_sd_text([r.last(f"wd/{key}") for r in runs]), fmt(ref.get(key))]
        out.append(row)
    return Table(
        "Weight-decay intervention (paper Table 1): last read-out per ω",
        columns,
        out,
        note=(
            "'steps': the step of each run's last read-out (the paper: 3,000 steps after a "
            f"fork at step 1,000). Paper: {paper['source']}."
        ),
    )


def class_table(collection: Collection) -> Table:
    """Per run: the class fields of its summary, beside the paper's class of its task."""
    paper = paper_values()["classes"]
    keys: list[str] = []
    for run in collection.ok:
        keys += [k for k in class_fields(run.summary) if k not in keys and k != MARGINS]
    columns = ["run", "task", "ω", "seed", *keys]
    columns += ["late v1 grad share", "late v1 rotation (°)"]
    columns += ["paper class", "paper grad share", "paper rotation (°)", "paper functional R²"]
    out = []
    for run in collection.ok:
        fields = class_fields(run.summary)
        ref = paper.get(run.task, {})
        omega = run.weight_decay
        out.append(
            [_pipe(run.name), run.task, omega_text(omega), str(run.seed)]
            + [_cell(fields.get(k)) for k in keys]
            + [fmt(_per_run(run, "edge_directions", LATE, lambda x: _direction(x, 1, "grad_frac")))]
            + [
                fmt(
                    _per_run(
                        run, "edge_directions", LATE, lambda x: _direction(x, 1, "rotation_deg")
                    ),
                    2,
                )
            ]
            + [
                str(ref.get(c, "–"))
                for c in ("class", "late_grad_share", "rotation_deg", "functional_r2")
            ]
        )
    note = f"Paper: {paper['source']}."
    if not keys:
        note += " No run's summary.json holds class fields (the class analysis did not run)."
    return Table("Universality classes", columns, out, note=note)


CLASS_CRITERIA = ("late_grad_share", "late_rotation_deg", "functional_r2", "late_balance")
"""The class measurements summarised per task (``class_<name>`` in summary.json)."""
PAPER_CRITERIA = {"late_grad_share": "late_grad_share", "late_rotation_deg": "rotation_deg"}
PAPER_CRITERIA |= {"functional_r2": "functional_r2"}


def _counts(names: Iterable[Any]) -> str:
    """``"mixed 2, functional 1"``: each name and how often, most frequent first."""
    return ", ".join(f"{k} {v}" for k, v in Counter(map(str, names)).most_common()) or "–"


def class_task_table(collection: Collection) -> Table | None:
    """Per task and ω: the observed and predicted classes of its runs, mean ± sd of each
    criterion over them, and the paper's class and values beside; None without classes."""
    groups: dict[tuple[str, Any], list[RunData]] = {}
    for run in collection.ok:
        if class_fields(run.summary).get("class_observed") is not None:
            groups.setdefault((run.task, run.weight_decay), []).append(run)
    if not groups:
        return None
    paper = paper_values()["classes"]
    columns = ["task", "ω", "runs", "grokked", "late windows", "observed", "predicted"]
    columns += [*CLASS_CRITERIA, "paper class", *(f"paper {c}" for c in PAPER_CRITERIA)]
    rows = []
    for (task, omega), runs in sorted(groups.items(), key=lambda g: (g[0][0], g[0][1] or 0)):
        fields = [class_fields(r.summary) for r in runs]
        late = [f.get("class_late_windows") for f in fields]
        ref = paper.get(task, {})
        rows.append(
            [task, omega_text(omega), str(len(runs))]
            + [str(sum(r.grok_step is not None for r in runs))]
            + [f"{min(late)}–{max(late)}" if all(x is not None for x in late) else "–"]
            + [_counts(f.get("class_observed") for f in fields)]
            + [_counts(f.get("class_predicted") for f in fields)]
            + [mean_sd_text(f.get(f"class_{c}") for f in fields) for c in CLASS_CRITERIA]
            + [str(ref.get("class", "–"))]
            + [str(ref.get(c, "–")) for c in PAPER_CRITERIA.values()]
        )
    note = (
        "mean ± sd over the task's runs of that ω (late means of the last call; balance: the "
        f"late median of Term 3 / |Term 2|). Paper: {paper['source']}."
    )
    return Table("Universality classes per task", columns, rows, note=note)


def class_margin_table(collection: Collection) -> Table | None:
    """Per run: each criterion's margin to its threshold (positive: the criterion holds),
    so how far a threshold may move before the run's class can change; None without."""
    runs = [r for r in collection.ok if class_fields(r.summary).get("class_margins")]
    if not runs:
        return None
    names = list(class_fields(runs[0].summary)["class_margins"])
    columns = ["run", "task", "ω", "seed", "observed", "predicted", "late windows", *names]
    columns += ["decisive (observed)", "decisive (predicted)"]
    rows = []
    for run in runs:
        f = class_fields(run.summary)
        margins = {k: math.nan if v is None else v for k, v in f["class_margins"].items()}
        decisive = [decisive_thresholds(margins, r) for r in (OBSERVED_RULES, PREDICTED_RULES)]
        omega = run.weight_decay
        rows.append(
            [_pipe(run.name), run.task, omega_text(omega), str(run.seed)]
            + [str(f.get("class_observed")), str(f.get("class_predicted"))]
            + [str(f.get("class_late_windows"))]
            + [fmt(margins.get(k)) for k in names]
            + [", ".join(f"{n} ({fmt(m)})" for n, m in d) or "–" for d in decisive]
        )
    note = (
        "margin = measurement − threshold for a ≥ criterion, threshold − measurement for a ≤ "
        "one (rotation in degrees, balances as ratios); a threshold moved by less than |margin| "
        "leaves that criterion's outcome unchanged. Decisive: the thresholds each of which changes "
        "the class on its own, with their margins (– : no single threshold can). Thresholds: "
        "conf/callbacks/classes.yaml."
    )
    return Table("Class thresholds: each run's margins", columns, rows, note=note)


def failed_table(collection: Collection) -> Table | None:
    """The jobs that failed or left no summary; None if every job finished."""
    if not collection.failed:
        return None
    rows = [
        [_pipe(r.name), _pipe(",".join(r.overrides) or "–"), _pipe(r.failure)]
        for r in collection.failed
    ]
    return Table("Failed jobs (not in any figure or table)", ["job", "overrides", "why"], rows)
