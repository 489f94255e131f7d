"""A run or a sweep directory -> PNG figures, markdown tables and W&B entries.

    python -m grokedge.report outputs/causal_dyck_s42          # one run
    python -m grokedge.report multirun/dyck/2026-11-28/18-00-00  # a sweep (Hydra multirun)
    python -m grokedge.report DIR --no-wandb                   # files only

Writes ``DIR/report/report.md`` and its PNG figures. For a run: the edge lifecycle, the
ablation against random and norm-matched controls by phase, the ε-curves, the curvature
per direction, the probes, the weight-decay read-outs and the gap-flow terms, with their
tables. For a sweep: the same per job (``report/runs/<job>/``), and across jobs mean ± sd
over seeds per configuration, the weight-decay-intervention table (the paper's Table 1)
and the universality-class table beside the paper's values (``conf/report/paper.yaml``).
When any run logged ``indicator/`` series, an "Indicators" section judges each indicator
(and the edge's own series) against the grok step (:mod:`grokedge.reporting.indicator_rule`).
Beside it, ``DIR/report/claims.md``: one row per claim of the paper that grokedge can
test, with the paper's, grokedge's and the control's numbers, a verdict and the figure
that supports it (the table ``conf/report/claims.yaml``, evaluated by
:mod:`grokedge.reporting.claims`). Failed jobs (``summary.json`` with ``"status":
"failed"``, or none at all) are listed and left out. Reads only the
directories' files (``report.py`` never imports the training code); W&B: see
:mod:`grokedge.reporting.wandb_log`.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grokedge.reporting.causal_figures import (
    ablation_figure,
    curvature_figure,
    eps_figure,
    probes_figure,
)
from grokedge.reporting.causal_tables import (
    ablation_table,
    path_points_table,
    perturbation_table,
    probe_table,
)
from grokedge.reporting.claims import CLAIMS_MD, write_claims
from grokedge.reporting.class_tables import (
    class_margin_table,
    class_table,
    class_task_table,
    run_class_table,
)
from grokedge.reporting.discover import Collection, RunData, discover
from grokedge.reporting.edge_figures import lifecycle_figure
from grokedge.reporting.event_figures import flip_scatter_figure, grok_aligned_figure
from grokedge.reporting.event_runs import (
    collection_events,
    grok_sensitivity,
    run_events,
    timing_fits,
)
from grokedge.reporting.event_tables import (
    control_table,
    event_timing_table,
    sensitivity_table,
    timing_fit_table,
)
from grokedge.reporting.indicator_figures import indicator_figure
from grokedge.reporting.indicator_runs import bench, has_indicators
from grokedge.reporting.indicator_tables import indicator_table, ranking_paragraph
from grokedge.reporting.readout_figures import gapflow_figure, wd_figure
from grokedge.reporting.run_measures import class_fields
from grokedge.reporting.run_tables import (
    ablation_phase_table,
    gapflow_table,
    lifecycle_phase_table,
    wd_removal_table,
)
from grokedge.reporting.sweep_figures import sweep_bars_figure, sweep_lifecycle_figure
from grokedge.reporting.sweep_tables import failed_table, seeds_table, wd_table
from grokedge.reporting.table_format import Table, fmt
from grokedge.reporting.wandb_log import log_report, training_runs

REPORT_DIR = "report"
REPORT_MD = "report.md"


@dataclass
class Section:
    """One part of the report: markdown, the figures it shows and the tables it holds."""

    markdown: list[str] = field(default_factory=list)
    figures: dict[str, Path] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)

    def figure(self, key: str, path: Path | None, caption: str, base: Path, missing: str) -> None:
        if path is None:
            self.markdown.append(f"*{caption}: {missing}*\n")
            return
        self.figures[key] = path
        self.markdown.append(f"![{caption}]({path.relative_to(base).as_posix()})\n")

    def table(self, table: Table | None, missing: str | None = None) -> None:
        if table is None or not table.rows:
            if missing:
                self.markdown.append(f"*{missing}*\n")
            return
        self.tables.append(table)
        self.markdown.append(table.markdown() + "\n")


def run_section(run: RunData, out: Path, base: Path, heading: str = "##") -> Section:
    """Figures into ``out`` and the markdown of one run (links relative to ``base``)."""
    s = Section()
    summ = run.summary or {}
    acc = run.last("test/acc")
    s.markdown.append(
        f"{heading} Run `{run.name}`\n\n"
        f"Directory `{run.path}`; task {run.task}; ω {run.weight_decay}; seed {run.seed}; "
        f"steps {summ.get('steps')}; grok step **{run.grok_step}**; final test accuracy "
        f"{fmt(acc)}; wall {summ.get('wall_s')} s.\n"
    )
    sub = heading + "#"
    s.markdown.append(f"{sub} Lifecycle of the edge\n")
    s.figure(
        "lifecycle",
        lifecycle_figure(run, out / "lifecycle.png"),
        "σ_j, gradient/WD share, alignment and rotation of v_1..v_4",
        base,
        "no gram_spectrum / edge_directions rows (callbacks without the edge)",
    )
    s.table(lifecycle_phase_table(run))
    events = run_events(run)
    if events is not None:
        s.markdown.append(f"{sub} Events of the edge and the window\n")
        s.table(event_timing_table([events]))
    s.markdown.append(f"{sub} Ablation against random controls\n")
    s.figure(
        "ablation",
        ablation_figure(run, out / "ablation.png"),
        "ablation of the edge against random and norm-matched controls",
        base,
        "no ablation rows",
    )
    s.table(ablation_phase_table(run))
    s.table(ablation_table(run.analyses))
    s.markdown.append(f"{sub} ε-curves and curvature\n")
    s.figure(
        "eps_curves",
        eps_figure(run, out / "eps_curves.png"),
        "ε-curves",
        base,
        "no perturbation rows",
    )
    s.figure(
        "curvature",
        curvature_figure([run], out / "curvature.png"),
        "curvature per direction",
        base,
        "no perturbation rows",
    )
    s.table(perturbation_table(run.analyses))
    s.table(path_points_table(run.analyses))
    s.markdown.append(f"{sub} Probes\n")
    s.figure(
        "probes", probes_figure(run, out / "probes.png"), "probes by step", base, "no probe rows"
    )
    s.table(probe_table(run.analyses))
    s.markdown.append(f"{sub} Weight-decay removal\n")
    s.figure(
        "wd_removal",
        wd_figure([run], out / "wd_removal.png"),
        "weight-decay read-outs",
        base,
        "no wd/* metrics (the weight-decay removal was not triggered in this run)",
    )
    s.table(wd_removal_table(run))
    s.markdown.append(f"{sub} Gap flow\n")
    s.figure(
        "gapflow",
        gapflow_figure(run, out / "gapflow.png"),
        "gap-flow terms",
        base,
        "no gap-flow terms in this run (no gapflow/term* metrics: the GapFlowCallback was "
        "not in its callbacks, or analysed no window)",
    )
    s.table(gapflow_table(run))
    s.table(run_class_table(run), missing="No class fields in summary.json.")
    return s


def _control_pair(collection: Collection) -> tuple[RunData, RunData] | None:
    """A grokked run with ω > 0 and an ω = 0 run of the same task and seed, if any."""
    for run in collection.ok:
        if run.grok_step is None or not run.weight_decay:
            continue
        for other in collection.ok:
            if other.weight_decay == 0 and other.task == run.task and other.seed == run.seed:
                return run, other
    return None


def _phase_mean(run: RunData, analysis: str, phase: str, get: Any) -> float | None:
    vals = [get(r) for r in run.rows(analysis) if r["phase"] == phase]
    vals = [v for v in vals if isinstance(v, int | float) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def sweep_section(collection: Collection, out: Path, base: Path) -> Section:
    """The across-runs part of a sweep's report."""
    s = Section()
    groups = collection.groups()
    s.markdown.append("## Across runs\n")
    s.table(seeds_table(collection))
    events_section(collection, out, base, s)
    s.figure(
        "sweep_lifecycle",
        sweep_lifecycle_figure(groups, out / "sweep_lifecycle.png"),
        "v1 gradient share and test accuracy across seeds",
        base,
        "no edge rows or test accuracy",
    )
    s.figure(
        "sweep_ablation",
        sweep_bars_figure(
            groups,
            out / "sweep_ablation.png",
            "Edge ablation by phase, mean ± sd over seeds",
            "Δ token accuracy (edge removed)",
            lambda r, p: _phase_mean(r, "ablation", p, lambda x: x["edge"]["dacc"]),
        ),
        "edge ablation by phase across seeds",
        base,
        "no ablation rows",
    )
    s.figure(
        "sweep_probes",
        sweep_bars_figure(
            groups,
            out / "sweep_probes.png",
            "Linear probe R² by phase, mean ± sd over seeds",
            "linear probe R²",
            lambda r, p: _phase_mean(
                r, "probe", p, lambda x: x["scores"][x["primary"]].get("linear", {}).get("mean")
            ),
        ),
        "linear probe by phase across seeds",
        base,
        "no probe rows",
    )
    pair = _control_pair(collection)
    s.figure(
        "sweep_curvature",
        None
        if pair is None
        else curvature_figure(
            list(pair),
            out / "sweep_curvature.png",
            [f"{r.name} (ω={r.weight_decay:g})" for r in pair],
        ),
        "curvature, grokked against ω = 0",
        base,
        "no grokked run with an ω = 0 run of the same task and seed (both with perturbation rows)",
    )
    wd_runs = [r for r in collection.ok if r.metric_keys("wd")]
    s.figure(
        "sweep_wd",
        wd_figure(
            wd_runs, out / "sweep_wd.png", [f"ω={r.weight_decay}, {r.name}" for r in wd_runs]
        ),
        "weight-decay read-outs per ω",
        base,
        "no run with wd/* read-outs",
    )
    s.table(wd_table(collection), missing="No run logged wd/* read-outs: no Table 1.")
    s.table(class_table(collection))
    s.table(class_task_table(collection), missing="No run with class fields.")
    s.table(class_margin_table(collection), missing="No run with class margins.")
    s.figure(
        "sweep_gapflow_balance",
        sweep_bars_figure(
            groups,
            out / "sweep_gapflow_balance.png",
            "Gap-flow balance Term 3 / |Term 2| by phase, mean ± sd over seeds",
            "Term 3 / |Term 2|",
            lambda r, p: _phase_mean(r, "gap_flow", p, lambda x: x.get("balance")),
        ),
        "gap-flow balance across seeds",
        base,
        "no gap_flow rows with a balance in any run",
    )
    indicators_section(collection, out, base, s)  # its own "##" heading: last
    return s


