"""The universality-class tables: one run's class fields, every run's, per task and ω,
and each run's margins to the class thresholds, beside the paper's classes
(``conf/report/paper.yaml``, ``classes``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from typing import Any

from grokedge.experiments.universality import OBSERVED_RULES, PREDICTED_RULES, decisive_thresholds
from grokedge.reporting.discover import Collection, RunData
from grokedge.reporting.paper import paper_values
from grokedge.reporting.run_measures import (
    LATE,
    MARGINS,
    class_fields,
    direction_field,
    phase_mean,
)
from grokedge.reporting.table_format import Table, escape_pipes, fmt, mean_sd_text, omega_text


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return fmt(value)
    if isinstance(value, dict | list):
        return escape_pipes(str(value))
    return "–" if value is None else escape_pipes(str(value))


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
            [escape_pipes(run.name), run.task, omega_text(omega), str(run.seed)]
            + [_cell(fields.get(k)) for k in keys]
            + [
                fmt(
                    phase_mean(
                        run, "edge_directions", LATE, lambda x: direction_field(x, 1, "grad_frac")
                    )
                )
            ]
            + [
                fmt(
                    phase_mean(
                        run,
                        "edge_directions",
                        LATE,
                        lambda x: direction_field(x, 1, "rotation_deg"),
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
            [escape_pipes(run.name), run.task, omega_text(omega), str(run.seed)]
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
