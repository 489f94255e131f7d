"""The indicator bench's tables: per task, every indicator's change against the grok step
with its verdict (:mod:`.indicator_rule`), and a paragraph ranking the indicators that
announce grokking."""

from __future__ import annotations

from grokedge.reporting.event_rule import interval_text
from grokedge.reporting.indicator_rule import (
    ALSO_WITHOUT,
    COINCIDES,
    LAGS,
    LEADS,
    IndicatorVerdict,
    rounded,
    rule_settings,
)
from grokedge.reporting.indicator_runs import label
from grokedge.reporting.table_format import Table, escape_pipes, fmt


def _control_cell(v: IndicatorVerdict) -> str:
    if not v.controls:
        return "no ω = 0 run"
    return f"{v.control_changed}/{v.controls}"


def _lead_cell(v: IndicatorVerdict) -> str:
    if v.lead != v.lead:  # NaN: no change to measure
        return "–"
    return f"{fmt(v.lead, 0)} ({fmt(v.lead_iqr[0], 0)} to {fmt(v.lead_iqr[1], 0)})"


def indicator_table(task: str, verdicts: list[IndicatorVerdict]) -> Table:
    """One row per indicator of ``task``: trajectories, slope of the change step on the
    grok step with its interval, median lead (IQR), permutation p, the ω = 0 control's
    change fraction, the verdict and why."""
    rows = [
        [
            escape_pipes(label(v.indicator)),
            f"{v.changed}/{v.n}",
            "–" if v.slope != v.slope else f"{rounded(v.slope)} {interval_text(v.slope_ci)}",
            _lead_cell(v),
            fmt(v.p_value, 4),
            _control_cell(v),
            f"**{v.verdict}**",
            escape_pipes(v.reason),
        ]
        for v in verdicts
    ]
    c = rule_settings()
    return Table(
        f"Which indicator announces grokking? Task {task}",
        [
            "indicator",
            "trajectories with a change",
            "slope on grok [interval]",
            "median lead (IQR), steps",
            "permutation p",
            "ω = 0 changed",
            "verdict",
            "why",
        ],
        rows,
        note="Per series, one change point (ruptures, penalised) searched in the task's one "
        f"span, the same for every run (ω = 0 included): from {c['span_before']} × the "
        f"earliest grok step before it to {c['span_after']} × the latest after it. "
        "Lead = grok − change step "
        "(positive: the change comes first). The change tracks grokking when the slope's "
        f"{c['interval_level']:.0%} bootstrap interval ({c['bootstrap']} resamples of the "
        f"trajectories) holds 1 but not 0 and the {c['correlation']} correlation's "
        f"permutation p < {c['max_p']}; then leads / lags beyond the tolerance, else "
        "coincides; unrelated when the interval holds 0 but not 1. Also without grokking: "
        f"more than {c['control_share']} of the ω = 0 runs change by at least "
        f"{c['control_magnitude']} × the median grokked |Δ| (conf/report/verdicts.yaml, "
        "`indicators:`).",
    )


def ranking_paragraph(task: str, verdicts: list[IndicatorVerdict]) -> str:
    """Which indicator, if any, announces grokking on ``task``, by how many steps, with
    its ω = 0 control (one paragraph; leaders by median lead, largest first)."""
    leaders = sorted((v for v in verdicts if v.verdict == LEADS), key=lambda v: -v.lead)
    timed = [v for v in verdicts if v.verdict in (COINCIDES, LAGS)]
    also = [v for v in verdicts if v.verdict == ALSO_WITHOUT]

    def named(v: IndicatorVerdict) -> str:
        control = (
            "no ω = 0 control"
            if not v.controls
            else f"{v.control_changed}/{v.controls} ω = 0 runs change as much"
        )
        return (
            f"{label(v.indicator)} (median lead {fmt(v.lead, 0)} steps, IQR "
            f"{fmt(v.lead_iqr[0], 0)} to {fmt(v.lead_iqr[1], 0)}, {v.changed} trajectories; "
            f"{control})"
        )

    if leaders:
        text = f"On {task}, {len(leaders)} indicator(s) change before grokking, by lead: "
        text += "; ".join(named(v) for v in leaders) + "."
    else:
        text = f"On {task}, no indicator changes before grokking."
    if timed:
        text += " At or after it: " + "; ".join(
            f"{label(v.indicator)} ({v.verdict}, median lead {fmt(v.lead, 0)})" for v in timed
        )
        text += "."
    if also:
        text += " Changing as much without grokking (ω = 0): "
        text += ", ".join(label(v.indicator) for v in also) + "."
    rest = len(verdicts) - len(leaders) - len(timed) - len(also)
    if rest:
        text += f" {rest} other indicator(s): unrelated, cannot separate or too few runs."
    return text