def events_section(collection: Collection, out: Path, base: Path, s: Section) -> None:
    """The event timing of a sweep: per-run table, fits with verdicts, the two figures."""
    events = collection_events(collection)
    if not events:
        return
    fits = timing_fits(events)
    s.markdown.append(
        "### Events of the edge: grokking or the window?\n\n"
        "Per training trajectory, whether each event's step moves with the Gram interval N "
        "(window-driven) or stays put; across trajectories, the steps that stay put fitted "
        "on the grok step (docs/edge_definitions.md).\n"
    )
    s.table(timing_fit_table(fits))
    s.table(sensitivity_table(grok_sensitivity(events)))
    s.figure(
        "flip_vs_grok",
        flip_scatter_figure(events, fits, out / "flip_vs_grok.png"),
        "flip step against grok step, per edge definition",
        base,
        "no grokked run with a flip",
    )
    s.figure(
        "grok_aligned",
        grok_aligned_figure(events, out / "grok_aligned.png"),
        "v1 gradient share on the step and the grok-aligned axes",
        base,
        "no per-definition edge rows",
    )
    s.table(event_timing_table(events))
    s.table(control_table(events))


def indicators_section(collection: Collection, out: Path, base: Path, s: Section) -> None:
    """The indicator bench (when any run logged ``indicator/`` series): per task, every
    indicator's change point against the grok step, its verdict, a ranking and the
    grok-aligned figure ``indicators_<task>.png``."""
    if not has_indicators(collection):
        return
    s.markdown.append(
        "## Indicators\n\n"
        "Which signal announces grokking? Each indicator's change point near the grok step, "
        "fitted on the grok step over trajectories, against a permutation null and the ω = 0 "
        "runs (reporting/indicator_rule.py).\n"
    )
    for task, (runs, verdicts) in bench(collection).items():
        s.table(indicator_table(task, verdicts))
        s.markdown.append(ranking_paragraph(task, verdicts) + "\n")
        s.figure(
            f"indicators_{task}",
            indicator_figure(task, runs, verdicts, out / f"indicators_{task}.png"),
            f"{task}: indicators aligned at the grok step",
            base,
            "no grokked run to align on",
        )


