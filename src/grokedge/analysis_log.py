"""Structured analysis results of a run: ``analyses.jsonl``, phases, W&B tables.

Scalars go to the loggers (``metrics.jsonl``, W&B); whatever does not fit one number a
step (full spectra, per-direction tables, ablation curves) is appended by the analysis
callbacks to ``<run_dir>/analyses.jsonl``, one JSON object a line::

    {"analysis": "gram_spectrum", "step": 600, "phase": "at", "grok_step": 600, ...}

``step`` is the optimizer step of the weights measured; ``phase`` is one of ``pre``,
``at``, ``post``, ``late`` (:class:`Phases`), relative to the run's own grok step;
``grok_step`` is the grok step known when the row was written (``null``: not grokked yet,
see :meth:`AnalysisLog.relabel`). Non-finite numbers are written as ``null`` so that the
file stays strict JSON. ``report.py`` reads this file only.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only

from grokedge.checks import not_allowed

ANALYSES_FILE = "analyses.jsonl"

PRE, AT, POST, LATE = "pre", "at", "post", "late"
PHASES = (PRE, AT, POST, LATE)

DEFAULT_AT_INTERVALS = 1
"""Half-width of ``at`` when none is given: one Gram interval either side of the grok step."""
DEFAULT_POST_INTERVALS = 10
"""End of ``post`` when none is given: ten Gram intervals after the grok step."""


@dataclass(frozen=True)
class Phases:
    """Phase of a step relative to the run's grok step g (all offsets in optimizer steps).

    - ``pre``:  step < g − at
    - ``at``:   g − at <= step <= g + at
    - ``post``: g + at < step <= g + post
    - ``late``: step > g + post

    While the grok step is unknown (``None``: not detected yet, or never) every step is
    ``pre``: the run has not grokked by then. Rows written in that state carry
    ``grok_step: null`` and are relabelled once the grok step is known (see
    :meth:`AnalysisLog.relabel`), because detection lags the transition (a window just
    before the grok step belongs to ``at``).

    Example:
        >>> Phases(at=100, post=1000).label(550, grok_step=600)
        'at'
    """

    at: int
    post: int

    def __post_init__(self) -> None:
        if self.at < 0 or self.post < self.at:
            raise ValueError(f"phases need 0 <= at <= post, got at={self.at}, post={self.post}")

    @classmethod
    def around(
        cls, interval: int, at: int | None = None, post: int | None = None, key: str = "phases"
    ) -> Phases:
        """The run's phases for a Gram ``interval`` (optimizer steps): ``at`` and ``post``
        as given, else one and ten intervals (a default ``post`` no shorter than ``at``);
        a ``post`` given below ``at`` is a ValueError naming ``key``.phase_post."""
        at = DEFAULT_AT_INTERVALS * interval if at is None else at
        if post is None:
            post = max(DEFAULT_POST_INTERVALS * interval, at)
        elif post < at:
            raise not_allowed(f"{key}.phase_post", post, f"an integer >= phase_at ({at})")
        return cls(at=at, post=post)

    def label(self, step: int, grok_step: int | None) -> str:
        if grok_step is None or step < grok_step - self.at:
            return PRE
        if step <= grok_step + self.at:
            return AT
        if step <= grok_step + self.post:
            return POST
        return LATE


def jsonable(value: Any) -> Any:
    """``value`` as strict JSON: tensors and arrays to lists, NaN/inf to ``None``."""
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


class AnalysisLog:
    """Appends analysis rows to ``<run_dir>/analyses.jsonl`` (rank zero only).

    Each row is written and flushed by one ``open(..., "a")``, so several callbacks can
    share the file and a killed run keeps every row written before the kill.

    Args:
        run_dir: the run directory (in a Lightning hook: ``trainer.default_root_dir``).
        enabled: write at all (default: this is global rank zero).

    Example:
        >>> log = AnalysisLog("outputs/run")  # doctest: +SKIP
        >>> log.write("gram_spectrum", step=600, phase="at", grok_step=600, sigma=[2.1, 0.4])
    """

    def __init__(self, run_dir: str | Path, enabled: bool | None = None) -> None:
        self.path = Path(run_dir) / ANALYSES_FILE
        self.enabled = (rank_zero_only.rank == 0) if enabled is None else enabled

    def write(
        self, analysis: str, step: int, phase: str, grok_step: int | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Append ``{"analysis", "step", "phase", "grok_step", **fields}``; returns the row."""
        row = jsonable(
            {"analysis": analysis, "step": int(step), "phase": phase, "grok_step": grok_step}
            | fields
        )
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, allow_nan=False) + "\n")
        return row

    def rows(self, analyses: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """The rows on disk (of ``analyses`` only, if given), in the order written."""
        return read_analyses(self.path.parent, analyses)

    def relabel(
        self, analyses: Iterable[str], grok_step: int, label: Callable[[int, int], str]
    ) -> int:
        """Give the grok step, and the phase it implies, to rows written before it was known.

        Rows of ``analyses`` with ``grok_step: null`` get ``grok_step`` and
        ``phase = label(step, grok_step)``; every other line is kept byte for byte. The
        file is rewritten atomically (temporary file + ``os.replace``). Returns the number
        of rows changed (0 on other ranks or without a file).
        """
        if not self.enabled or not self.path.is_file():
            return 0
        names = set(analyses)
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        changed = 0
        out = []
        for line in lines:
            if line.strip():
                row = json.loads(line)
                if row.get("analysis") in names and row.get("grok_step") is None:
                    row["grok_step"] = int(grok_step)
                    row["phase"] = label(int(row["step"]), int(grok_step))
                    line = json.dumps(row, allow_nan=False) + "\n"
                    changed += 1
            out.append(line)
        if changed:
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(out), encoding="utf-8")
            os.replace(tmp, self.path)
        return changed


