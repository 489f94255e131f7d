"""The across-runs tables of a sweep: mean ± sd over seeds per configuration, the
weight-decay intervention (the paper's Table 1) and the failed jobs, each beside the
paper's values (``conf/report/paper.yaml``).
"""

from __future__ import annotations

from grokedge.reporting.discover import Collection, RunData
from grokedge.reporting.paper import mean_sd, paper_values
from grokedge.reporting.run_measures import (
    AT,
    LATE,
    SHRINK_CONTROLS,
    direction_field,
    last_late_probe,
    phase_mean,
    run_omega,
    shrink_dacc,
)
from grokedge.reporting.table_format import (
    Table,
    escape_pipes,
    fmt,
    mean_sd_text,
    omega_text,
)


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
                escape_pipes(group),
                ", ".join(str(r.seed) if r.seed is not None else r.name for r in runs),
                f"{sum(r.grok_step is not None for r in runs)}/{len(runs)}",
                mean_sd_text([r.grok_step for r in runs], 0),
                mean_sd_text([r.last("test/acc") for r in runs]),
                mean_sd_text(
                    [
                        phase_mean(
                            r, "edge_directions", AT, lambda x: direction_field(x, 1, "grad_frac")
                        )
                        for r in runs
                    ]
                ),
                mean_sd_text(
                    [
                        phase_mean(
                            r, "edge_directions", LATE, lambda x: direction_field(x, 1, "grad_frac")
                        )
                        for r in runs
                    ]
                ),
                mean_sd_text(
                    [
                        phase_mean(
                            r,
                            "edge_directions",
                            LATE,
                            lambda x: direction_field(x, 1, "rotation_deg"),
                        )
                        for r in runs
                    ],
                    2,
                ),
                mean_sd_text(
                    [phase_mean(r, "ablation", AT, lambda x: x["edge"]["dacc"]) for r in runs]
                ),
                mean_sd_text(
                    [phase_mean(r, "ablation", LATE, lambda x: x["edge"]["dacc"]) for r in runs]
                ),
                mean_sd_text(
                    [
                        phase_mean(r, "ablation", LATE, lambda x: x["acc_matched"]["random_mean"])
                        for r in runs
                    ],
                    4,
                ),
                *(
                    mean_sd_text(
                        [
                            phase_mean(r, "ablation", LATE, lambda x, key=key: shrink_dacc(x, key))
                            for r in runs
                        ]
                    )
                    for key, _ in SHRINK_CONTROLS
                ),
                mean_sd_text([last_late_probe(r, "linear") for r in runs]),
                mean_sd_text([last_late_probe(r, "mlp") for r in runs]),
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
            by_omega.setdefault(run_omega(run), []).append(run)
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


def failed_table(collection: Collection) -> Table | None:
    """The jobs that failed or left no summary; None if every job finished."""
    if not collection.failed:
        return None
    rows = [
        [escape_pipes(r.name), escape_pipes(",".join(r.overrides) or "–"), escape_pipes(r.failure)]
        for r in collection.failed
    ]
    return Table("Failed jobs (not in any figure or table)", ["job", "overrides", "why"], rows)
