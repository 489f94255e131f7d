"""``report/claims.md``: on a real run's files, and each verdict rule on synthetic runs whose
answer is known (``RunData`` built directly)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest

from grokedge.report import main as report_main
from grokedge.reporting import claim_rows as R
from grokedge.reporting import claims as C
from grokedge.reporting import edge_series as S
from grokedge.reporting.causal_claims import beyond
from grokedge.reporting.class_tables import class_margin_table, class_task_table
from grokedge.reporting.discover import Collection, RunData
from grokedge.reporting.report_conf import verdict_thresholds
from grokedge.reporting.table_format import mean_sd_text
from tests.real_runs import train

N_CLAIMS = 11
ABLATION_IDS = ("ablation_random", "ablation_matched", "ablation_shrink")
"""The ids (conf/report/claims.yaml) of claims 4-6, against each ablation control."""
RATIO = verdict_thresholds()["claims"]["ratio_beyond_control"]


def _claim_rows(markdown: str) -> dict[int, dict[str, str]]:
    """claims.md's table: {claim number: {column: cell}}."""
    lines = markdown.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| claim |"))
    columns = [c.strip() for c in lines[header].strip("|").split(" | ")]
    out = {}
    for line in lines[header + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        row = dict(zip(columns, cells, strict=True))
        out[int(row["claim"].split(".")[0])] = row
    return out


def _verdict(cell: str) -> str:
    return cell.split("**")[1]


# ------------------------------------------------------------------ a real run's files


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = train(
        tmp_path_factory.mktemp("claims") / "run",
        [
            "task=dyck",
            "callbacks=gram",
            "trainer.max_steps=400",
            "task.gram_interval=50",
            "task.eval_every=50",
            "task.grok.threshold=0.5",
        ],
    )
    assert report_main([str(run_dir), "--no-wandb"]) == 0
    return run_dir


def test_claims_md_of_a_real_run(real_run: Path) -> None:
    out = real_run / "report"
    md = (out / "claims.md").read_text()
    rows = _claim_rows(md)
    assert sorted(rows) == list(range(1, N_CLAIMS + 1))
    assert "[claims.md](claims.md)" in (out / "report.md").read_text()
    for row in rows.values():
        assert _verdict(row["verdict"]) in R.VERDICTS
        for link in row["support"].split(", "):  # every support link is a file of report/
            assert (out / link.split("](")[1].rstrip(")")).is_file(), link
    # The flip row says what the run's own edge_summary says about the paper's flip.
    summary = [
        json.loads(line)
        for line in (real_run / "analyses.jsonl").read_text().splitlines()
        if '"edge_summary"' in line
    ][-1]
    flips = [e for e in summary["events"] if (e["event"], e["definition"]) == ("flip", "paper")]
    if not flips:
        expected = R.NOT_REPRODUCED
    else:
        expected = R.WINDOW_ARTIFACT if flips[0]["window_artifact"] else R.INCONCLUSIVE
    assert _verdict(rows[1]["verdict"]) == expected
    assert f"grok {summary['grok_step']}" in rows[1]["grokedge"]
    # callbacks=gram: the causal experiments are not tested, and the row says why.
    for n in (4, 5, 6, 7, 8, 9, 11):
        assert _verdict(rows[n]["verdict"]) == R.NOT_TESTED, rows[n]
        assert "callbacks=full" in rows[n]["verdict"], rows[n]
    assert _verdict(rows[10]["verdict"]) == R.NOT_TESTED
    assert "wd_intervention" in rows[10]["verdict"]


# ------------------------------------------------------------------- synthetic runs


def _run(
    tmp: Path,
    name: str,
    *,
    omega: float = 1.0,
    seed: int = 1,
    grok: int | None = 600,
    interval: int = 100,
    analyses: list[dict[str, Any]] | None = None,
    task: str = "dyck",
    edge_definition: str | None = "paper",
    **summary: Any,
) -> RunData:
    gram = {} if edge_definition is None else {"gram": {"edge_definition": edge_definition}}
    return RunData(
        path=tmp / name,
        name=name,
        config={
            "seed": seed,
            "optimizer": {"weight_decay": omega},
            "task": {"gram_interval": interval},
            "callbacks": gram,
        },
        summary={"task": task, "status": "ok", "grok_step": grok, **summary},
        analyses=analyses or [],
    )


def _edge_summary(
    interval: int, flip: int | None, artifact: bool = False, align: int | None = None
) -> dict[str, Any]:
    steps = {"flip": flip, "flip_latest": flip, "align": align}
    events = [
        {"event": e, "definition": d, "step": s, "coinciding": [], "window_artifact": artifact}
        for e, s in steps.items()
        for d in ("paper", "burn_in", "normalized")
        if s is not None
    ]
    return {
        "analysis": "edge_summary",
        "step": 3000,
        "phase": "late",
        "interval": interval,
        "window": 5,
        "definitions": {d: dict(steps) for d in ("paper", "burn_in", "normalized")},
        "dominant_changes": [{"step": flip, "kind": "left", "begin": 0, "end": interval}]
        if artifact
        else [],
        "events": events,
    }


@pytest.mark.parametrize(
    ("flip", "artifact", "expected"),
    [(600, True, R.WINDOW_ARTIFACT), (600, False, R.INCONCLUSIVE), (None, False, R.NOT_REPRODUCED)],
)
def test_one_run_flip_verdict_follows_its_window_artifact_flag(
    tmp_path: Path, flip: int | None, artifact: bool, expected: str
) -> None:
    run = _run(tmp_path, "r", analyses=[_edge_summary(100, flip, artifact)])
    claim = C.claim(Collection(tmp_path, [run], is_sweep=False), "flip")
    assert claim.verdict == expected
    assert "grok 600" in claim.grokedge


def _sweep(tmp: Path, event_step) -> Collection:
    """8 grok steps × 3 intervals, the flip at ``event_step(grok, (W + 1)·N)``."""
    runs = []
    for i, (g, n) in enumerate(itertools.product(range(200, 1800, 200), (50, 100, 150))):
        flip = event_step(g, 6 * n)
        runs.append(_run(tmp, str(i), grok=g, interval=n, analyses=[_edge_summary(n, flip)]))
    return Collection(tmp, runs, is_sweep=True)


@pytest.mark.parametrize(
    ("event_step", "expected"),
    [
        (lambda g, w: w, R.WINDOW_ARTIFACT),
        (lambda g, w: g, R.HOLDS),
        (lambda g, w: 1000, R.NOT_REPRODUCED),
    ],
)
def test_sweep_flip_verdict_follows_the_timing_fit(tmp_path: Path, event_step, expected) -> None:
    claim = C.claim(_sweep(tmp_path, event_step), "flip")
    assert claim.verdict == expected, claim
    assert "burn_in:" in claim.grokedge and "normalized:" in claim.grokedge


def test_event_claims_without_edge_rows_are_not_tested(tmp_path: Path) -> None:
    claim = C.claim(Collection(tmp_path, [_run(tmp_path, "r")], is_sweep=False), "align")
    assert claim.verdict == R.NOT_TESTED and "callbacks=gram" in claim.why


def test_align_control_says_omega_zero_alignment_is_zero(tmp_path: Path) -> None:
    runs = [
        _run(tmp_path, "a", analyses=[_edge_summary(100, 600, align=600)]),
        _run(tmp_path, "b", omega=0.0, grok=None, analyses=[_edge_summary(100, None)]),
    ]
    claim = C.claim(Collection(tmp_path, runs, is_sweep=True), "align")
    assert "align in 0/1 runs" in claim.control and "≡ 0" in claim.control


# ----------------------------------------------------------------------------- g_23


def _spectrum(values: dict[int, float]) -> list[dict[str, Any]]:
    """Rows from before the definitions: the analysed edge's g_23 only."""
    return [{"analysis": "gram_spectrum", "step": s, "g23": v} for s, v in values.items()]


def _sigma(g23: float) -> list[float]:
    """σ_1 ≥ σ_2 ≥ σ_3 = 1 with σ_2² − σ_3² = g23."""
    return [math.sqrt(g23 + 1) + 1, math.sqrt(g23 + 1), 1.0]


def _windows(by_definition: dict[str, dict[int, float]]) -> list[dict[str, Any]]:
    """``edge_directions`` rows whose σ under each definition give these g_23 by step."""
    steps = sorted({s for values in by_definition.values() for s in values})
    return [
        {
            "analysis": "edge_directions",
            "step": s,
            "directions": [],
            "definitions": {
                d: {"sigma": _sigma(values[s])}
                for d, values in by_definition.items()
                if s in values
            },
        }
        for s in steps
    ]


G23 = {100: 2.0, 200: 9.0, 300: 3.0, 400: 0.5, 500: 0.1}


def test_g23_compression_matches_the_hand_computation() -> None:
    # Up to step 300: windows 100, 200, 300 -> max 9.0 over the last (300) 3.0 = 3.
    assert S.g23_compression(_spectrum(G23), 300) == pytest.approx(3.0)
    # Up to 450: 9.0 / 0.5; the reference falls between windows.
    assert S.g23_compression(_spectrum(G23), 450) == pytest.approx(18.0)
    assert S.g23_compression(_spectrum(G23), 50) is None
    assert S.g23_compression(_spectrum({100: 1.0, 200: 0.0}), 250) == math.inf


def test_definition_g23_is_sigma2_squared_minus_sigma3_squared(tmp_path: Path) -> None:
    rows = _windows({"paper": G23, "normalized": {300: 0.25}})
    rows[0]["definitions"]["burn_in"] = {"sigma": [2.0, 1.0]}  # two σ: no g_23
    run = _run(tmp_path, "r", grok=300, analyses=rows)
    paper = S.definition_g23(run, "paper")
    assert [r["step"] for r in paper] == sorted(G23)
    assert [r["g23"] for r in paper] == pytest.approx([G23[s] for s in sorted(G23)])
    assert S.definition_g23(run, "burn_in") == []
    assert S.definition_compression(run, "paper") == pytest.approx(3.0)
    assert S.definition_compression(run, "normalized") == pytest.approx(1.0)
    # Rows from before the definitions stand for the analysed edge only.
    old = _run(tmp_path, "o", grok=300, analyses=_spectrum(G23))
    assert S.definition_compression(old, "paper") is None  # its rows carry no σ
    old.analyses = [
        {"analysis": "gram_spectrum", "step": s, "sigma": _sigma(v), "edge_definition": "paper"}
        for s, v in G23.items()
    ]
    assert S.definition_compression(old, "paper") == pytest.approx(3.0)
    assert S.definition_compression(old, "normalized") is None


def _treated_g23(tmp: Path, name: str, paper: float, other: float, **kw: Any) -> RunData:
    """A run grokked at 300 compressing ``paper``× under the paper's definition and
    ``other``× under normalized (its analysed edge, whose value summary.json holds)."""
    rows = _windows(
        {"paper": {100: paper, 200: 1.0, 300: 1.0}, "normalized": {100: other, 300: 1.0}}
    )
    rows += kw.pop("analyses", [])
    return _run(tmp, name, grok=300, analyses=rows, **{"gram/g23_compression": other}, **kw)


@pytest.mark.parametrize(
    ("grokked", "expected"),
    [(3.3, R.WINDOW_ARTIFACT), (30.0, R.HOLDS), (2.0, R.NOT_REPRODUCED), (1.1, R.NOT_REPRODUCED)],
)
def test_g23_claim_against_the_omega_zero_run_at_the_paired_grok_step(
    tmp_path: Path, grokked: float, expected: str
) -> None:
    # The normalized compression would give another verdict: the paper's decides.
    other = 1.1 if grokked > 10 else 31.0
    treated = _treated_g23(tmp_path, "t", grokked, other)
    # The control's own grok step (500) must not be used: the paired run's (300) is.
    control = _run(
        tmp_path, "c", omega=0.0, grok=500, analyses=_windows({"paper": G23, "normalized": {}})
    )
    other_seed = _run(tmp_path, "o", omega=0.0, seed=2, analyses=_windows({"paper": {100: 90.0}}))
    claim = C.claim(Collection(tmp_path, [treated, control, other_seed], is_sweep=True), "g23")
    assert claim.verdict == expected, claim
    assert claim.definition == "paper"
    assert "paper 3.00×" in claim.control  # 9.0 / 3.0
    assert claim.grokedge.startswith(f"paper {grokked:.2f}× (1 run")
    assert f"normalized {other:.2f}×" in claim.grokedge


def _peak_summary(peak_on_change: bool) -> dict[str, Any]:
    summary = _edge_summary(100, None)
    summary["coincidence_windows"] = 1
    # The paper peak is at step 100: a dominant delta leaving there (or far away).
    summary["dominant_changes"] = [
        {"step": 100 if peak_on_change else 1000, "kind": "left", "begin": 0, "end": 100}
    ]
    return summary


@pytest.mark.parametrize(("flagged", "expected"), [(2, R.WINDOW_ARTIFACT), (1, R.HOLDS)])
def test_g23_claim_is_a_window_artifact_when_most_peaks_sit_on_a_dominant_delta(
    tmp_path: Path, flagged: int, expected: str
) -> None:
    """Three grokked runs that compress 30x (10x their controls): 'holds', unless the
    paper-definition g_23 peak of more than half of them lies at a dominant delta's
    entry/exit."""
    runs = []
    for seed in range(3):
        summary = _peak_summary(seed < flagged)
        runs.append(_treated_g23(tmp_path, f"t{seed}", 30.0, 30.0, seed=seed, analyses=[summary]))
        ctrl = _windows({"paper": G23})
        runs.append(_run(tmp_path, f"c{seed}", omega=0.0, seed=seed, analyses=ctrl))
    claim = C.claim(Collection(tmp_path, runs, is_sweep=True), "g23")
    assert claim.verdict == expected, claim
    if expected == R.WINDOW_ARTIFACT:
        assert f"{flagged}/3 runs" in claim.why


def test_g23_claim_without_a_control_is_inconclusive_and_says_why(tmp_path: Path) -> None:
    treated = _treated_g23(tmp_path, "t", 30.0, 2.0, analyses=[_peak_summary(False)])
    other_n = _run(tmp_path, "c", omega=0.0, interval=50, analyses=_windows({"paper": G23}))
    claim = C.claim(Collection(tmp_path, [treated, other_n], is_sweep=True), "g23")
    assert claim.verdict == R.INCONCLUSIVE and "paper 30.00×" in claim.grokedge
    assert "paper 30.00× > 1 + 0.25" in claim.why and "0/1 runs" in claim.why
    # One run that does not compress under the paper's definition: not reproduced, even
    # though its analysed (normalized) edge compresses 31x.
    flat = _treated_g23(tmp_path, "f", 1.1, 31.0)
    claim = C.claim(Collection(tmp_path, [flat], is_sweep=False), "g23")
    assert claim.verdict == R.NOT_REPRODUCED and "paper 1.10× ≤ 1 + 0.25" in claim.why


# ------------------------------------------------------------------------- ablation


def _ablation(phase: str, edge: float, random: float, matched: float, shrink: bool = True):
    row = {
        "analysis": "ablation",
        "step": {"at": 600, "late": 2000}[phase],
        "phase": phase,
        "edge": {"dacc": edge},
        "acc_random": {"random_mean": random},
        "acc_matched": {"random_mean": matched},
    }
    if shrink:
        row["shrink"] = {"dacc": -0.001}
        row["shrink_norm"] = {"dacc": edge / 2}
    return row


def test_ablation_rule_against_each_control(tmp_path: Path) -> None:
    rows = [_ablation("at", -0.3, 1e-5, -0.1), _ablation("late", -0.5, 0.0, -0.01)]
    runs = [_run(tmp_path, "a", analyses=rows), _run(tmp_path, "c", omega=0.0, grok=None)]
    collection = Collection(tmp_path, runs, is_sweep=True)
    random, matched, shrink = (C.claim(collection, k) for k in ABLATION_IDS)
    assert random.verdict == R.HOLDS  # 0.3 / 1e-5 and 0.5 / 0: far beyond 10×
    assert matched.verdict == R.NOT_REPRODUCED  # at grok 0.3 / 0.1 = 3 < 10
    assert "norm-matched at" in matched.why and "late" not in matched.why
    assert shrink.verdict == R.NOT_REPRODUCED  # norm-equal shrink costs half the edge's
    assert "norm-equal shrink at" in shrink.why
    assert RATIO == 10  # the numbers below are chosen around it
    assert beyond(-0.3, 0.02, RATIO) and not beyond(-0.3, 0.04, RATIO)
    assert not beyond(0.0, 0.0, RATIO)


def test_ablation_claims_name_what_is_missing(tmp_path: Path) -> None:
    old = _run(tmp_path, "a", analyses=[_ablation("at", -0.3, 1e-5, -1e-3, shrink=False)])
    claim = C.claim(Collection(tmp_path, [old], is_sweep=False), "ablation_shrink")
    assert claim.verdict == R.NOT_TESTED and "without shrink" in claim.why
    bare = Collection(tmp_path, [_run(tmp_path, "b")], is_sweep=False)
    assert "callbacks=full" in C.claim(bare, "ablation_random").why


def test_analysed_edge_claims_name_their_definition_and_never_mix_two(tmp_path: Path) -> None:
    rows = [_ablation("at", -0.3, 1e-5, -1e-3), _ablation("late", -0.5, 0.0, -1e-3)]
    normalized = _run(tmp_path, "n", analyses=rows, edge_definition="normalized")
    alone = Collection(tmp_path, [normalized], is_sweep=False)
    claim = C.claim(alone, "ablation_random")
    assert claim.definition == "normalized" and claim.verdict == R.HOLDS
    assert claim.why.startswith("judged under normalized, not the paper's definition")
    # A run that analysed the paper's edge is judged instead; the other is left out.
    weak = [_ablation("at", -0.3, -0.1, -1e-3), _ablation("late", -0.5, -0.1, -1e-3)]
    paper = _run(tmp_path, "p", seed=2, analyses=weak)
    claim = C.claim(Collection(tmp_path, [normalized, paper], is_sweep=True), "ablation_random")
    assert claim.definition == "paper" and claim.verdict == R.NOT_REPRODUCED  # 0.3 / 0.1 = 3
    assert "(1 runs)" in claim.grokedge and "1 runs analysed another definition" in claim.why
    assert not claim.why.startswith("judged under")
    # Not tested: the row still names the edge the runs analysed; 9 and 10 read no edge.
    assert C.claim(alone, "flatness").definition == "normalized"
    assert C.claim(alone, "probes").definition == R.NO_EDGE_DEFINITION
    assert C.claim(alone, "wd").definition == R.NO_EDGE_DEFINITION


def test_curvature_control_must_share_the_definition(tmp_path: Path) -> None:
    grokked = _run(tmp_path, "a", analyses=[_perturbation("late", 4e-4, {1: 0.05})])
    other = _run(tmp_path, "c", omega=0.0, grok=None, edge_definition="normalized")
    other.analyses = [_perturbation("pre", 1e-2, {1: 0.1, 3: 1.0, 4: 0.2})]
    claim = C.claim(Collection(tmp_path, [grokked, other], is_sweep=True), "curvature")
    assert claim.verdict == R.INCONCLUSIVE and "under paper" in claim.why


# --------------------------------------------------- flatness, curvature, probes, wd


def _perturbation(phase: str, kl: float, curvatures: dict[int, float]) -> dict[str, Any]:
    return {
        "analysis": "perturbation",
        "step": 2000,
        "phase": phase,
        "extremes": {"1": {"max_kl": kl}, "2": {"max_kl": kl / 2}},
        "curvature": [{"k": k, "fd": c, "hvp": c} for k, c in curvatures.items()],
    }


def test_flatness_and_curvature_rules(tmp_path: Path) -> None:
    grokked = _run(tmp_path, "a", analyses=[_perturbation("late", 4e-4, {1: 0.05})])
    memorised = _run(tmp_path, "c", omega=0.0, grok=None)
    memorised.analyses = [_perturbation("pre", 1e-2, {1: 0.1, 3: 1.0, 4: 0.2})]
    collection = Collection(tmp_path, [grokked, memorised], is_sweep=True)
    assert C.claim(collection, "flatness").verdict == R.HOLDS  # 4e-4 <= 10 × 5e-5
    assert C.claim(collection, "curvature").verdict == R.HOLDS  # 1.0 >= 10 × 0.05
    grokked.analyses = [_perturbation("late", 6e-4, {1: 0.2})]
    assert C.claim(collection, "flatness").verdict == R.NOT_REPRODUCED
    assert C.claim(collection, "curvature").verdict == R.NOT_REPRODUCED  # 1.0 < 10 × 0.2
    alone = Collection(tmp_path, [grokked], is_sweep=False)
    assert C.claim(alone, "curvature").verdict == R.INCONCLUSIVE


def _probe(phase: str, **means: float) -> dict[str, Any]:
    scores = {k: {"mean": v, "sd": 0.0} for k, v in means.items()}
    return {
        "analysis": "probe",
        "step": 3000,
        "phase": phase,
        "primary": "depth",
        "scores": {"depth": scores},
    }


def test_probe_rule(tmp_path: Path) -> None:
    run = _run(tmp_path, "a", analyses=[_probe("late", linear=0.88, mlp=0.99)])
    claim = C.claim(Collection(tmp_path, [run], is_sweep=False), "probes")
    assert claim.verdict == R.HOLDS and "not measured: quadratic" in claim.why
    run.analyses = [_probe("late", linear=0.98, quadratic=0.6, mlp=0.99)]
    claim = C.claim(Collection(tmp_path, [run], is_sweep=False), "probes")
    assert claim.verdict == R.NOT_REPRODUCED and "linear" in claim.why


def _wd_run(tmp: Path, omega: float, r2: float, norm: float) -> RunData:
    run = _run(tmp, f"w{omega}", omega=omega)
    run.metrics = [{"step": 4000, "wd/linear_r2": r2, "wd/theta_norm": norm}]
    return run


def test_weight_decay_table_rule(tmp_path: Path) -> None:
    falls = [_wd_run(tmp_path, 0.0, 0.98, 40.0), _wd_run(tmp_path, 1.0, 0.85, 15.0)]
    assert C.claim(Collection(tmp_path, falls, is_sweep=True), "wd").verdict == R.HOLDS
    flat = [_wd_run(tmp_path, 0.0, 0.98, 40.0), _wd_run(tmp_path, 1.0, 0.97, 15.0)]
    assert C.claim(Collection(tmp_path, flat, is_sweep=True), "wd").verdict == R.NOT_REPRODUCED
    one = Collection(tmp_path, falls[:1], is_sweep=False)
    assert C.claim(one, "wd").verdict == R.INCONCLUSIVE


def test_class_rule(tmp_path: Path) -> None:
    def run(task: str, name: str, late: int = 12, basis: str = "phase", seed: int = 1) -> RunData:
        return _run(
            tmp_path,
            f"{task}{name}{seed}",
            task=task,
            seed=seed,
            class_observed=name,
            class_late_windows=late,
            class_late_basis=basis,
        )

    def verdict(runs: list[RunData]) -> R.Claim:
        return C.claim(Collection(tmp_path, runs, is_sweep=True), "classes")

    dyck = [run("dyck", "mixed", seed=1), run("dyck", "mixed", seed=2), run("dyck", "functional")]
    assert verdict(dyck).verdict == R.INCONCLUSIVE  # modular and scan not classified
    modular = [run("modular", "functional", seed=s) for s in (1, 2, 3)]
    scan = [run("scan", "compression", seed=s) for s in (1, 2, 3)]
    assert verdict([*dyck, *modular, *scan]).verdict == R.HOLDS
    # Too few late windows, or a class from the tail of a run that never got late: not judged.
    short = [run("scan", "compression", late=9, seed=s) for s in (1, 2, 3)]
    claim = verdict([*dyck, *modular, *short])
    assert claim.verdict == R.INCONCLUSIVE and claim.why.startswith("scan: fewer than 3")
    tail = [run("scan", "compression", basis="tail", seed=s) for s in (1, 2, 3)]
    assert verdict([*dyck, *modular, *tail]).verdict == R.INCONCLUSIVE
    # Two judged runs of a task are not enough: the task is inconclusive, whatever class.
    assert verdict([*dyck, *modular, *scan[:2]]).verdict == R.INCONCLUSIVE
    wrong = [*dyck, *modular, *scan, *(run("scan", "mixed", seed=s) for s in (4, 5, 6, 7))]
    claim = verdict(wrong)
    assert claim.verdict == R.NOT_REPRODUCED and "scan: mixed ≠ compression" in claim.why


def test_class_tables_per_task_and_margins(tmp_path: Path) -> None:
    def run(seed: int, share: float, omega: float = 1.0) -> RunData:
        margins = {"functional_grad_share": share - 0.9, "compression_grad_share": 0.5 - share}
        return _run(
            tmp_path,
            f"d{seed}_{omega}",
            seed=seed,
            omega=omega,
            class_observed="mixed",
            class_predicted="compression",
            class_late_grad_share=share,
            class_late_windows=11,
            class_margins=margins,
        )

    runs = [run(1, 0.8), run(2, 0.9), run(3, 0.88, omega=0.0)]
    table = class_task_table(Collection(tmp_path, runs, is_sweep=True))
    by_omega = {row[1]: dict(zip(table.columns, row, strict=True)) for row in table.rows}
    assert by_omega["1"]["runs"] == "2" and by_omega["1"]["observed"] == "mixed 2"
    assert by_omega["1"]["late_grad_share"] == mean_sd_text([0.8, 0.9])
    assert by_omega["1"]["paper late_grad_share"] == "0.87"
    assert by_omega["0"]["late_grad_share"] == "0.880"
    margins = class_margin_table(Collection(tmp_path, runs, is_sweep=True))
    first = dict(zip(margins.columns, margins.rows[0], strict=True))
    assert first["functional_grad_share"] == "-0.100"
    # Mixed on these two margins: moving either threshold alone past it changes the class.
    assert first["decisive (observed)"] == (
        "functional_grad_share (-0.100), compression_grad_share (-0.300)"
    )


def test_every_claim_is_a_row_even_with_nothing_to_test(tmp_path: Path) -> None:
    md = C.claims_markdown(Collection(tmp_path, [_run(tmp_path, "r")], is_sweep=False))
    rows = _claim_rows(md)
    assert sorted(rows) == list(range(1, N_CLAIMS + 1))
    assert all(_verdict(r["verdict"]) == R.NOT_TESTED for r in rows.values())
