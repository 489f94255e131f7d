"""The plain files every run directory keeps, whatever W&B does.

- ``metrics.jsonl``: the full history, one ``{"step": s, "<metric>": value, ...}`` a line;
- ``summary.json``: ``grok_step``, ``steps``, ``wall_s``, ``n_params`` and the last value
  of every logged scalar under its metric name.
"""

from __future__ import annotations

import json
import math
from argparse import Namespace
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def _scalar(value: Any) -> float:
    return float(value.item() if hasattr(value, "item") else value)


class MetricHistoryLogger(Logger):
    """A Lightning logger appending every logged scalar to ``<run_dir>/metrics.jsonl``.

    Lines are flushed as they are written, so the history of a killed run is on disk up
    to its last logged step.

    Example:
        >>> logger = MetricHistoryLogger("outputs/run")  # doctest: +SKIP
        >>> Trainer(logger=[logger, WandbLogger(...)])    # doctest: +SKIP
    """

    def __init__(self, run_dir: str | Path) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self.last: dict[str, float] = {}
        self._file = None

    @property
    def name(self) -> str:
        return "metrics"

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self.run_dir)

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kw: Any) -> None:
        """The run's configuration lives in ``.hydra/``; nothing to add here."""

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        row = {k: _scalar(v) for k, v in metrics.items() if k != "epoch"}
        if not row:
            return
        self.last.update(row)
        if self._file is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        self._file.write(json.dumps({"step": step, **row}, allow_nan=True) + "\n")
        self._file.flush()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """The rows of a run's ``metrics.jsonl``, in the order they were logged."""
    path = Path(run_dir) / METRICS_FILE
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_summary(run_dir: str | Path, summary: dict[str, Any]) -> Path:
    """Write ``summary.json`` (NaN/inf as null: it must stay valid JSON)."""

    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and not math.isfinite(v) else v

    path = Path(run_dir) / SUMMARY_FILE
    path.write_text(json.dumps({k: clean(v) for k, v in summary.items()}, indent=2) + "\n")
    return path
