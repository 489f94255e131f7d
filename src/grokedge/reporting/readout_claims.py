"""Claims 9-11, read from the runs' read-outs rather than an edge's numbers: the late
probes of depth (9), the weight-decay intervention's table (10) and the universality
classes (11, from the analysed edge's class fields).

Rules ``probe_tolerance``, ``wd_trend`` and ``class_match`` of ``conf/report/claims.yaml``;
each takes a :class:`Collection` and the claim's :class:`ClaimSpec` and returns its
:class:`Claim`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from grokedge.reporting.claim_rows import (
    HOLDS,
    INCONCLUSIVE,
    NOT_REPRODUCED,
    NOT_TESTED,
    Claim,
    controls,
    fixed_definition,
    mean_over,
    not_tested,
    one_definition,
    treated,
    under,
)
from grokedge.reporting.claim_table import ClaimSpec, paper_entry
from grokedge.reporting.discover import Collection, RunData
from grokedge.reporting.edge_series import analysed_definition
from grokedge.reporting.paper import paper_values
from grokedge.reporting.run_measures import class_fields, last_late_probe, run_omega
from grokedge.reporting.table_format import fmt

WD_DERIVED_FIELDS = frozenset({"lo_omega", "hi_omega", "lo", "hi"})
"""The fields of the ``wd_trend`` claim's paper template derived from ``paper.yaml``: the
smallest and largest ω of the paper's Table 1 and their rows."""


def _paper_probe(path: Sequence[str]) -> float:
    """The paper's probe R² at ``path`` of ``paper.yaml`` (the mean of a {mean, sd})."""
    entry = paper_entry([str(k) for k in path])
    return float(entry["mean"] if isinstance(entry, dict) else entry)


def _final_probe(run: RunData, kind: str) -> float | None:
    """The last probe's mean R² of ``kind`` in any phase (an ω = 0 run may have no late)."""
    rows = run.rows("probe")
    if not rows:
        return None
    return rows[-1]["scores"][rows[-1]["primary"]].get(kind, {}).get("mean")


def probe_claim(collection: Collection, spec: ClaimSpec) -> Claim:
    """Rule ``probe_tolerance`` (claim 9): each measured late probe R² (the run's last late
    probe, mean over treated runs) within ``probe_r2_tolerance`` of the paper's.

    ``measure``: ``kinds``, {probe kind: the path of its paper value in ``paper.yaml``}.
    """
    title, paper, definition = spec.title, spec.paper_text(), fixed_definition(spec.edge)
    kinds = {str(k): v for k, v in spec.measure["kinds"].items()}
    runs = [r for r in treated(collection) if r.rows("probe")]
    if not runs:
        why = "no probe rows of a grokked run: run with callbacks=full (in Python: ProbeCallback)"
        return not_tested(title, paper, why, definition=definition)
    support = spec.support_files(collection, runs[0])
    ours = {k: mean_over(runs, lambda r, k=k: last_late_probe(r, k)) for k in kinds}
    measured = {k: v for k, v in ours.items() if v is not None}
    if not measured:
        why = "no late probe row (run past grok + phase_post)"
        return not_tested(title, paper, why, support, definition)
    text = " / ".join(fmt(ours[k]) for k in kinds) + f" ({len(runs)} runs)"
    ctrl = {k: mean_over(controls(collection), lambda r, k=k: _final_probe(r, k)) for k in kinds}
    control = "no ω = 0 run with probes"
    if any(v is not None for v in ctrl.values()):
        control = "ω = 0, last probe: " + " / ".join(fmt(ctrl[k]) for k in kinds)
    tol = float(spec.threshold("probe_r2_tolerance"))
    off = [k for k, v in measured.items() if abs(v - _paper_probe(kinds[k])) > tol]
    unmeasured = [k for k in kinds if k not in measured]
    why = f"|R² − paper's| {'>' if off else '≤'} {tol} ({', '.join(off or measured)})"
    if unmeasured:
        why += f"; not measured: {', '.join(unmeasured)}"
    verdict = NOT_REPRODUCED if off else HOLDS
    return Claim(title, paper, text, control, verdict, why, support, definition)


