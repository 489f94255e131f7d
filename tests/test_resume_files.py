"""A resumed run's directory is whole (issue 20): what ``resume=`` carries over.

Fast tests of ``resume.carry_run_files`` on hand-made checkpoints and run files (every
expected line is written here, not produced by the code under test), of the summary of
the directory resumed from, and one short real run that checks ``RunCheckpoint``: a
checkpoint at an evaluation step holds that evaluation. The SIGKILL drills with every
analysis are in tests/test_drills.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from grokedge.analysis_log import AnalysisLog, Phases, read_analyses, unlabelled_line
from grokedge.reporting.discover import discover
from grokedge.resume import carry_run_files
from grokedge.run_files import MetricHistoryLogger, read_metrics, read_summary, write_summary
from grokedge.train import build, compose, fit

STEP = 40  # the hand-made checkpoint's step


def _metric_lines(steps: list[int]) -> list[str]:
    return [json.dumps({"step": s, "test/acc": s / 100, f"m{s}": 1.0}) + "\n" for s in steps]


def _analysis_lines(steps: list[int], grok: int | None) -> list[str]:
    phase = "pre" if grok is None else Phases(at=10, post=100).label
    return [
        json.dumps(
            {
                "analysis": "probe",
                "step": s,
                "phase": phase if isinstance(phase, str) else phase(s, grok),
                "grok_step": grok,
                "r2": 0.5,
            }
        )
        + "\n"
        for s in steps
    ]


def _killed_run(
    root: Path,
    kept: tuple[list[str], list[str]],
    extra: tuple[list[str], list[str]],
    grok_at_save: int | None = None,
    stamp: bool = True,
) -> tuple[Path, Path]:
    """A run directory whose checkpoint at STEP recorded ``kept`` (metrics, analyses lines)
    and whose files then got ``extra`` lines (written after the save, before the kill)."""
    run = root / "killed"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(kept[0] + extra[0]))
    (run / "analyses.jsonl").write_text("".join(kept[1] + extra[1]))
    grokedge = {"task": "dyck", "model": "m", "resumed_from": []}
    if stamp:
        grokedge |= {
            "run_dir": str(run),
            "lines": {"metrics.jsonl": len(kept[0]), "analyses.jsonl": len(kept[1])},
        }
    ckpt = run / "checkpoints" / "last.ckpt"
    torch.save({"global_step": STEP, "grok": {"step": grok_at_save}, "grokedge": grokedge}, ckpt)
    return run, ckpt


def test_a_new_directory_starts_with_the_rows_up_to_the_checkpoint(tmp_path: Path) -> None:
    kept = (_metric_lines([0, 20, 40]), _analysis_lines([20, 40], None))
    extra = (_metric_lines([50]), _analysis_lines([50], None))
    killed, ckpt = _killed_run(tmp_path, kept, extra)
    new = tmp_path / "resumed"
    resumed = carry_run_files(ckpt, new)
    assert (new / "metrics.jsonl").read_text() == "".join(kept[0])
    assert (new / "analyses.jsonl").read_text() == "".join(kept[1])
    assert resumed.lines == {"metrics.jsonl": 3, "analyses.jsonl": 2} and not resumed.missing
    assert [r["step"] for r in resumed.metrics] == [0, 20, 40]
    assert resumed.resumed_from == [
        {"run_dir": str(killed), "checkpoint": str(ckpt.resolve()), "step": STEP}
    ]
    # The killed directory is left as it was, but for its new summary.
    assert (killed / "metrics.jsonl").read_text() == "".join(kept[0] + extra[0])
    summary = read_summary(killed)
    assert summary["status"] == "interrupted" and summary["task"] == "dyck"
    assert summary["resumed_by"] == [str(new.resolve())] and summary["resumed_at_step"] == STEP


def test_resumed_in_place_the_files_are_cut_back_to_the_checkpoint(tmp_path: Path) -> None:
    kept = (_metric_lines([0, 20, 40]), _analysis_lines([20, 40], None))
    extra = (_metric_lines([50, 60]), _analysis_lines([50], None))
    killed, ckpt = _killed_run(tmp_path, kept, extra)
    # A crash's summary: stale once the run goes on here (the resumed run writes its own).
    write_summary(killed, {"task": "dyck", "status": "failed", "error": "RuntimeError: x"})
    carry_run_files(ckpt, killed)
    assert (killed / "metrics.jsonl").read_text() == "".join(kept[0])
    assert (killed / "analyses.jsonl").read_text() == "".join(kept[1])
    assert not (killed / "summary.json").exists()


def test_rows_relabelled_after_a_checkpoint_without_grok_step_are_restored(
    tmp_path: Path,
) -> None:
    """Saved before the grok step was known (rows null/"pre"); the killed run then
    detected it at 50 and relabelled them: the copy holds them as they were at the save."""
    at_save = _analysis_lines([20, 40], None)
    relabelled = _analysis_lines([20, 40], 50)
    assert relabelled != at_save  # the relabelling changed them (the check can fail)
    _, ckpt = _killed_run(tmp_path, (_metric_lines([40]), relabelled), ([], []), None)
    carry_run_files(ckpt, tmp_path / "resumed")
    assert (tmp_path / "resumed" / "analyses.jsonl").read_text() == "".join(at_save)


def test_rows_of_a_checkpoint_with_a_grok_step_are_copied_as_they_are(tmp_path: Path) -> None:
    rows = _analysis_lines([20, 40], 30)
    _, ckpt = _killed_run(tmp_path, (_metric_lines([40]), rows), ([], []), grok_at_save=30)
    carry_run_files(ckpt, tmp_path / "resumed")
    assert (tmp_path / "resumed" / "analyses.jsonl").read_text() == "".join(rows)


def test_unlabelled_line_is_the_line_as_written_before_the_relabelling(tmp_path: Path) -> None:
    log = AnalysisLog(tmp_path)
    phases = Phases(at=10, post=100)
    log.write("probe", 20, phases.label(20, None), None, r2=[0.5, None])
    before = (tmp_path / "analyses.jsonl").read_text()
    assert log.relabel(["probe"], 25, phases.label) == 1
    after = (tmp_path / "analyses.jsonl").read_text()
    assert json.loads(after)["phase"] == "at" and after != before
    assert unlabelled_line(after) == before
    assert unlabelled_line(before) == before


def test_a_missing_directory_is_warned_about_and_the_run_goes_on(tmp_path: Path) -> None:
    kept = (_metric_lines([0, 20, 40]), _analysis_lines([40], None))
    killed, ckpt = _killed_run(tmp_path, kept, ([], []))
    moved = tmp_path / "elsewhere.ckpt"
    ckpt.rename(moved)
    for name in ("metrics.jsonl", "analyses.jsonl", "checkpoints"):
        path = killed / name
        path.rmdir() if path.is_dir() else path.unlink()
    killed.rmdir()
    with pytest.warns(RuntimeWarning) as caught:
        resumed = carry_run_files(moved, tmp_path / "resumed")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert all(str(killed) in m and "missing" in m and "step 40" in m for m in messages)
    assert any("metrics.jsonl (missing; the checkpoint recorded 3 lines)" in m for m in messages)
    assert resumed.lines == {"metrics.jsonl": 0, "analyses.jsonl": 0}
    assert len(resumed.missing) == 2
    assert not (tmp_path / "resumed" / "metrics.jsonl").exists()


def test_a_shorter_file_is_carried_as_far_as_it_goes_and_warned_about(tmp_path: Path) -> None:
    kept = (_metric_lines([0, 20, 40]), _analysis_lines([40], None))
    killed, ckpt = _killed_run(tmp_path, kept, ([], []))
    (killed / "metrics.jsonl").write_text("".join(kept[0][:2]))
    with pytest.warns(
        RuntimeWarning, match=r"metrics.jsonl \(2 lines; the checkpoint recorded 3 lines\)"
    ):
        resumed = carry_run_files(ckpt, tmp_path / "resumed")
    assert resumed.lines["metrics.jsonl"] == 2


def test_a_checkpoint_without_the_record_is_warned_about(tmp_path: Path) -> None:
    _, ckpt = _killed_run(tmp_path, (_metric_lines([40]), []), ([], []), stamp=False)
    with pytest.warns(RuntimeWarning, match="records no run directory"):
        resumed = carry_run_files(ckpt, tmp_path / "resumed")
    assert resumed.source is None and resumed.lines == {}


def test_the_summary_of_the_directory_resumed_from(tmp_path: Path) -> None:
    kept = (_metric_lines([40]), [])
    killed, ckpt = _killed_run(tmp_path, kept, ([], []))
    write_summary(killed, {"task": "dyck", "status": "failed", "error": "RuntimeError: x"})
    carry_run_files(ckpt, tmp_path / "first")
    carry_run_files(ckpt, tmp_path / "second")  # resumed twice from the same checkpoint
    summary = read_summary(killed)
    assert summary["status"] == "interrupted" and summary["error"] == "RuntimeError: x"
    assert summary["resumed_by"] == [str((tmp_path / n).resolve()) for n in ("first", "second")]
    # A finished run (resumed to train longer) keeps its summary.
    write_summary(killed, {"task": "dyck", "status": "ok", "steps": STEP})
    carry_run_files(ckpt, tmp_path / "third")
    assert read_summary(killed) == {"task": "dyck", "status": "ok", "steps": STEP}


def test_the_metric_logger_starts_from_the_carried_rows(tmp_path: Path) -> None:
    logger = MetricHistoryLogger(tmp_path)
    carried = [{"step": 0, "a": 1.0}, {"step": 40, "a": 2.0, "b": 3.0}]
    logger.carry(carried, resumed_at=40)
    assert logger.last == {"a": 2.0, "b": 3.0}
    logger.log_metrics({"a": 9.0}, step=0)  # a start-up value, re-logged before the resume
    logger.log_metrics({"b": 4.0}, step=40)
    logger.finalize("success")
    assert read_metrics(tmp_path) == [{"step": 40, "b": 4.0}]
    assert logger.last == {"a": 2.0, "b": 4.0}


def test_a_report_over_a_sweep_skips_an_interrupted_run(tmp_path: Path) -> None:
    for name, status in (("0", "interrupted"), ("1", "ok")):
        (tmp_path / name).mkdir()
        write_summary(tmp_path / name, {"task": "dyck", "status": status, "reason": "why"})
    collection = discover(tmp_path)
    assert [r.name for r in collection.failed] == ["0"]
    assert collection.failed[0].failure == "why"


# -------------------------------------------------------- a checkpoint at an evaluation

QUICK = [
    "task=dyck",
    "logger=none",
    "callbacks=none",
    "torch_threads=1",
    "progress_bar.refresh_rate=0",
    "task.datamodule.ood_sequences=0",
    "task.datamodule.n_sequences=300",
    "task.eval_every=10",
    "checkpoint.every_n_train_steps=20",  # at an evaluation step, as 1,000 and 100
]


def test_a_checkpoint_at_an_evaluation_step_holds_the_evaluation(tmp_path: Path) -> None:
    """Lightning saves at train-batch end, before that step's evaluation, and a run resumed
    from it skips the evaluation; RunCheckpoint saves after it. Part (20 steps) + resumed
    (to 40) has every metric row, and the grok history, of an uninterrupted 40-step run."""

    def run(name: str, extra: list[str]) -> Path:
        run_dir = tmp_path / name
        fit(build(compose([*QUICK, *extra], run_dir), run_dir))
        return run_dir

    full = run("full", ["trainer.max_steps=40"])
    part = run("part", ["trainer.max_steps=20"])
    ckpt = part / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 20
    resumed = run("resumed", ["trainer.max_steps=40", f"resume={ckpt}"])
    evals = [r["step"] for r in read_metrics(full) if "test/acc" in r]
    assert evals == [10, 20, 30, 40]
    assert read_metrics(resumed) == read_metrics(full)
    assert read_analyses(resumed) == read_analyses(full) == []
    expected, got = read_summary(full), read_summary(resumed)
    for key in ("wall_s", "resumed_from"):
        expected.pop(key, None), got.pop(key)
    assert got == expected
    assert read_summary(part)["status"] == "ok"  # finished: not marked interrupted
