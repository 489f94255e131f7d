"""``python -m grokedge.report`` on a small real sweep and on one of its runs.

The sweep is a real Hydra multirun (subprocess, basic launcher): Dyck, 2 seeds × ω ∈
{0, 1}, 250 steps, every analysis of ``callbacks=full`` on a dense cadence with small
subsets, the weight-decay read-outs from step 100, W&B offline. Two extra job
directories stand for a failed job (``"status": "failed"``) and a killed one (no
summary). Expected numbers are read here from the jobs' jsonl files, never from the
report code.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from grokedge.report import main as report_main
from grokedge.reporting.causal_figures import ablation_figure
from grokedge.reporting.causal_tables import ablation_table
from grokedge.reporting.discover import RunData, discover
from grokedge.reporting.run_tables import ablation_phase_table
from grokedge.reporting.wandb_records import history_of, read_offline_run

OVERRIDES = [
    "task=dyck",
    "callbacks=full",
    "trainer.max_steps=250",
    "task.gram_interval=50",
    "task.eval_every=50",
    "task.eval_cadence.ood=1000",
    "task.grok.threshold=0.5",  # groks at the first evaluation: every phase occurs
    "progress_bar.refresh_rate=0",
    "torch_threads=1",
    "callbacks.gram.phase_post=100",  # the run's phases, read by every analysis
    "callbacks.ablation.every=100",
    "callbacks.ablation.n_sequences=40",
    "callbacks.ablation.n_random=3",
    "callbacks.perturbation.every=100",
    "callbacks.perturbation.n_sequences=40",
    "callbacks.perturbation.grid_points=5",
    "callbacks.probe.every=100",
    "callbacks.probe.n_sequences=40",
    "callbacks.probe.kinds=[linear]",
    "callbacks.wd_removal.at_step=100",
    "callbacks.wd_removal.every=50",
    "callbacks.wd_removal.n_sequences=40",
    "callbacks.wd_removal.weight_decay_after=${optimizer.weight_decay}",
]
RUN_FIGURES = ("lifecycle", "ablation", "eps_curves", "curvature", "probes", "wd_removal")
SWEEP_FIGURES = ("sweep_lifecycle", "sweep_ablation", "sweep_probes", "sweep_curvature", "sweep_wd")

pytestmark = pytest.mark.slow  # ~2 min on one thread: four real runs with every analysis


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report") / "sweep"
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "GROKEDGE_TORCH_THREADS": "1",
    }
    args = [*OVERRIDES, "seed=1,2", "optimizer.weight_decay=0,1", f"hydra.sweep.dir={root}"]
    done = subprocess.run(
        [sys.executable, "-m", "grokedge.train", "-m", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # A job that failed (the summary another part of grokedge writes on failure) and one
    # killed before its summary: both must be listed, neither may break the report.
    failed = root / "4"
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra" / "overrides.yaml").write_text("- seed=3\n- optimizer.weight_decay=1\n")
    (failed / "summary.json").write_text(json.dumps({"status": "failed", "error": "boom"}))
    killed = root / "5"
    (killed / ".hydra").mkdir(parents=True)
    (killed / ".hydra" / "overrides.yaml").write_text("- seed=4\n- optimizer.weight_decay=1\n")
    (killed / "metrics.jsonl").write_text('{"step": 49, "train/batch_loss": 2.5}\n')
    return root


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _jobs(sweep: Path) -> list[Path]:
    return [sweep / str(i) for i in range(4)]


def _omega(job: Path) -> float:
    lines = (job / ".hydra" / "overrides.yaml").read_text().splitlines()
    (o,) = [line for line in lines if line.startswith("- optimizer.weight_decay=")]
    return float(o.split("=")[1])


def _table_rows(markdown: str, title_start: str) -> list[list[str]]:
    """The body rows of the first table whose title line starts with ``title_start``."""
    lines = markdown.splitlines()
    i = next(n for n, line in enumerate(lines) if line.lstrip("# ").startswith(title_start))
    rows = []
    for line in lines[i + 4 :]:  # title, blank, header, separator
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def _table_columns(markdown: str, title_start: str) -> list[str]:
    """The header of the first table whose title line starts with ``title_start``."""
    lines = markdown.splitlines()
    i = next(n for n, line in enumerate(lines) if line.lstrip("# ").startswith(title_start))
    return [c.strip() for c in lines[i + 2].strip("|").split(" | ")]


def _num(cell: str) -> float:
    return float(cell.split("±")[0].strip())


def _png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000, path


@pytest.fixture(scope="module")
def sweep_report(sweep: Path) -> str:
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")  # conftest disables W&B; the report logs offline here
    mp.setenv("WANDB_SILENT", "true")
    try:
        assert report_main([str(sweep)]) == 0
    finally:
        mp.undo()
    return (sweep / "report" / "report.md").read_text()


def test_sweep_report_writes_every_file(sweep: Path, sweep_report: str) -> None:
    out = sweep / "report"
    for name in SWEEP_FIGURES:
        _png(out / f"{name}.png")
    for job in _jobs(sweep):
        for name in RUN_FIGURES:
            _png(out / "runs" / job.name / f"{name}.png")
        has_gapflow = any(
            k.startswith("gapflow/term") for row in _jsonl(job / "metrics.jsonl") for k in row
        )
        assert (out / "runs" / job.name / "gapflow.png").is_file() == has_gapflow
    if not any((out / "runs" / j.name / "gapflow.png").is_file() for j in _jobs(sweep)):
        assert "no gap-flow terms in this run" in sweep_report
    for name in SWEEP_FIGURES:  # every figure is linked from report.md
        assert f"]({name}.png)" in sweep_report


def test_failed_and_killed_jobs_are_listed(sweep_report: str) -> None:
    rows = _table_rows(sweep_report, "Failed jobs")
    assert {r[0] for r in rows} == {"4", "5"}
    assert any("boom" in r[2] for r in rows if r[0] == "4")
    assert any("no summary.json" in r[2] for r in rows if r[0] == "5")
    assert "A sweep of 6 job(s): 4 finished, 2 failed" in sweep_report


def test_ablation_tables_hold_each_runs_numbers(sweep: Path, sweep_report: str) -> None:
    sections = sweep_report.split("## Run `")[1:]
    assert len(sections) == 4
    for job, section in zip(_jobs(sweep), sections, strict=True):
        assert section.startswith(f"{job.name}`")
        ablations = [r for r in _jsonl(job / "analyses.jsonl") if r["analysis"] == "ablation"]
        assert ablations
        table = {(r[0], r[1]): r for r in _table_rows(section, "Ablation (edge")}
        # The two shrink controls beside the norm-matched one: Δacc and the paper's ratio.
        columns = _table_columns(section, "Ablation (edge")
        shrink = {
            key: (columns.index(f"{label} Δacc"), columns.index(f"{label} ratio"))
            for key, label in (("shrink", "shrink"), ("shrink_norm", "norm-equal shrink"))
        }
        assert columns.index("matched ratio") < min(min(v) for v in shrink.values())
        for a in ablations:
            row = table[(str(a["step"]), a["phase"])]
            assert math.isclose(_num(row[3]), a["edge"]["dacc"], abs_tol=6e-4)
            assert math.isclose(_num(row[2]), a["base_acc"], abs_tol=6e-4)
            for key, (dacc, ratio) in shrink.items():
                assert math.isclose(_num(row[dacc]), a[key]["dacc"], abs_tol=6e-5), key
                expected = abs(a["edge"]["dacc"]) / (abs(a[key]["dacc"]) + 1e-8)
                assert _num(row[ratio]) == pytest.approx(expected, rel=0.01, abs=0.06), key
        phase_columns = _table_columns(section, "Ablation by phase")
        assert {"shrink Δacc (mean)", "norm-equal shrink Δacc (mean)"} <= set(phase_columns)
        assert {"shrink ratio (median)", "norm-equal shrink ratio (median)"} <= set(phase_columns)


def test_ablation_rows_from_before_the_shrink_controls_render(tmp_path: Path) -> None:
    """Rows without ``shrink``/``shrink_norm`` (older runs) get "–" in those cells."""
    summary = {"random_mean": 0.001, "random_sd": 0.002, "ratio": 5.0, "z": 1.0}
    row = {
        "analysis": "ablation",
        "step": 100,
        "phase": "post",
        "edge_step": 100,
        "base_acc": 0.9,
        "edge": {"dacc": -0.2},
        "v1": {"dacc": -0.1},
        "bulk": {"dacc": -0.01},
        "acc_random": summary,
        "acc_matched": summary,
        "displacement": 1.5,
    }
    run = RunData(path=tmp_path, name="old", analyses=[row])
    for table in (ablation_table([row]), ablation_phase_table(run)):
        cells = dict(zip(table.columns, table.rows[0], strict=True))
        shrink = [c for c in cells if "shrink" in c]
        assert len(shrink) == 4 and all(cells[c] == "–" for c in shrink), cells
    assert ablation_figure(run, tmp_path / "ablation.png") is not None


def test_seed_table_aggregates_seeds_per_omega(sweep: Path, sweep_report: str) -> None:
    rows = _table_rows(sweep_report, "Across seeds")
    by_omega: dict[float, list[Path]] = {}
    for job in _jobs(sweep):
        by_omega.setdefault(_omega(job), []).append(job)
    for omega, jobs in by_omega.items():
        (row,) = [r for r in rows if f"optimizer.weight_decay={omega:g}," in r[0] + ","]
        assert row[1] == "1, 2"  # the two seeds, aggregated
        groks = [json.loads((j / "summary.json").read_text())["grok_step"] for j in jobs]
        assert _num(row[3]) == pytest.approx(statistics.fmean(groks), abs=0.5)
        final_acc = [
            [r["test/acc"] for r in _jsonl(j / "metrics.jsonl") if "test/acc" in r][-1]
            for j in jobs
        ]
        mean, sd = (float(x) for x in row[4].split("±"))
        assert mean == pytest.approx(statistics.fmean(final_acc), abs=6e-4)
        assert sd == pytest.approx(statistics.stdev(final_acc), abs=6e-4)
    assert any(r[0].startswith("**paper") and "-0.58 ± 0.09" in r for r in rows)
    columns = _table_columns(sweep_report, "Across seeds")
    assert {"shrink Δacc, late", "norm-equal shrink Δacc, late"} <= set(columns)


def test_wd_table_holds_the_last_read_outs(sweep: Path, sweep_report: str) -> None:
    rows = {r[0]: r for r in _table_rows(sweep_report, "Weight-decay intervention")}
    for omega in (0.0, 1.0):
        jobs = [j for j in _jobs(sweep) if _omega(j) == omega]
        norms = [
            [r["wd/theta_norm"] for r in _jsonl(j / "metrics.jsonl") if "wd/theta_norm" in r][-1]
            for j in jobs
        ]
        row = rows[f"{omega:g}"]
        assert row[1] == "2"
        assert _num(row[9]) == pytest.approx(statistics.fmean(norms), abs=6e-4)
        assert _num(row[10]) == {0.0: 40.4, 1.0: 15.3}[omega]  # the paper's ‖θ‖ beside it


def test_claims_md_fills_the_ablation_rows(sweep: Path, sweep_report: str) -> None:
    """report/claims.md: one row per claim; the sweep has ablation rows, so claims 4-6
    (beyond random, norm-matched and shrink controls) get a verdict, not "not tested"."""
    assert "[claims.md](claims.md)" in sweep_report
    md = (sweep / "report" / "claims.md").read_text()
    rows = {int(r[0].split(".")[0]): r for r in _table_rows(md, "Claims of the paper")}
    assert sorted(rows) == list(range(1, 12))
    for n in (4, 5, 6):
        definition, verdict = rows[n][1], rows[n][5].split("**")[1]
        assert verdict in {"holds", "not reproduced"}, rows[n]
        assert "edge Δacc" in rows[n][3] and rows[n][4] != "–", rows[n]
        # The ablation reads the analysed edge: the row names it, and says so when it is
        # not the paper's.
        assert definition in {"paper", "burn_in", "normalized"}, rows[n]
        assert ("judged under" in rows[n][5]) == (definition != "paper"), rows[n]


def test_report_runs_are_logged_to_wandb_beside_the_training_runs(
    sweep: Path, sweep_report: str
) -> None:
    for job in _jobs(sweep):
        runs = [read_offline_run(p) for p in sorted((job / "wandb").glob("offline-run-*"))]
        training = [r for r in runs if r.job_type != "report"]
        reports = [r for r in runs if r.job_type == "report"]
        assert len(training) == 1 and len(reports) == 1
        assert reports[0].group == training[0].group and reports[0].run_id != training[0].run_id
        (path,) = list(reports[0].dir.glob("run-*.wandb"))
        logged = {k for row in history_of(path) for k in row}
        assert {"report/figure/lifecycle", "report/figure/ablation"} <= logged
        assert {"report/table/ablation_by_phase", "report/table/ablation"} <= logged


def test_single_run_report(sweep: Path) -> None:
    job = _jobs(sweep)[0]
    assert report_main([str(job), "--no-wandb"]) == 0
    md = (job / "report" / "report.md").read_text()
    for name in RUN_FIGURES:
        _png(job / "report" / f"{name}.png")
    grok = json.loads((job / "summary.json").read_text())["grok_step"]
    assert f"grok step **{grok}**" in md
    probes = [r for r in _jsonl(job / "analyses.jsonl") if r["analysis"] == "probe"]
    table = {(r[0], r[1]): r for r in _table_rows(md, "Probes of depth")}
    for p in probes:
        linear = p["scores"][p["primary"]]["linear"]["mean"]
        assert _num(table[(str(p["step"]), p["phase"])][2]) == pytest.approx(linear, abs=6e-4)


def test_report_of_a_directory_without_runs_fails_cleanly(tmp_path: Path) -> None:
    assert report_main([str(tmp_path), "--no-wandb"]) == 2


def test_directory_of_sweeps_is_read_as_one_sweep(sweep: Path, tmp_path: Path) -> None:
    """Two multiruns side by side (one per preset, e.g. experiment=classes and
    experiment=classes_scan) are judged together: every job of both, named
    ``<sweep>/<job>``, each with its own figures under ``report/runs/<sweep>/<job>/``."""
    parent = tmp_path / "both"
    for name in ("first", "second"):
        shutil.copytree(sweep, parent / name, ignore=shutil.ignore_patterns("report"))
    collection = discover(parent)
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name != "report")
    assert collection.is_sweep
    assert sorted(r.name for r in collection.runs) == sorted(
        f"{s}/{j}" for s in ("first", "second") for j in jobs
    )
    assert len(collection.ok) == 2 * len(discover(sweep).ok) == 8
    assert report_main([str(parent), "--no-wandb"]) == 0
    md = (parent / "report" / "report.md").read_text()
    assert f"A sweep of {2 * len(jobs)} job(s): 8 finished" in md
    for name in ("first", "second"):
        _png(parent / "report" / "runs" / name / "0" / "lifecycle.png")