def wd_by_omega(
    collection: Collection, metrics: Sequence[str] = ("linear_r2", "theta_norm")
) -> dict[float, dict[str, float | None]]:
    """Per known ω, the mean last ``wd/<metric>`` of the runs with ``wd/*`` read-outs (the
    runs of :func:`.sweep_tables.wd_table`), for each of ``metrics``."""
    groups: dict[float, list[RunData]] = {}
    for run in collection.ok:
        omega = run_omega(run)
        if run.metric_keys("wd") and omega is not None:
            groups.setdefault(omega, []).append(run)
    return {
        w: {k: mean_over(runs, lambda r, k=k: r.last(f"wd/{k}")) for k in metrics}
        for w, runs in sorted(groups.items())
    }


def wd_verdict(
    table: dict[float, dict[str, float | None]],
    drop: float,
    metrics: Sequence[str] = ("linear_r2", "theta_norm"),
) -> tuple[str, str]:
    """``holds`` when, from the smallest to the largest ω, linear R² and ‖θ‖ (``metrics``)
    each fall by at least ``drop`` (``wd_min_relative_drop``, relative); ``inconclusive``
    with fewer than two ω."""
    if len(table) < 2:
        return INCONCLUSIVE, "one ω only (the trend needs ≥ 2: experiment=wd_intervention)"
    lo, hi = table[min(table)], table[max(table)]
    falls = []
    for key in metrics:
        a, b = lo[key], hi[key]
        if a is None or b is None or a == 0:
            return NOT_TESTED, f"no wd/{key} read-out at ω = {min(table):g} or {max(table):g}"
        falls.append((a - b) / abs(a))
    ok = all(f >= drop for f in falls)
    sign = "≥" if ok else "not all ≥"
    why = f"relative falls of R², ‖θ‖ {fmt(falls[0], 2)}, {fmt(falls[1], 2)} ({sign} {drop})"
    return (HOLDS if ok else NOT_REPRODUCED), why


def wd_claim(collection: Collection, spec: ClaimSpec) -> Claim:
    """Rule ``wd_trend`` (claim 10): the weight-decay intervention's direction (paper
    Table 1). Its paper template reads :data:`WD_DERIVED_FIELDS`.

    ``measure``: ``metrics`` (the ``wd/*`` read-outs: linear R², ‖θ‖) and ``paper_table``
    (the block of ``paper.yaml`` with the paper's rows per ω).
    """
    title, definition = spec.title, fixed_definition(spec.edge)
    metrics = [str(k) for k in spec.measure["metrics"]]
    rows = paper_values()[str(spec.measure["paper_table"])]["rows"]
    paper = spec.paper_text(
        lo_omega=min(rows), hi_omega=max(rows), lo=rows[min(rows)], hi=rows[max(rows)]
    )
    table = wd_by_omega(collection, metrics)
    if not table:
        why = "no wd/* read-outs: run experiment=wd_intervention (or callbacks.wd_removal)"
        return not_tested(title, paper, why, definition=definition)
    verdict, why = wd_verdict(table, float(spec.threshold("wd_min_relative_drop")), metrics)
    text = "; ".join(
        f"ω {w:g}: R² {fmt(v['linear_r2'])}, ‖θ‖ {fmt(v['theta_norm'], 1)}"
        for w, v in table.items()
    )
    control = "the ω = 0 row" if 0.0 in table else "no ω = 0 read-out"
    support = spec.support_files(collection, None)
    return Claim(title, paper, text, control, verdict, why, support, definition)


