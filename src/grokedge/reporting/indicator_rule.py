"""The indicator bench's verdict rule: does an indicator's change announce grokking?

Pure: change points in, a verdict out (no file is read but the thresholds' own
``conf/report/verdicts.yaml``, ``indicators:``). Per indicator and task the input is one
:class:`IndicatorChange` per trajectory (one training): its grok step and the change
point of the indicator in the task's one span (:mod:`.change_points`; never a span
centred on the run's own grok step), and the same for the task's ω = 0 runs that did not
grok (the control). The rule (:func:`indicator_verdict`), in this order:

1. *too few runs*: fewer than ``min_trajectories`` grokked trajectories with a change.
2. *cannot separate*: fewer than ``min_distinct_grok`` distinct grok steps among them.
3. *also without grokking*: more than ``control_share`` of the ω = 0 runs show a change
   with |Δ| (difference of the segment means, series units) at least
   ``control_magnitude`` × the median |Δ| of the grokked trajectories.
4. Over the grokked trajectories with a change: the slope of the change step on the grok
   step by OLS with its bootstrap interval over trajectories (the machinery of
   :mod:`.event_rule`: each resample draws the change within its sample spacing and the
   grok step within the evaluation interval before it), the permutation p-value of the
   correlation (``correlation``) between change and grok step (grok steps permuted across
   trajectories, ``permutations`` times: p = (1 + #{|r_perm| >= |r|}) / (1 + permutations)),
   and the lead = grok step − change step: its median and IQR.
   - The slope interval holding 1 and not 0 and p < ``max_p``: the change tracks grokking;
     then *leads* when the median lead > tolerance, *lags* when < −tolerance, else
     *coincides*. Tolerance = ``lead_tolerance_samples`` × the median sample spacing at
     the change + ``lead_tolerance_evaluations`` × the evaluation interval +
     ``lead_tolerance_grok_fraction`` × the median grok step.
   - The slope interval holding 0 and not 1: *unrelated* (a step of its own).
   - Otherwise (both, neither, or p too large): *cannot separate*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata

from grokedge.checks import check_choice, check_float, check_int
from grokedge.reporting.change_points import ChangePoint
from grokedge.reporting.event_rule import bootstrap_line, interval_contains, interval_text
from grokedge.reporting.report_conf import indicator_settings
from grokedge.reporting.table_format import fmt

LEADS = "leads"
COINCIDES = "coincides"
LAGS = "lags"
UNRELATED = "unrelated"
ALSO_WITHOUT = "also without grokking"
CANNOT_SEPARATE = "cannot separate"
TOO_FEW = "too few runs"
VERDICTS = (LEADS, COINCIDES, LAGS, UNRELATED, ALSO_WITHOUT, CANNOT_SEPARATE, TOO_FEW)
CORRELATIONS = ("pearson", "spearman")
SECTION = "indicators"


def rule_settings(conf: dict[str, Any] | None = None) -> dict[str, Any]:
    """The verdict knobs of ``indicators`` (``conf`` or ``conf/report/verdicts.yaml``),
    checked: one ValueError naming the key, its value and what is allowed."""
    c = indicator_settings() if conf is None else conf
    for key, low in (("min_trajectories", 2), ("min_distinct_grok", 2), ("bootstrap", 1)):
        check_int(f"{SECTION}.{key}", c.get(key), low)
    for key in ("bootstrap_seed", "permutations", "permutation_seed"):
        check_int(f"{SECTION}.{key}", c.get(key), 0 if key.endswith("seed") else 1)
    for key in ("interval_level", "max_p", "control_share"):
        check_float(f"{SECTION}.{key}", c.get(key), 0.0, 1.0)
    for key in (
        "lead_tolerance_samples",
        "lead_tolerance_evaluations",
        "lead_tolerance_grok_fraction",
        "control_magnitude",
    ):
        check_float(f"{SECTION}.{key}", c.get(key), 0.0)
    check_choice(f"{SECTION}.correlation", c.get("correlation"), CORRELATIONS)
    return c


@dataclass(frozen=True)
class IndicatorChange:
    """One trajectory's change point of one indicator, the input of the rule.

    Attributes:
        grok_step: its grok step (optimizer steps); None: an ω = 0 control that did not grok.
        change: the change point in its span, None when none passed the penalty.
        grok_resolution: steps between the evaluations that detect grokking (0: unknown).
    """

    grok_step: int | None
    change: ChangePoint | None
    grok_resolution: int = 0


@dataclass(frozen=True)
class IndicatorVerdict:
    """The verdict on one indicator over a task's trajectories.

    Attributes:
        indicator, task: what was judged.
        n: grokked trajectories; changed: those with a change point (the fitted ones).
        slope, slope_ci: the change step on the grok step (OLS) and its bootstrap interval.
        corr, p_value: the correlation of change and grok step and its permutation p.
        lead, lead_iqr: median and (25th, 75th) percentiles of grok − change step (steps).
        tolerance: the lead within which the change coincides (steps).
        magnitude: median |Δ| of the grokked changes (series units).
        controls: ω = 0 runs; control_changed: those with a change >= control_magnitude ×
            magnitude; control_fraction: their share (NaN without controls).
        verdict: one of :data:`VERDICTS`; reason: why, with its numbers.
    """

    indicator: str
    task: str
    n: int
    changed: int
    verdict: str
    reason: str
    slope: float = math.nan
    slope_ci: tuple[float, float] = (math.nan, math.nan)
    corr: float = math.nan
    p_value: float = math.nan
    lead: float = math.nan
    lead_iqr: tuple[float, float] = (math.nan, math.nan)
    tolerance: float = math.nan
    magnitude: float = math.nan
    controls: int = 0
    control_changed: int = 0
    control_fraction: float = math.nan


def rounded(x: float, digits: int = 2) -> str:
    """``x`` with ``digits`` decimals, no "-0.00" and no scientific notation for a
    slope that is 0 up to rounding (a table cell, a reason); "–" when not finite."""
    return fmt(round(x, digits) + 0.0, digits) if math.isfinite(x) else "–"


def _corr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of ``x`` [n] with each row of ``y`` [..., n] (NaN where one is constant)."""
    xc = x - x.mean()
    yc = y - y.mean(axis=-1, keepdims=True)
    den = math.sqrt(float((xc**2).sum())) * np.sqrt((yc**2).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (yc * xc).sum(axis=-1) / np.where(den > 0, den, 1.0), np.nan)