def unlabelled_line(line: str) -> str:
    """An ``analyses.jsonl`` line as it was before :meth:`AnalysisLog.relabel` gave it a
    grok step: a row with ``grok_step`` set gets ``null`` and phase ``pre`` (what
    :meth:`Phases.label` says without a grok step); any other line is returned unchanged,
    byte for byte.

    For a resumed run whose checkpoint was saved before the grok step was known: its rows
    up to the checkpoint are carried over as they were at the save
    (:func:`grokedge.resume.carry_run_files`), whatever the interrupted run relabelled
    afterwards, and the resumed run relabels them itself.
    """
    if not line.strip():
        return line
    row = json.loads(line)
    if row.get("grok_step") is None:
        return line
    row["grok_step"], row["phase"] = None, PRE
    return json.dumps(row, allow_nan=False) + "\n"


def read_analyses(
    run_dir: str | Path, analyses: Iterable[str] | None = None
) -> list[dict[str, Any]]:
    """Rows of ``<run_dir>/analyses.jsonl`` (of ``analyses`` only, if given); [] if absent."""
    path = Path(run_dir) / ANALYSES_FILE
    if not path.is_file():
        return []
    names = None if analyses is None else set(analyses)
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if names is None or r.get("analysis") in names]


def _wandb_disabled(logger: Any) -> bool:
    if os.environ.get("WANDB_MODE", "").lower() == "disabled":
        return True
    init = getattr(logger, "_wandb_init", None) or {}
    return str(init.get("mode", "")).lower() == "disabled"


def wandb_loggers(trainer: Any) -> list[Any]:
    """The trainer's active ``WandbLogger`` s ([] without W&B or under ``WANDB_MODE=disabled``)."""
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover - wandb is a dependency
        return []
    return [
        logger
        for logger in getattr(trainer, "loggers", [])
        if isinstance(logger, WandbLogger) and not _wandb_disabled(logger)
    ]


def log_table(
    trainer: Any, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int
) -> None:
    """Log a ``wandb.Table`` under ``key`` at ``step`` to every active W&B logger.

    A no-op without a ``WandbLogger`` and under ``WANDB_MODE=disabled``; rank zero only
    (``WandbLogger.log_table`` is rank-zero).
    """
    data = [[jsonable(v) for v in row] for row in rows]
    for logger in wandb_loggers(trainer):
        logger.log_table(key=key, columns=list(columns), data=data, step=int(step))


def log_scalars(
    trainer: Any,
    pl_module: Any,
    values: Mapping[str, float | None],
    direct: bool = False,
    step: int | None = None,
) -> None:
    """Log the finite ``values`` at ``step`` (None: ``global_step``): through
    ``pl_module.log_scalars`` (GrokModule) in hooks where Lightning allows ``self.log``,
    else (``direct``, an explicit ``step``, or a module without it) straight to the
    trainer's loggers. Undefined read-outs (None, NaN) are left out."""
    finite = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
    if not finite:
        return
    if direct or step is not None or not hasattr(pl_module, "log_scalars"):
        for logger in trainer.loggers:
            logger.log_metrics(finite, step=trainer.global_step if step is None else step)
    else:
        pl_module.log_scalars(finite)
