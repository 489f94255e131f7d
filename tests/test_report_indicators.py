"""The indicator bench: change points (reporting/change_points.py) on synthetic series with
known changes and against an exhaustive search, the verdict rule (reporting/indicator_rule.py)
on constructed trajectories whose answer is known, the edge's series read from rows, and
the report's "Indicators" section end to end on synthetic run directories."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from grokedge.edge.geometry import kstar_ratio
from grokedge.report import main as report_main
from grokedge.reporting import indicator_rule as R
from grokedge.reporting.change_points import (
    ChangePoint,
    change_point,
    change_settings,
    search_span,
)
from grokedge.reporting.discover import RunData
from grokedge.reporting.indicator_runs import run_series
from grokedge.reporting.report_conf import indicator_settings

CONF = indicator_settings()
CADENCE = 50  # steps between an indicator's samples (and between evaluations)
GROKS = [1000, 1150, 1300, 1450, 1600, 1750, 1900, 2000]
FIXED = 1250  # a change step inside the task's span (0.5 × earliest grok to 1.5 × latest)
SHIFT = 300  # |lead| of the leading / lagging constructed indicators


def _steps(last: int = 3200) -> np.ndarray:
    return np.arange(0, last + 1, CADENCE)


def _step_series(at: float, rng: np.random.Generator, noise: float = 0.2) -> np.ndarray:
    """A unit step up at ``at`` (steps >= at high) plus Gaussian noise."""
    steps = _steps()
    return (steps >= at).astype(float) + noise * rng.standard_normal(len(steps))


# ----------------------------------------------------------------------- change points


@pytest.mark.parametrize("at", [600, 1000, 1775, 2425])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_step_is_found_within_one_sample(at: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    cp = change_point(_steps(), _step_series(at, rng))
    assert cp is not None
    assert abs(cp.step - at) <= CADENCE, (cp.step, at)
    assert cp.previous == cp.step - CADENCE
    assert cp.magnitude == pytest.approx(1.0, abs=0.25)  # the unit jump, noise 0.2


@pytest.mark.parametrize("centre", [900, 1600, 2300])
def test_a_ramp_is_found_near_its_middle(centre: int) -> None:
    steps = _steps()
    half = 200  # the ramp climbs over 2 × 200 steps = 8 samples
    values = np.clip((steps - (centre - half)) / (2 * half), 0.0, 1.0)
    values = values + 0.1 * np.random.default_rng(centre).standard_normal(len(steps))
    cp = change_point(steps, values)
    assert cp is not None
    assert abs(cp.step - centre) <= 3 * CADENCE, (cp.step, centre)


def test_the_split_is_the_exhaustive_best_and_the_statistic_its_ratio() -> None:
    rng = np.random.default_rng(7)
    steps = _steps(1500)
    x = np.cumsum(rng.standard_normal(len(steps)))  # a random walk: no obvious split
    segment = int(CONF["min_segment"])

    def rss(v: np.ndarray) -> float:
        return float(((v - v.mean()) ** 2).sum())

    best = min(range(segment, len(x) - segment + 1), key=lambda i: rss(x[:i]) + rss(x[i:]))
    conf = {**CONF, "change_penalty": 0.0}  # keep any split
    cp = change_point(steps, x, conf=conf)
    assert cp is not None and cp.step == steps[best]
    expected = len(x) * math.log(rss(x) / (rss(x[:best]) + rss(x[best:])))
    assert cp.statistic == pytest.approx(expected)
    assert cp.before == pytest.approx(x[:best].mean()) and cp.after == pytest.approx(
        x[best:].mean()
    )
    assert cp.relative == pytest.approx(abs(cp.magnitude) / x.std())
    huge = {**CONF, "change_penalty": expected / math.log(len(x)) + 1e-6}
    assert change_point(steps, x, conf=huge) is None  # just above the statistic: rejected


def test_noise_flat_and_short_series_have_no_change() -> None:
    rng = np.random.default_rng(3)
    found = sum(
        change_point(_steps(), rng.standard_normal(len(_steps()))) is not None for _ in range(40)
    )
    assert found <= 2  # the penalty rejects pure noise (about 1 in 300 at n = 65)
    assert change_point(_steps(), np.ones(len(_steps()))) is None
    few = int(CONF["min_samples"]) - 1
    assert change_point(list(range(few)), [0.0] * (few // 2) + [1.0] * (few - few // 2)) is None


def test_the_span_limits_the_search() -> None:
    steps, noise = _steps(), 0.05 * np.random.default_rng(4).standard_normal(len(_steps()))
    values = (steps >= 500).astype(float) + 3 * (steps >= 2500) + noise
    assert change_point(steps, values).step == 2500  # the larger jump
    assert change_point(steps, values, span=(0, 1500)).step == 500


def test_bad_change_settings_name_the_key() -> None:
    with pytest.raises(ValueError, match=r"indicators.change_model='bogus' is not allowed"):
        change_settings({**CONF, "change_model": "bogus"})
    with pytest.raises(ValueError, match=r"indicators.min_samples=3 is not allowed"):
        change_settings({**CONF, "min_samples": 3, "min_segment": 3})
    with pytest.raises(ValueError, match=r"indicators.max_p=2 is not allowed"):
        R.rule_settings({**CONF, "max_p": 2})


# ------------------------------------------------------------------------- the rule


def test_permutation_p_matches_exact_enumeration() -> None:
    rng = np.random.default_rng(5)
    grok = np.asarray([1000, 1100, 1350, 1400, 1700, 1900], float)
    change = grok + rng.normal(0, 250, size=grok.size)
    r = np.corrcoef(change, grok)[0, 1]
    perms = [np.corrcoef(change, np.asarray(p))[0, 1] for p in itertools.permutations(grok)]
    exact = np.mean(np.abs(perms) >= abs(r) - 1e-12)
    r_hat, p = R.permutation_p(change, grok, {**CONF, "permutations": 20000})
    assert r_hat == pytest.approx(r)
    assert p == pytest.approx(exact, abs=0.015)


def _cp(step: int, magnitude: float = 1.0) -> ChangePoint:
    return ChangePoint(step, step - CADENCE, 0.0, magnitude, 0.5, 40, math.inf)


def test_too_few_runs_and_one_grok_step_decide_nothing() -> None:
    few = [R.IndicatorChange(g, _cp(g)) for g in GROKS[:4]]
    assert R.indicator_verdict("x", "t", few, []).verdict == R.TOO_FEW
    same = [R.IndicatorChange(1000, _cp(1000)) for _ in GROKS]
    assert R.indicator_verdict("x", "t", same, []).verdict == R.CANNOT_SEPARATE


def _constructed(
    kind: str, seed: int = 0
) -> tuple[list[R.IndicatorChange], list[R.IndicatorChange]]:
    """Change points detected on series built to answer ``kind``; 3 ω = 0 controls."""
    rng = np.random.default_rng(seed)
    at = {"leads": -SHIFT, "coincides": 0, "lags": SHIFT}
    grokked = []
    for g in GROKS:
        step = FIXED if kind == "unrelated" else g + at.get(kind, 0)
        values = _step_series(step, rng)
        grokked.append(R.IndicatorChange(g, change_point(_steps(), values, SPAN), CADENCE))
    ref = float(np.median(GROKS))
    controls = []
    for _ in range(3):
        values = (
            _step_series(ref, rng) if kind == "also" else 0.2 * rng.standard_normal(len(_steps()))
        )
        controls.append(R.IndicatorChange(None, change_point(_steps(), values, SPAN)))
    return grokked, controls


SPAN = search_span(GROKS, CONF)  # the task's one span, as the bench searches every run


def test_the_span_is_one_per_task_not_centred_on_a_runs_grok_step() -> None:
    assert SPAN == (0.5 * min(GROKS), 1.5 * max(GROKS))
    # A smooth drift, the same in every run (e.g. ‖θ‖ shrinking under weight decay): with
    # spans centred on each run's own grok step it would be cut near each grok step and
    # "coincide" with grokking; in the task's one span it changes at one step whatever the
    # grok step, and no verdict says it tracks grokking.
    rng = np.random.default_rng(0)
    steps = _steps()
    centred, common = [], []
    for g in GROKS:
        drift = steps / steps[-1] + 0.02 * rng.standard_normal(len(steps))
        centred.append(R.IndicatorChange(g, change_point(steps, drift, (0.5 * g, 1.5 * g)), 50))
        common.append(R.IndicatorChange(g, change_point(steps, drift, SPAN), CADENCE))
    assert R.indicator_verdict("drift", "t", centred, []).verdict == R.COINCIDES
    tracking = (R.LEADS, R.COINCIDES, R.LAGS)
    assert R.indicator_verdict("drift", "t", common, []).verdict not in tracking


@pytest.mark.parametrize(
    ("kind", "verdict"),
    [
        ("leads", R.LEADS),
        ("coincides", R.COINCIDES),
        ("lags", R.LAGS),
        ("unrelated", R.UNRELATED),
        ("also", R.ALSO_WITHOUT),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_each_constructed_indicator_gets_its_verdict(kind: str, verdict: str, seed: int) -> None:
    grokked, controls = _constructed(kind, seed)
    v = R.indicator_verdict(kind, "t", grokked, controls)
    assert v.verdict == verdict, v.reason
    assert v.changed == len(GROKS)
    leads = [g.grok_step - g.change.step for g in grokked]  # type: ignore[union-attr, operator]
    assert v.lead == pytest.approx(float(np.median(leads)))
    if kind in ("leads", "lags"):
        assert abs(v.lead - (SHIFT if kind == "leads" else -SHIFT)) <= CADENCE
        assert v.p_value < float(CONF["max_p"])


# --------------------------------------------------------------------- the edge's series


def test_edge_series_are_read_per_definition() -> None:
    sigma = [[5.0, 2.0, 1.5, 0.2], [4.0, 3.9, 1.0, 0.5]]
    rows = [
        {
            "analysis": "edge_directions",
            "step": 100 * (i + 1),
            "definitions": {"normalized": {"sigma": s, "grad_frac": [0.3 + i, 0.1]}},
            "directions": [{"k": 1, "rotation_deg": math.nan if i == 0 else 12.5}],
        }
        for i, s in enumerate(sigma)
    ]
    rows.append({"analysis": "edge_summary", "step": 300, "edge_definition": "normalized"})
    series = run_series(RunData(path=Path("/nonexistent"), name="r", analyses=rows))
    for j, s in enumerate(sigma):
        k = kstar_ratio(torch.tensor(s))
        assert series["edge/normalized/sigma_1"][1][j] == s[0]
        assert series["edge/normalized/g23"][1][j] == pytest.approx(s[1] ** 2 - s[2] ** 2)
        assert series["edge/normalized/kstar"][1][j] == k
        assert series["edge/normalized/gap_ratio"][1][j] == pytest.approx(s[k - 1] / s[k])
        assert series["edge/normalized/grad_frac_v1"][1][j] == pytest.approx(0.3 + j)
    assert series["edge/normalized/rotation_v1"] == ([200], [12.5])  # the first: no previous


def test_rows_from_before_the_definitions_give_the_analysed_edge() -> None:
    """Legacy rows: σ from ``gram_spectrum``, share and rotation from ``directions``, all
    under the analysed definition (unrecorded: the paper's)."""
    rows = [
        {"analysis": "gram_spectrum", "step": 100, "sigma": [3.0, 1.0, 0.5]},
        {"analysis": "edge_directions", "step": 100, "directions": [{"k": 1, "grad_frac": 0.9}]},
    ]
    series = run_series(RunData(path=Path("/nonexistent"), name="r", analyses=rows))
    assert series == {
        "edge/paper/sigma_1": ([100], [3.0]),
        "edge/paper/g23": ([100], [pytest.approx(0.75)]),
        "edge/paper/kstar": ([100], [1.0]),
        "edge/paper/gap_ratio": ([100], [3.0]),
        "edge/paper/grad_frac_v1": ([100], [0.9]),
    }


# ------------------------------------------------------------------------ end to end


def _write_run(
    path: Path, seed: int, omega: float, grok: int | None, rng: np.random.Generator
) -> None:
    """A run directory whose indicators change where their names say (ω = 0: no grok)."""
    path.mkdir(parents=True)
    ref = float(np.median(GROKS))
    at = {
        "indicator/a_leads": None if grok is None else grok - SHIFT,
        "indicator/b_coincides": None if grok is None else grok,
        "indicator/c_lags": None if grok is None else grok + SHIFT,
        "indicator/d_unrelated": None if grok is None else FIXED,
        "indicator/e_also": ref if grok is None else grok,
    }
    series = {}
    for key, step in at.items():
        noise = 0.2 * rng.standard_normal(len(_steps()))
        series[key] = noise if step is None else _step_series(step, rng)
    series["indicator/llc_converged"] = np.ones(len(_steps()))  # a diagnostic: never judged
    rows = [
        {"step": int(s), **{k: float(v[i]) for k, v in series.items()}}
        for i, s in enumerate(_steps())
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary: dict[str, Any] = {"task": "modular", "status": "ok", "grok_step": grok, "steps": 3200}
    (path / "summary.json").write_text(json.dumps(summary))
    (path / ".hydra").mkdir()
    task = {"name": "modular", "eval_every": CADENCE}
    config = {"seed": seed, "optimizer": {"weight_decay": omega}, "task": task}
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    overrides = [f"seed={seed}", f"optimizer.weight_decay={omega:g}"]
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))


def test_the_report_judges_every_constructed_indicator(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    sweep = tmp_path / "sweep"
    runs = [(i, 1.0, g) for i, g in enumerate(GROKS)] + [(i, 0.0, None) for i in range(3)]
    for job, (seed, omega, grok) in enumerate(runs):
        _write_run(sweep / str(job), seed, omega, grok, rng)
    assert report_main([str(sweep), "--no-wandb"]) == 0
    md = (sweep / "report" / "report.md").read_text()
    assert "## Indicators" in md
    lines = md.splitlines()
    start = lines.index("### Which indicator announces grokking? Task modular")
    verdicts = {}
    for line in lines[start + 4 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        verdicts[cells[0]] = cells[6].strip("*")
    assert verdicts == {
        "indicator/a_leads": R.LEADS,
        "indicator/b_coincides": R.COINCIDES,
        "indicator/c_lags": R.LAGS,
        "indicator/d_unrelated": R.UNRELATED,
        "indicator/e_also": R.ALSO_WITHOUT,
    }
    assert "change before grokking, by lead: indicator/a_leads (median lead 300" in md
    png = sweep / "report" / "indicators_modular.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](indicators_modular.png)" in md
