"""RunFiles: one run directory for any Trainer (issue 22, items 4 and 5), and the
ablation ratio against an unresolved control (item 8)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning

from grokedge.adapters import FunctionalAdapter
from grokedge.analysis_log import read_analyses
from grokedge.callbacks import AblationCallback, EdgeAlignmentCallback, GramCallback, RunFiles
from grokedge.closing_summary import closing_lines
from grokedge.experiments.ablation import (
    RATIO_FLOOR,
    ablation_summary,
    accuracy_resolution,
    control_resolved,
    paper_ratio,
)
from grokedge.report import main as report_main
from grokedge.run_files import read_metrics, read_summary

REPO = Path(__file__).resolve().parents[1]
STEPS = 20

pytestmark = pytest.mark.filterwarnings("ignore", category=ConvergenceWarning)


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("own_module", REPO / "scripts" / "own_module.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _own_run(example, run_dir: Path) -> None:
    """A plain Trainer, logger=False, RunFiles plus the edge and the ablation."""
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    module = FunctionalAdapter.attach(
        example.SortingTransformer(),
        F.nll_loss,
        inputs=("input", "decoder_input"),
        hidden="model.transformer.decoder.layers",
    )
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        logger=False,
        callbacks=[
            RunFiles(run_dir),
            GramCallback(interval=5, window=3, top_k=2),
            EdgeAlignmentCallback(),
            AblationCallback(n_random=2, n_sequences=32, every=10, at_end=True),
        ],
        val_check_interval=10,
        check_val_every_n_epoch=None,
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=example.SortingData(0))


def test_own_module_run_directory_feeds_the_report(example, tmp_path, capsys):
    threads = torch.get_num_threads()
    run_dir = tmp_path / "run"
    try:
        _own_run(example, run_dir)
        first = capsys.readouterr().out
        rows_first = read_analyses(run_dir)
        metrics_first = read_metrics(run_dir)
        _own_run(example, run_dir)  # the same directory again
        second = capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
    summary = read_summary(run_dir)
    metrics = read_metrics(run_dir)
    rows = read_analyses(run_dir)
    assert summary["status"] == "ok" and summary["steps"] == STEPS
    assert summary["grok_step"] is None and "wall_s" in summary and summary["n_params"] > 0
    # Every scalar reached metrics.jsonl without a logger; the summary holds the last value.
    last: dict[str, float] = {}
    for row in metrics:
        last.update({k: v for k, v in row.items() if k != "step"})
    for name in ("train/loss", "test/acc", "gram/sigma_1", "ablation/edge_dacc"):
        assert name in last
    for name, value in last.items():
        expected = None if isinstance(value, float) and not math.isfinite(value) else value
        assert summary[name] == expected, name
    # Fresh: the second run replaced the first run's rows instead of appending to them.
    assert {r["analysis"] for r in rows} >= {"gram_spectrum", "ablation", "edge_summary"}
    assert len(rows) == len(rows_first) and len(metrics) == len(metrics_first)
    assert [r["step"] for r in metrics] == [r["step"] for r in metrics_first]
    assert max(r["step"] for r in metrics) == STEPS
    # The closing lines, on stdout, for both runs.
    for out in (first, second):
        assert "grokedge: did not grok in 20 steps" in out
        assert f"grokedge: run directory {run_dir.resolve()}" in out
        assert f"grokedge: report: python -m grokedge.report {run_dir.resolve()}" in out
        assert "grokedge: edge normalized: flip " in out
    # The report reads it as a finished run, not "failed: no summary.json".
    assert report_main([str(run_dir), "--no-wandb"]) == 0
    text = (run_dir / "report" / "report.md").read_text()
    assert "no summary.json" not in text


def test_closing_lines_against_the_row_and_the_scalars():
    d = str(Path("/tmp/x").resolve())
    tail = [f"grokedge: run directory {d}", f"grokedge: report: python -m grokedge.report {d}"]
    row = {
        "interval": 10,
        "definitions": {
            "normalized": {"flip": 200, "flip_latest": 190, "align": None},
            "paper": {"flip": 30, "flip_latest": 30, "align": 50},
        },
        "events": [
            {"event": "flip", "definition": "paper", "step": 30, "window_artifact": True},
            {"event": "flip", "definition": "normalized", "step": 200, "window_artifact": False},
        ],
        "intervals": {
            "10": {"definitions": {"paper": {"flip": 30}}},
            "20": {"definitions": {"paper": {"flip": 60}, "normalized": {"flip": None}}},
        },
    }
    assert closing_lines("/tmp/x", 150, 400, {"train/loss": 0.1}, row) == [
        "grokedge: grokked at step 150",
        "grokedge: edge paper: flip 30 (window artifact), align 50; flip at N=20: 60",
        "grokedge: edge normalized: flip 200, align -; flip at N=20: -",
        *tail,
    ]
    # Without the row (a failed run): the scalars, derived N included.
    last = {"edge/flip_step_paper": 30.0, "edge/flip_step_paper_n20": 60.0}
    assert closing_lines("/tmp/x", None, 7, last, None) == [
        "grokedge: did not grok in 7 steps",
        "grokedge: edge paper: flip 30, align -; flip at N=20: 60",
        *tail,
    ]
    assert closing_lines("/tmp/x", None, 7, {}, None) == [
        "grokedge: did not grok in 7 steps",
        "grokedge: edge: no flip or alignment measured (no EdgeAlignmentCallback)",
        *tail,
    ]
    # A run that failed says so, and does not blame a missing callback for the missing edge.
    error = "ValueError: ProbeCallback: the DataModule has no probe_targets(batch)\nmore"
    assert closing_lines("/tmp/x", None, 0, {}, None, error) == [
        "grokedge: failed at step 0: ValueError: ProbeCallback: the DataModule has no "
        "probe_targets(batch)",
        *tail,
    ]


def test_cli_run_ends_with_the_closing_lines(tmp_path, capsys):
    from grokedge.train import build, compose, fit

    run_dir = tmp_path / "cli"
    overrides = [
        "task=modular",
        "trainer.max_steps=40",
        "task.eval_every=20",
        "checkpoint.every_n_train_steps=20",
        "logger=none",
        "callbacks=gram",
    ]
    cfg = compose(overrides, run_dir)
    summary = fit(build(cfg, run_dir))
    out = capsys.readouterr().out.splitlines()
    tail = out[-6:]
    # callbacks=gram has the EdgeAlignmentCallback: one line per definition.
    for d in ("paper", "burn_in", "normalized"):
        assert any(line.startswith(f"grokedge: edge {d}: flip ") for line in tail), tail
    grok = (
        f"grokedge: grokked at step {summary['grok_step']}"
        if summary["grok_step"] is not None
        else "grokedge: did not grok in 40 steps"
    )
    assert grok in tail
    d = run_dir.resolve()
    assert tail[-2:] == [
        f"grokedge: run directory {d}",
        f"grokedge: report: python -m grokedge.report {d}",
    ]
    assert json.loads((run_dir / "summary.json").read_text()) == summary


# ---------------------------------------------------------------- ratios vs controls


def test_ratio_against_a_control_below_resolution_is_unresolved():
    # Brute force: 64 labelled positions, so one example's quantum is 1/64.
    batch = {"labels": torch.tensor([[1, 2, -100, -100]] * 32)}
    q = accuracy_resolution(batch)
    assert q == 1 / 64
    # Controls that changed nothing: no ratio, flagged, both Δ kept.
    s = ablation_summary(-0.094, [0.0, 0.0, 0.0], q)
    assert math.isnan(s["ratio"]) and s["ratio_resolved"] is False
    assert s["delta_edge"] == -0.094 and s["random_mean"] == 0.0
    # Without a resolution an exact 0 is still unresolved (no 1e-8 floor: no 9.4e6).
    assert math.isnan(paper_ratio(-0.094, 0.0))
    # A mean below one quantum (one control of 20 moved one example) is unresolved.
    assert not control_resolved(q / 20, q)
    # A resolvable control: the ratio, |Δ_edge| / |Δ_control|.
    s = ablation_summary(-0.25, [-2 * q, -2 * q], q)
    assert s["ratio_resolved"] is True
    assert s["ratio"] == pytest.approx(0.25 / (2 * q + RATIO_FLOOR), rel=1e-12)


def test_report_shows_an_unresolved_ratio_with_both_numbers():
    from grokedge.reporting.causal_claims import _ratio
    from grokedge.reporting.table_format import ratio_cell

    unresolved = "unresolved (edge Δ -0.0940, control Δ 0.0000 below resolution)"
    assert ratio_cell(math.nan, -0.094, 0.0, False) == unresolved
    assert ratio_cell(None, -0.094, 0.0) == unresolved  # a row without the flag
    assert _ratio(-0.094, 0.0) == unresolved
    # Resolved: the number, |Δ_edge| / |Δ_control| computed here by hand.
    assert ratio_cell(0.094 / 0.0313, -0.094, 0.0313, True) == f"{0.094 / 0.0313:.1f}"
    assert _ratio(-0.094, 0.0313) == f"{0.094 / 0.0313:.1f}"