def _wandb_summary(run: RunData) -> dict[str, Any]:
    """Summary values for the report run: grok step and the class fields."""
    out: dict[str, Any] = {"grok/step": run.grok_step}
    for key, value in class_fields(run.summary).items():
        out[key if "/" in key else key.replace("class_", "class/", 1)] = value
    return out


def _log_run_to_wandb(run: RunData, section: Section) -> str:
    offline = training_runs(run.path)
    if not offline:
        return ""
    info = offline[-1]
    where = log_report(
        run.path,
        project=info.project,
        group=info.group,
        name=f"report:{info.name or run.name}",
        figures=section.figures,
        tables=section.tables,
        summary=_wandb_summary(run),
        config={"report_of": info.run_id},
    )
    if where is None:  # WANDB_MODE=disabled
        return ""
    return (
        f"- `{run.name}`: W&B run `{where}` (group `{info.group}`), of training run `{info.run_id}`"
    )


def build_report(root: str | Path, use_wandb: bool = True) -> Path:
    """Write ``root/report/report.md`` and its figures; returns the report's path."""
    collection = discover(root)
    root = collection.root
    out = root / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# grokedge report: `{root}`\n"]
    kind = "sweep" if collection.is_sweep else "run"
    md.append(
        f"A {kind} of {len(collection.runs)} job(s): {len(collection.ok)} finished, "
        f"{len(collection.failed)} failed. Phases (pre/at/post/late) are relative to each "
        "run's own grok step; figures mark it with a dashed line.\n"
    )
    md.append(f"The paper's claims, each with a verdict: [{CLAIMS_MD}]({CLAIMS_MD}).\n")
    failed = failed_table(collection)
    if failed is not None:
        md.append(failed.markdown() + "\n")
    wandb_lines: list[str] = []
    if collection.is_sweep:
        across = sweep_section(collection, out, out)
        md += across.markdown
        for run in collection.ok:
            section = run_section(run, out / "runs" / run.name, out)
            md += section.markdown
            if use_wandb:
                wandb_lines.append(_log_run_to_wandb(run, section))
        if use_wandb and collection.ok:
            offline = [o for r in collection.ok for o in training_runs(r.path)]
            if offline:
                where = log_report(
                    out,
                    project=offline[0].project,
                    group=offline[0].group.split("/")[0],
                    name=f"report:{root.name}",
                    figures=across.figures,
                    tables=across.tables,
                    summary={},
                )
                if where is not None:
                    wandb_lines.append(f"- the sweep: W&B run `{where}`")
    elif collection.ok:
        section = run_section(collection.ok[0], out, out)
        indicators_section(collection, out, out, section)
        md += section.markdown
        if use_wandb:
            wandb_lines.append(_log_run_to_wandb(collection.ok[0], section))
    wandb_lines = [line for line in wandb_lines if line]
    if wandb_lines:
        md.append(
            "## W&B\n\nThe figures and tables were logged as separate report runs "
            "(job type `report`) in each training run's group; `wandb sync` them:\n"
        )
        md.append("\n".join(wandb_lines) + "\n")
    write_claims(collection, out)
    path = out / REPORT_MD
    path.write_text("\n".join(md), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="a run directory or a sweep (multirun) directory")
    parser.add_argument(
        "--no-wandb", action="store_true", help="write files only, log nothing to W&B"
    )
    args = parser.parse_args(argv)
    try:
        path = build_report(args.dir, use_wandb=not args.no_wandb)
    except FileNotFoundError as e:
        print(f"grokedge.report: {e}", file=sys.stderr)
        return 2
    print(f"grokedge.report: wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
