"""A run or sweep directory -> the runs in it, read from their plain files only.

A *run* directory holds ``summary.json``, ``metrics.jsonl``, ``analyses.jsonl`` and
(when launched by Hydra) ``.hydra/``. A *sweep* directory (Hydra's multirun directory, or
any directory of run directories) holds numbered (or named) run directories; a directory of
sweeps (one level more, e.g. one sweep per task beside each other) is read as one sweep
whose jobs are named ``<sweep>/<job>``. A job whose
``summary.json`` says ``"status": "failed"``, or that has no ``summary.json`` at all (killed,
crashed before the end), is kept and marked failed: the report lists it and skips it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from grokedge.analysis_log import ANALYSES_FILE, read_analyses
from grokedge.run_files import METRICS_FILE, SUMMARY_FILE
from grokedge.wandb_setup import SEED_KEYS, non_seed_overrides

RUN_MARKERS = (SUMMARY_FILE, METRICS_FILE, ANALYSES_FILE, ".hydra")
FAILED = "failed"
OK = "ok"


def is_run_dir(path: Path) -> bool:
    """``path`` holds one run's files (or at least Hydra's record of a started job)."""
    return path.is_dir() and any((path / m).exists() for m in RUN_MARKERS)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a torn last line of a killed run
                    break
    return rows


def _get(tree: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


@dataclass
class RunData:
    """One run directory, loaded.

    Attributes:
        path: the run directory.
        name: its name in the report (the job's subdirectory name, or the directory name).
        overrides: Hydra overrides of the job (``.hydra/overrides.yaml``; [] if absent).
        config: the composed config (``.hydra/config.yaml``; {} if absent).
        summary: ``summary.json`` (None if absent).
        metrics: the rows of ``metrics.jsonl``.
        analyses: the rows of ``analyses.jsonl``.
        failure: why the run counts as failed ("" if it did not fail).
    """

    path: Path
    name: str
    overrides: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    analyses: list[dict[str, Any]] = field(default_factory=list)
    failure: str = ""

    @property
    def failed(self) -> bool:
        return bool(self.failure)

    @property
    def grok_step(self) -> int | None:
        """The detected grok step (summary first, else the analysis rows), None if none."""
        if self.summary and self.summary.get("grok_step") is not None:
            return int(self.summary["grok_step"])
        for row in self.analyses:
            if row.get("grok_step") is not None:
                return int(row["grok_step"])
        return None

    @property
    def task(self) -> str:
        return str((self.summary or {}).get("task") or _get(self.config, "task.name") or "unknown")

    @property
    def weight_decay(self) -> float | None:
        """ω of the run: the config's, else the override's; None when unrecorded."""
        value = _get(self.config, "optimizer.weight_decay")
        if value is None:
            for o in self.overrides:
                if o.split("=", 1)[0] == "optimizer.weight_decay":
                    value = o.split("=", 1)[1]
        try:
            return None if value is None else float(value)
        except ValueError:
            return None

    @property
    def seed(self) -> int | None:
        value = self.config.get("seed")
        if value is None:
            for o in self.overrides:
                if o.split("=", 1)[0] in SEED_KEYS:
                    value = o.split("=", 1)[1]
        try:
            return None if value is None else int(value)
        except ValueError:
            return None

    @property
    def group(self) -> str:
        """The configuration without the seed: seeds of one group are aggregated."""
        config = non_seed_overrides(self.overrides)
        if config:
            return config
        omega = self.weight_decay
        return f"task={self.task}" + ("" if omega is None else f",ω={omega:g}")

    def rows(self, analysis: str) -> list[dict[str, Any]]:
        """The ``analyses.jsonl`` rows of one analysis, in order."""
        return [r for r in self.analyses if r.get("analysis") == analysis]

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric from ``metrics.jsonl`` (finite values only)."""
        steps, values = [], []
        for row in self.metrics:
            v = row.get(key)
            if v is not None and isinstance(v, int | float) and math.isfinite(v):
                steps.append(int(row["step"]))
                values.append(float(v))
        return steps, values

    def last(self, key: str) -> float | None:
        """The last logged value of a metric (metrics.jsonl; else summary.json)."""
        _, values = self.series(key)
        if values:
            return values[-1]
        v = (self.summary or {}).get(key)
        return float(v) if isinstance(v, int | float) and math.isfinite(v) else None

    def metric_keys(self, prefix: str) -> list[str]:
        """The metric names logged under ``prefix/``, sorted."""
        return sorted({k for row in self.metrics for k in row if k.startswith(prefix + "/")})


def load_run(path: Path, name: str | None = None) -> RunData:
    """Load one run directory; a missing or failed summary marks the run failed."""
    path = Path(path)
    run = RunData(path=path, name=name or path.name)
    hydra = path / ".hydra"
    if (hydra / "overrides.yaml").is_file():
        run.overrides = [
            str(o) for o in (yaml.safe_load((hydra / "overrides.yaml").read_text()) or [])
        ]
    if (hydra / "config.yaml").is_file():
        run.config = yaml.safe_load((hydra / "config.yaml").read_text()) or {}
    summary_path = path / SUMMARY_FILE
    if summary_path.is_file():
        try:
            run.summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError as e:
            run.failure = f"summary.json unreadable ({e.msg})"
    run.metrics = _read_jsonl(path / METRICS_FILE)
    run.analyses = read_analyses(path)  # [] when the run wrote none
    if run.summary is None and not run.failure:
        run.failure = "no summary.json (still running, killed, or crashed before the end)"
    elif run.summary is not None and run.summary.get("status", OK) != OK:
        # "failed", or "interrupted" (killed, then resumed into another directory, which
        # holds the whole run): not a finished run of its own.
        status = run.summary.get("status")
        run.failure = str(
            run.summary.get("error") or run.summary.get("reason") or f"status: {status}"
        )
    return run


def _job_order(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (1 << 30, path.name)


def _jobs(sweep: Path) -> list[Path]:
    """The run directories of a sweep directory, in job order (its report/ left out)."""
    return sorted(
        (p for p in sweep.iterdir() if is_run_dir(p) and p.name != "report"), key=_job_order
    )


@dataclass
class Collection:
    """What the report was pointed at: one run, or a sweep of runs."""

    root: Path
    runs: list[RunData]
    is_sweep: bool

    @property
    def ok(self) -> list[RunData]:
        return [r for r in self.runs if not r.failed]

    @property
    def failed(self) -> list[RunData]:
        return [r for r in self.runs if r.failed]

    def groups(self) -> dict[str, list[RunData]]:
        """Finished runs by configuration without the seed, in job order.

        Keys are the overrides in which the configurations differ (see :meth:`common`):
        a legend or a table row then names what was swept, not every shared override.
        """
        full: dict[str, list[RunData]] = {}
        for run in self.ok:
            full.setdefault(run.group, []).append(run)
        shared = set(self.common())
        out: dict[str, list[RunData]] = {}
        for group, runs in full.items():
            label = ",".join(o for o in group.split(",") if o not in shared) or "all runs"
            out[label] = runs
        return out

    def common(self) -> list[str]:
        """The overrides (without the seed) that every finished run's group shares."""
        parts = [run.group.split(",") for run in self.ok]
        if len({run.group for run in self.ok}) < 2:
            return []  # one configuration: its full name is the label
        return [o for o in parts[0] if all(o in p for p in parts[1:])]


def discover(root: str | Path) -> Collection:
    """A run directory, or a directory of run directories (a sweep), loaded.

    Raises FileNotFoundError when ``root`` holds neither.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    if (root / SUMMARY_FILE).is_file() or (root / METRICS_FILE).is_file():
        return Collection(root, [load_run(root)], is_sweep=False)
    jobs = _jobs(root)
    if jobs:
        return Collection(root, [load_run(p) for p in jobs], is_sweep=True)
    # A directory of sweeps: several multiruns judged together (a claim over tasks that
    # need different presets, e.g. experiment=classes and experiment=classes_scan).
    sweeps = sorted(p for p in root.iterdir() if p.is_dir() and p.name != "report")
    runs = [load_run(job, f"{s.name}/{job.name}") for s in sweeps for job in _jobs(s)]
    if runs:
        return Collection(root, runs, is_sweep=True)
    if is_run_dir(root):  # only .hydra/: a job that died at once
        return Collection(root, [load_run(root)], is_sweep=False)
    raise FileNotFoundError(
        f"{root} holds no run (summary.json, metrics.jsonl, analyses.jsonl or .hydra/), no "
        "run directories and no sweep directories"
    )
