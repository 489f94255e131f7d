"""Checkpoints and resuming: a resumed run's directory is whole.

A resumed run's directory is whole (:func:`carry_run_files`): every checkpoint records its
run directory and how many lines ``metrics.jsonl`` and ``analyses.jsonl`` held when it was
saved (``checkpoint["grokedge"]``, :class:`RunIdentity`); ``resume=`` copies exactly those
first lines into the new run directory before training (in place: cuts the files back to
them), so its files hold the rows up to the checkpoint followed by the resumed run's, and
its ``summary.json`` is an uninterrupted run's (but for ``wall_s`` and ``resumed_from``:
``[{"run_dir", "checkpoint", "step"}, ...]``, one entry per resume, oldest first). The
directory resumed from gets a ``summary.json`` with ``"status": "interrupted"``,
``reason``, ``resumed_by`` (the run directories that resumed it) and ``resumed_at_step``
(unless it finished: ``"status": "ok"`` stays as it is).

:class:`RunIdentity` stamps the run's task and model in every checkpoint, so that
``resume=`` refuses another task's; :class:`RunCheckpoint` saves a step's checkpoint after
that step's evaluation.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from grokedge.analysis_log import ANALYSES_FILE, unlabelled_line
from grokedge.run_files import (
    METRICS_FILE,
    STATUS_INTERRUPTED,
    STATUS_OK,
    SUMMARY_FILE,
    read_summary,
    write_summary,
)

# ------------------------------------------------------------------ checkpoint identity


class RunIdentity(Callback):
    """Stamps each checkpoint with the run's task and model, so that ``resume=`` with
    another task's checkpoint is refused by name, and with where its run files stood, so
    that a resumed run's directory is whole (:func:`carry_run_files`).

    ``checkpoint["grokedge"]``: ``task``, ``model``; with ``run_dir``: ``run_dir`` (str)
    and ``lines`` ({``metrics.jsonl``: n, ``analyses.jsonl``: m}, the lines each held when
    the checkpoint was saved; rank zero, which writes them); ``resumed_from`` (the
    resumes behind this run, oldest first, as in ``summary.json``).

    ``on_save_checkpoint`` runs after every callback's ``state_dict``, and the analyses'
    ``state_dict`` writes the worker's pending results first (``callbacks/common.py``): the
    counts include every result of a call made before the checkpoint, and none after.

    Also ``callback_metrics``: Lightning's ``trainer.callback_metrics`` (0-d tensors), which
    it does not checkpoint; a resumed run gets them back before its first step, so that
    what reads the latest value of a metric (the weight-decay callbacks' ``wd/test_acc``,
    the latest ``test/acc``) reads what an uninterrupted run reads.
    """

    def __init__(self, task: str, model: str, run_dir: str | Path | None = None) -> None:
        self.identity = {"task": task, "model": model}
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.resumed_from: list[dict[str, Any]] = []
        self._callback_metrics: dict[str, torch.Tensor] = {}  # loaded, until training starts

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        stamp: dict[str, Any] = dict(self.identity)
        if self.run_dir is not None and trainer.is_global_zero:
            stamp["run_dir"] = str(self.run_dir.resolve())
            stamp["lines"] = {name: count_lines(self.run_dir / name) for name in RUN_FILES}
        stamp["resumed_from"] = [dict(entry) for entry in self.resumed_from]
        stamp["callback_metrics"] = {
            name: value.detach().cpu().clone()
            for name, value in trainer.callback_metrics.items()
            if isinstance(value, torch.Tensor) and value.dim() == 0
        }
        checkpoint["grokedge"] = stamp

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning empties callback_metrics after restoring callbacks: kept until then.
        self._callback_metrics = dict(
            (checkpoint.get("grokedge") or {}).get("callback_metrics", {})
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics, self._callback_metrics = self._callback_metrics, {}
        for name, value in metrics.items():
            trainer.callback_metrics.setdefault(name, value.to(pl_module.device))


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose ``every_n_train_steps`` save at a step that is
    also evaluated waits for the evaluation (it is then saved in ``on_validation_end``).

    Lightning saves a step's checkpoint in ``on_train_batch_end``, before that step's
    evaluation, and a run resumed from it skips the evaluation (its training loop counts it
    as done: ``increment_progress_to_evaluation_end``). Checkpoints every 1,000 steps and
    evaluations every 100 coincide at every checkpoint, so a resumed run lacked the
    evaluation of its checkpoint's step: its metrics and its grok history (``grok_step``,
    ``grok_steps``) differed from an uninterrupted run's. Saved after the evaluation, the
    checkpoint holds it, and a resumed run goes on with the next step, as Lightning does
    for a checkpoint saved at the end of a validation (its own deferral, for monitored
    metrics, reused). Everything else is ``ModelCheckpoint``'s.
    """

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        due = (
            self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        )
        if due and not self._should_skip_saving_checkpoint(trainer) and _evaluates_now(trainer):
            self._defer_save_until_validation = True
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def _evaluates_now(trainer: L.Trainer) -> bool:
    """Whether the training loop runs an evaluation after the current batch (Lightning
    2.6's own decision, asked in ``on_train_batch_end``)."""
    loop = trainer.fit_loop
    return bool(trainer.enable_validation) and loop.epoch_loop._should_check_val_fx(
        loop._data_fetcher
    )