def observed_classes(runs: list[RunData], field: str = "class_observed") -> dict[str, Counter[str]]:
    """Per task, how often each observed class (the summary's ``field``) occurs."""
    out: dict[str, Counter[str]] = {}
    for run in runs:
        name = class_fields(run.summary).get(field)
        if name is not None:
            out.setdefault(run.task, Counter())[str(name)] += 1
    return out


def judged_runs(runs: list[RunData], least: int) -> list[RunData]:
    """The runs whose class rests on at least ``least`` (``class_min_late_windows``) late
    windows."""
    return [
        r
        for r in runs
        if class_fields(r.summary).get("class_late_basis") == "phase"
        and (class_fields(r.summary).get("class_late_windows") or 0) >= least
    ]


def class_verdict(
    observed: dict[str, Counter[str]], paper: dict[str, str], enough: int, least: int
) -> tuple[str, str]:
    """Over the judged runs (:func:`judged_runs`, ``least`` late windows): ``not
    reproduced`` when a task with at least ``enough`` (``class_min_seeds``) of them has a
    most frequent class other than the ``paper``'s ({task: class}); ``holds`` when every
    task of the paper's table has them and matches; else inconclusive (saying which tasks
    have too few)."""
    judged = {t: c for t, c in observed.items() if sum(c.values()) >= enough}
    wrong = [
        f"{t}: {c.most_common(1)[0][0]} ≠ {paper[t]}"
        for t, c in judged.items()
        if t in paper and c.most_common(1)[0][0] != paper[t]
    ]
    if wrong:
        return NOT_REPRODUCED, "; ".join(wrong)
    absent = [t for t in paper if t not in judged]
    if absent:
        return INCONCLUSIVE, (
            f"{', '.join(absent)}: fewer than {enough} grokked runs with >= "
            f"{least} late windows (needs all three tasks)"
        )
    return HOLDS, "every task's class is the paper's (rules: conf/callbacks/classes.yaml)"


def _classes_text(observed: dict[str, Counter[str]]) -> str:
    """``task: class (count), ...`` per task, the most frequent class first."""
    return "; ".join(
        f"{t}: " + ", ".join(f"{n} ({k})" for n, k in c.most_common()) for t, c in observed.items()
    )


def class_claim(collection: Collection, spec: ClaimSpec) -> Claim:
    """Rule ``class_match`` (claim 11): each task's observed class (of the grokked runs,
    read from the analysed edge: one definition, :func:`.claim_rows.one_definition`)
    against the paper's Table 2.

    ``measure``: ``summary_field`` (the observed class in ``summary.json``) and
    ``paper_table`` (the block of ``paper.yaml`` with each task's ``class``).
    """
    title, paper = spec.title, spec.paper_text()
    field = str(spec.measure["summary_field"])
    ref = paper_values()[str(spec.measure["paper_table"])]
    paper_classes = {str(t): str(v["class"]) for t, v in ref.items() if t != "source"}
    least = int(spec.threshold("class_min_late_windows"))
    enough = int(spec.threshold("class_min_seeds"))
    classified = [r for r in treated(collection) if class_fields(r.summary).get(field)]
    definition, runs, left_out = one_definition(classified)
    if not runs:
        why = (
            "no class fields in a grokked run's summary.json: run with callbacks=full "
            "(in Python: ClassCallback)"
        )
        return not_tested(title, paper, why, definition=one_definition(collection.ok)[0])
    observed = observed_classes(runs, field)
    judged = observed_classes(judged_runs(runs, least), field)
    verdict, why = class_verdict(judged, paper_classes, enough, least)
    ctrl_runs = [c for c in controls(collection) if analysed_definition(c) == definition]
    ctrl = observed_classes(ctrl_runs, field)
    control = f"ω = 0: {_classes_text(ctrl)}" if ctrl else "no ω = 0 run with a class"
    why = under(definition, why, left_out)
    text = _classes_text(observed)
    support = spec.support_files(collection, None)
    return Claim(title, paper, text, control, verdict, why, support, definition)
