"""analyses.jsonl rows, phase labels and their relabelling, W&B tables as a no-op."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import WandbLogger

from grokedge.analysis_log import AnalysisLog, Phases, jsonable, log_table, read_analyses


def test_phases_relative_to_the_grok_step() -> None:
    phases = Phases(at=100, post=1000)
    labels = {s: phases.label(s, 600) for s in (0, 499, 500, 600, 700, 701, 1600, 1601)}
    assert labels == {
        0: "pre",
        499: "pre",
        500: "at",
        600: "at",
        700: "at",
        701: "post",
        1600: "post",
        1601: "late",
    }
    assert phases.label(5000, None) == "pre"  # not grokked (yet)
    with pytest.raises(ValueError, match="at <= post"):
        Phases(at=10, post=5)


def test_rows_are_strict_json_and_relabelled_once_the_grok_step_is_known(tmp_path: Path) -> None:
    log = AnalysisLog(tmp_path)
    phases = Phases(at=100, post=1000)
    log.write("spec", 500, phases.label(500, None), None, sigma=torch.tensor([2.0, math.nan]))
    log.write("other", 500, "pre", None, value=math.inf)
    log.write("spec", 800, phases.label(800, 600), 600, sigma=[1.0])
    text = (tmp_path / "analyses.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    rows = read_analyses(tmp_path)
    assert rows[0] == {
        "analysis": "spec",
        "step": 500,
        "phase": "pre",
        "grok_step": None,
        "sigma": [2.0, None],
    }
    assert rows[1]["value"] is None

    assert log.relabel(["spec"], 600, phases.label) == 1
    rows = read_analyses(tmp_path)
    assert rows[0]["phase"] == "at" and rows[0]["grok_step"] == 600
    assert rows[1]["grok_step"] is None  # another analysis' rows are left alone
    assert rows[2]["phase"] == "post"
    assert log.relabel(["spec"], 600, phases.label) == 0
    assert [r["step"] for r in log.rows(["spec"])] == [500, 800]
    assert not list(tmp_path.glob("*.tmp"))


def test_disabled_log_writes_nothing(tmp_path: Path) -> None:
    log = AnalysisLog(tmp_path, enabled=False)
    row = log.write("spec", 1, "pre", x=1.5)
    assert row["x"] == 1.5
    assert not (tmp_path / "analyses.jsonl").exists()
    assert log.relabel(["spec"], 1, Phases(0, 0).label) == 0


def test_jsonable() -> None:
    assert jsonable({"a": (1, 2.0, float("nan")), "b": torch.tensor(3)}) == {
        "a": [1, 2.0, None],
        "b": 3,
    }
    json.dumps(jsonable([torch.ones(2, 2)]), allow_nan=False)


class RecordingWandbLogger(WandbLogger):
    """A WandbLogger that never starts W&B: it records what would be logged."""

    def __init__(self, mode: str | None = None) -> None:
        super().__init__(mode=mode)
        self.tables: list[tuple] = []

    def log_table(self, key, columns=None, data=None, dataframe=None, step=None) -> None:
        self.tables.append((key, columns, data, step))


class FakeTrainer:
    def __init__(self, loggers) -> None:
        self.loggers = loggers


def test_tables_go_to_wandb_only_when_it_is_active(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [[1, "pre", math.nan]]
    log_table(FakeTrainer([]), "edge/t", ["step", "phase", "x"], rows, 5)  # no W&B: no-op

    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = RecordingWandbLogger()
    log_table(FakeTrainer([logger]), "edge/t", ["step", "phase", "x"], rows, 5)
    assert logger.tables == []

    monkeypatch.setenv("WANDB_MODE", "offline")
    log_table(FakeTrainer([logger]), "edge/t", ["step", "phase", "x"], rows, 5)
    assert logger.tables == [("edge/t", ["step", "phase", "x"], [[1, "pre", None]], 5)]
    disabled = RecordingWandbLogger(mode="disabled")
    log_table(FakeTrainer([disabled]), "edge/t", ["x"], [[1]], 5)
    assert disabled.tables == []