# ------------------------------------------------------------------------- resuming

RUN_FILES = (METRICS_FILE, ANALYSES_FILE)
"""The run files a resumed run carries over from the checkpoint's run directory."""


def count_lines(path: Path) -> int:
    """Complete (newline-terminated) lines of ``path``; 0 if it does not exist."""
    if not path.is_file():
        return 0
    count = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            count += chunk.count(b"\n")
    return count


def _head(path: Path, n: int) -> list[bytes]:
    """The first ``n`` complete lines of ``path`` (fewer if it has fewer), byte for byte."""
    lines: list[bytes] = []
    with open(path, "rb") as f:
        for line in f:
            if len(lines) == n or not line.endswith(b"\n"):
                break
            lines.append(line)
    return lines


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.is_dir() and b.is_dir() and a.samefile(b))
    except OSError:
        return False


@dataclass
class Resumed:
    """What :func:`carry_run_files` did for a run resumed from ``checkpoint``.

    Attributes:
        checkpoint: the ``resume=`` checkpoint.
        step: its optimizer step (``global_step``).
        source: the run directory it recorded (None: a checkpoint without the record).
        lines: lines carried into this run's files, by file name.
        metrics: the carried ``metrics.jsonl`` rows, in order.
        resumed_from: ``summary.json``'s ``resumed_from``: the checkpoint's own list, then
            ``{"run_dir": source, "checkpoint": path, "step": step}``.
        missing: what could not be carried (each also warned about).
    """

    checkpoint: Path
    step: int
    source: Path | None
    lines: dict[str, int] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: list[dict[str, Any]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def carry_run_files(checkpoint: str | Path, run_dir: str | Path, write: bool = True) -> Resumed:
    """Start a resumed run's files with its checkpoint's run files, as they were at the save.

    Copies the first ``lines[name]`` lines of ``metrics.jsonl`` and ``analyses.jsonl`` of
    the checkpoint's run directory (``checkpoint["grokedge"]``, :class:`RunIdentity`) into
    ``run_dir`` (replacing what is there) and marks that directory interrupted
    (:func:`mark_interrupted`); when ``run_dir`` is that directory, cuts its files back to
    them and removes its ``summary.json`` (it no longer describes the directory; the
    resumed run writes its own). Rows the checkpoint's run wrote after the save are
    dropped: the resumed run writes them again. If the checkpoint's run had no grok step
    yet, analysis rows that were relabelled after the save get back their state at the
    save (``grok_step`` null, phase ``pre``): the resumed run relabels them itself.

    Whatever cannot be carried (a checkpoint without the record, a directory or a file
    that is gone or shorter than recorded) is warned about by name and listed in
    ``missing``; the run then goes on with what there is.

    Args:
        checkpoint: the ``resume=`` path (already checked: a checkpoint of this task).
        run_dir: the resumed run's directory.
        write: write files (rank zero); False only reads what the checkpoint records.
    """
    checkpoint, run_dir = Path(checkpoint), Path(run_dir)
    blob = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    stamp = blob.get("grokedge") or {}
    step = int(blob.get("global_step", 0))
    source = Path(stamp["run_dir"]) if stamp.get("run_dir") else None
    resumed = Resumed(checkpoint, step, source)
    resumed.resumed_from = [dict(e) for e in stamp.get("resumed_from") or []]
    resumed.resumed_from.append(
        {
            "run_dir": None if source is None else str(source),
            "checkpoint": str(checkpoint.resolve()),
            "step": step,
        }
    )
    if not write:
        return resumed
    if source is None:
        resumed.missing.append("the checkpoint's record of its run files")
        warnings.warn(
            f"resume={str(checkpoint)!r}: the checkpoint records no run directory (written "
            f"by an older grokedge): {run_dir} holds only what happens after step {step}",
            RuntimeWarning,
            stacklevel=2,
        )
        return resumed
    grok = blob.get("grok")
    # The module's grok state at the save (GrokModule): no grok step yet means that every
    # analysis row then on file had grok_step null.
    unlabel = isinstance(grok, dict) and grok.get("step") is None
    in_place = _same_dir(source, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        wanted = int((stamp.get("lines") or {}).get(name, 0))
        src = source / name
        lines = _head(src, wanted) if src.is_file() else []
        if len(lines) < wanted:
            held = "missing" if not src.is_file() else f"{len(lines)} lines"
            what = f"{src} ({held}; the checkpoint recorded {wanted} lines)"
            resumed.missing.append(what)
            warnings.warn(
                f"resume={str(checkpoint)!r}: {what}: {run_dir / name} starts with the "
                f"{len(lines)} there are, so it lacks rows up to step {step}",
                RuntimeWarning,
                stacklevel=2,
            )
        if name == ANALYSES_FILE and unlabel:
            lines = [unlabelled_line(line.decode("utf-8")).encode("utf-8") for line in lines]
        dst = run_dir / name
        if not in_place and count_lines(dst):
            warnings.warn(
                f"resume={str(checkpoint)!r}: {dst} held rows of an earlier run; replaced by "
                f"the {len(lines)} rows of {src} up to the checkpoint",
                RuntimeWarning,
                stacklevel=2,
            )
        if lines or dst.exists():
            tmp = dst.with_name(dst.name + ".tmp")
            tmp.write_bytes(b"".join(lines))
            os.replace(tmp, dst)  # atomic: a kill now leaves the old file or the new one
        resumed.lines[name] = len(lines)
        if name == METRICS_FILE:
            resumed.metrics = [json.loads(line) for line in lines if line.strip()]
    if not in_place:
        mark_interrupted(source, run_dir, step, stamp.get("task"))
    elif (run_dir / SUMMARY_FILE).is_file():
        # The summary of the run being continued here (its crash, or its earlier end) no
        # longer describes the directory; the resumed run writes its own at its end.
        (run_dir / SUMMARY_FILE).unlink()
    return resumed


def mark_interrupted(source: Path, resumed_by: Path, step: int, task: str | None) -> None:
    """``summary.json`` of a run directory that ``resumed_by`` resumed from its checkpoint
    at ``step``: ``"status": "interrupted"``, ``reason``, ``resumed_by`` (every directory
    that resumed it, in order) and ``resumed_at_step``, keeping what else it held (the
    ``error`` of a crash). A finished run (``"status": "ok"``) and a directory that is
    gone are left alone."""
    if not source.is_dir():
        return
    try:
        summary = read_summary(source)
    except (OSError, ValueError):  # none (a killed run), or torn
        summary = {"task": task}
    if summary.get("status") == STATUS_OK:
        return
    by = [str(p) for p in summary.get("resumed_by") or []]
    by.append(str(resumed_by.resolve()))
    summary.update(
        status=STATUS_INTERRUPTED,
        reason=(
            f"interrupted; resumed from its checkpoint at step {step} by {by[-1]} "
            "(which holds this run's rows up to that step)"
        ),
        resumed_by=by,
        resumed_at_step=step,
    )
    write_summary(source, summary)