def permutation_p(
    change: np.ndarray, grok: np.ndarray, conf: dict[str, Any]
) -> tuple[float, float]:
    """(r, two-sided permutation p) of corr(change, grok) with the grok steps permuted
    across trajectories (module docstring, step 4); (NaN, 1) when either is constant."""
    if conf["correlation"] == "spearman":
        change, grok = rankdata(change), rankdata(grok)
    r = float(_corr(change, grok))
    if not math.isfinite(r):
        return math.nan, 1.0
    rng = np.random.default_rng(int(conf["permutation_seed"]))
    perms = rng.permuted(np.tile(grok, (int(conf["permutations"]), 1)), axis=1)
    null = np.abs(_corr(change, perms))
    # A small tolerance: a permutation as correlated as the data counts (ties, rounding).
    hits = int((null >= abs(r) - 1e-12).sum())
    return r, (1 + hits) / (1 + int(conf["permutations"]))


def indicator_verdict(
    indicator: str,
    task: str,
    grokked: list[IndicatorChange],
    controls: list[IndicatorChange],
    conf: dict[str, Any] | None = None,
) -> IndicatorVerdict:
    """The verdict on one indicator over a task's grokked trajectories and its ω = 0
    controls (module docstring)."""
    c = rule_settings(conf)
    fitted = [
        (t.grok_step, t.change, t.grok_resolution)
        for t in grokked
        if t.grok_step is not None and t.change is not None
    ]
    base: dict[str, Any] = {
        "indicator": indicator,
        "task": task,
        "n": len(grokked),
        "changed": len(fitted),
        "controls": len(controls),
    }
    if fitted:  # the lead and the control, shown even when too few to judge
        g = np.asarray([f[0] for f in fitted], float)
        steps = np.asarray([f[1].step for f in fitted], float)
        gaps = np.asarray([f[1].step - f[1].previous for f in fitted], float)
        lag = np.asarray([f[2] for f in fitted], float)
        leads = g - steps
        magnitude = float(np.median([abs(f[1].magnitude) for f in fitted]))
        q25, q75 = (float(v) for v in np.quantile(leads, [0.25, 0.75]))
        base |= {"lead": float(np.median(leads)), "lead_iqr": (q25, q75), "magnitude": magnitude}
        floor = float(c["control_magnitude"]) * magnitude
        moved = sum(t.change is not None and abs(t.change.magnitude) >= floor for t in controls)
        share = moved / len(controls) if controls else math.nan
        base |= {"control_changed": moved, "control_fraction": share}
    need = int(c["min_trajectories"])
    if len(fitted) < need:
        reason = f"{len(fitted)}/{len(grokked)} grokked trajectories with a change (< {need})"
        return IndicatorVerdict(**base, verdict=TOO_FEW, reason=reason)
    distinct, least = len(set(g.tolist())), int(c["min_distinct_grok"])
    if distinct < least:
        reason = f"{distinct} distinct grok steps over {len(fitted)} trajectories (< {least})"
        return IndicatorVerdict(**base, verdict=CANNOT_SEPARATE, reason=reason)
    control = (
        f"{moved}/{len(controls)} ω = 0 runs change by >= {c['control_magnitude']} × the "
        f"median grokked |Δ| {fmt(magnitude)}"
        if controls
        else "no ω = 0 control"
    )
    if controls and share > float(c["control_share"]):
        reason = f"{control} (> {c['control_share']})"
        return IndicatorVerdict(**base, verdict=ALSO_WITHOUT, reason=reason)
    # The change lies in (previous, step]: fit its middle, drawn within the gap.
    slope, _, ci = bootstrap_line(g, steps - gaps / 2, c, gaps / 2, lag)
    r, p = permutation_p(steps, g, c)
    tolerance = (
        float(c["lead_tolerance_samples"]) * float(np.median(gaps))
        + float(c["lead_tolerance_evaluations"]) * float(np.median(lag))
        + float(c["lead_tolerance_grok_fraction"]) * float(np.median(g))
    )
    base |= {"slope": slope, "slope_ci": ci, "corr": r, "p_value": p, "tolerance": tolerance}
    lead = base["lead"]
    numbers = (
        f"slope {rounded(slope)} in {interval_text(ci)} over {len(fitted)} trajectories, "
        f"{c['correlation']} r {rounded(r)} (permutation p {fmt(p, 4)}), median lead "
        f"{fmt(lead, 0)} (tolerance {fmt(tolerance, 0)}); {control}"
    )
    has0, has1 = interval_contains(ci, 0.0), interval_contains(ci, 1.0)
    if has1 and not has0 and p < float(c["max_p"]):
        verdict = LEADS if lead > tolerance else LAGS if lead < -tolerance else COINCIDES
    elif has0 and not has1:
        verdict = UNRELATED
    else:
        verdict = CANNOT_SEPARATE
    return IndicatorVerdict(**base, verdict=verdict, reason=numbers)
