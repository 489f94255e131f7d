"""Where a series changes regime: one change point per series, by ``ruptures``.

Pure (numpy and ruptures; no file is read but the knobs' own ``conf/report/verdicts.yaml``,
``indicators:``). For one series (steps [n], values [n]) restricted to a *span* of steps:

1. Fewer than ``min_samples`` samples in the span, or a constant series: no change point.
2. The split: ruptures' binary segmentation (``rpt.Binseg``, cost model ``change_model``,
   each side at least ``min_segment`` samples) asked for one break; its first split is the
   exact best single split under that cost.
3. The penalty: the split is kept only when the two-mean fit beats the one-mean fit by the
   Gaussian likelihood ratio n·ln(RSS_one / RSS_two) > ``change_penalty``·ln(n) (RSS: the
   residual sum of squares about the mean of the whole span, and about each segment's
   mean). Scale-free: neither the series' units nor its noise level enter the penalty; a
   noiseless step (RSS_two = 0) is always kept.

The *span* (:func:`search_span`): one span per task, the same for every run of it, from
``span_before`` × the earliest grok step before it to ``span_after`` × the latest grok
step after it (the grokked runs' grok steps; the caller passes them). It must not depend
on a run's own grok step: a span centred on it would cut a smooth drift near its middle,
i.e. near that run's grok step, and manufacture a change that "tracks grokking". With one
span, a change that moves with the grok step does so because the series changes there;
a drift or a fixed-step change lands at the same step in every run (and in the ω = 0
runs, searched in the same span: :mod:`grokedge.reporting.indicator_rule`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ruptures as rpt

from grokedge.checks import check_choice, check_float, check_int
from grokedge.reporting.report_conf import indicator_settings

CHANGE_MODELS = ("l2", "l1", "rbf", "normal")
"""ruptures cost models that ``change_model`` may name (each works on a 1-d series)."""

SECTION = "indicators"


@dataclass(frozen=True)
class ChangePoint:
    """The one change of a series in its span.

    Attributes:
        step: the first sample step of the new regime (optimizer steps).
        previous: the last sample step of the old one: the change lies in (previous, step].
        before, after: the means of the two segments (the series' units).
        spread: the standard deviation of the series over the span (its units).
        samples: samples in the span.
        statistic: n·ln(RSS_one / RSS_two), the penalised test's statistic (inf: noiseless).
    """

    step: int
    previous: int
    before: float
    after: float
    spread: float
    samples: int
    statistic: float

    @property
    def magnitude(self) -> float:
        """after − before, in the series' units."""
        return self.after - self.before

    @property
    def relative(self) -> float:
        """|after − before| over the span's standard deviation (dimensionless)."""
        return abs(self.magnitude) / self.spread if self.spread > 0 else math.inf


def change_settings(conf: dict[str, Any] | None = None) -> dict[str, Any]:
    """The change-point knobs of ``indicators`` (``conf`` or ``conf/report/verdicts.yaml``),
    checked: one ValueError naming the key, its value and what is allowed."""
    c = indicator_settings() if conf is None else conf
    check_choice(f"{SECTION}.change_model", c.get("change_model"), CHANGE_MODELS)
    check_float(f"{SECTION}.change_penalty", c.get("change_penalty"), 0.0)
    segment = check_int(f"{SECTION}.min_segment", c.get("min_segment"), 1)
    # Binary segmentation needs two segments of min_segment samples.
    check_int(f"{SECTION}.min_samples", c.get("min_samples"), 2 * segment)
    check_float(f"{SECTION}.span_before", c.get("span_before"), 0.0, 1.0)
    check_float(f"{SECTION}.span_after", c.get("span_after"), 0.0)
    return c


def search_span(
    grok_steps: Sequence[float], conf: dict[str, Any] | None = None
) -> tuple[float, float]:
    """(first, last) step of a task's span: ``span_before`` × min(grok_steps) before the
    earliest grok step to ``span_after`` × max(grok_steps) after the latest (optimizer
    steps). ValueError when ``grok_steps`` is empty."""
    if not grok_steps:
        raise ValueError("grok_steps is empty: a span needs at least one grokked run")
    c = change_settings(conf)
    first, last = float(min(grok_steps)), float(max(grok_steps))
    return first * (1.0 - float(c["span_before"])), last * (1.0 + float(c["span_after"]))


def _rss(x: np.ndarray) -> float:
    return float(((x - x.mean()) ** 2).sum())


def change_point(
    steps: Sequence[int],
    values: Sequence[float],
    span: tuple[float, float] | None = None,
    conf: dict[str, Any] | None = None,
) -> ChangePoint | None:
    """The change point of one series within ``span`` (module docstring), or None.

    Args:
        steps: [n] optimizer steps of the samples (any order; a repeated step keeps its
            last value).
        values: [n] the series' values there (non-finite samples are left out).
        span: (first, last) step searched, inclusive; None: the whole series.
        conf: the ``indicators`` block (default: ``conf/report/verdicts.yaml``).

    Returns:
        None when the span holds fewer than ``min_samples`` samples, the series is constant
        there, or the best split does not pass the penalty.
    """
    c = change_settings(conf)
    by_step = {int(s): float(v) for s, v in zip(steps, values, strict=True) if math.isfinite(v)}
    keep = sorted(s for s in by_step if span is None or span[0] <= s <= span[1])
    n = len(keep)
    if n < int(c["min_samples"]):
        return None
    x = np.asarray([by_step[s] for s in keep], dtype=float)
    rss_one = _rss(x)
    if rss_one <= 0:
        return None  # constant in the span
    algo = rpt.Binseg(model=str(c["change_model"]), min_size=int(c["min_segment"]), jump=1)
    split = int(algo.fit(x).predict(n_bkps=1)[0])  # index of the new regime's first sample
    rss_two = _rss(x[:split]) + _rss(x[split:])
    statistic = math.inf if rss_two <= 0 else n * math.log(rss_one / rss_two)
    if statistic <= float(c["change_penalty"]) * math.log(n):
        return None
    return ChangePoint(
        step=keep[split],
        previous=keep[split - 1],
        before=float(x[:split].mean()),
        after=float(x[split:].mean()),
        spread=float(x.std()),
        samples=n,
        statistic=statistic,
    )
