"""The plain files every run directory keeps, whatever W&B does.

- ``metrics.jsonl``: the full history, one ``{"step": s, "<metric>": value, ...}`` a line;
- ``summary.json``: ``status`` (``"ok"`` or ``"failed"``, then with ``error``:
  ``"<ExceptionType>: <message>"``), ``grok_step``, ``grok_steps`` (the grok step under each
  threshold × patience of ``task.grok.alternatives``, keyed ``"0.95/3"``; ``null`` where the
  metric never held), ``steps``, ``wall_s``, ``n_params`` and the last value of every logged
  scalar under its metric name; a resumed run's also ``resumed_from`` (see below).

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

Also the guards around a run's files and its health: :class:`OutputDirCheck` and
:class:`SweepStatus` (Hydra callbacks: an unwritable output directory fails before Hydra
writes anything; a sweep with a failed job exits non-zero after the last job) and
:class:`NonFiniteLossGuard` (a Lightning callback: a NaN/inf training loss stops the run
with a message naming the step, or is warned about), and :class:`RunIdentity` (the run's
task and model in every checkpoint, so that ``resume=`` refuses another task's).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
import warnings
from argparse import Namespace
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.experimental.callback import Callback as HydraCallback
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from grokedge.analysis_log import ANALYSES_FILE, unlabelled_line

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"

STATUS_OK, STATUS_FAILED, STATUS_INTERRUPTED = "ok", "failed", "interrupted"
"""``summary.json``'s ``status``: the run finished / it raised (``error`` says what) / it
stopped before the end and a later run resumed from its checkpoint (``resumed_by``)."""

CONFIG_ERROR_EXIT = 2
"""Exit status of a run refused before it starts (as ``grokedge.train`` for ConfigErrors)."""


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
        self.resumed_at: int | None = None  # set by carry(): rows before it are on file
        self._file = None

    def carry(self, rows: list[dict[str, Any]], resumed_at: int) -> None:
        """A resumed run whose ``metrics.jsonl`` starts with ``rows`` (copied from the
        checkpoint's run directory, :func:`carry_run_files`), resumed at optimizer step
        ``resumed_at``: :attr:`last` starts from them, and rows stamped before
        ``resumed_at`` are not written again.

        The only such rows are start-up values a resumed fit logs before Lightning has
        restored its step counter (``on_fit_start`` sees step 0: GramCallback's predicted
        buffer size); the carried rows hold them, at their place, already.
        """
        for row in rows:
            self.last.update({k: v for k, v in row.items() if k != "step"})
        self.resumed_at = int(resumed_at)

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
        if not row or (self.resumed_at is not None and step is not None and step < self.resumed_at):
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


def metrics_by_step(run_dir: str | Path) -> dict[int, dict[str, float]]:
    """The rows of a run's ``metrics.jsonl`` merged per step (``step`` kept in each row;
    a key logged twice at one step keeps its later value)."""
    by_step: dict[int, dict[str, float]] = {}
    for row in read_metrics(run_dir):
        by_step.setdefault(int(row["step"]), {}).update(row)
    return by_step


def write_summary(run_dir: str | Path, summary: dict[str, Any]) -> Path:
    """Write ``summary.json`` (NaN/inf as null: it must stay valid JSON)."""

    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and not math.isfinite(v) else v

    path = Path(run_dir) / SUMMARY_FILE
    path.write_text(json.dumps({k: clean(v) for k, v in summary.items()}, indent=2) + "\n")
    return path


def error_text(exc: BaseException) -> str:
    """``"<ExceptionType>: <message>"``, the ``error`` field of a failed ``summary.json``."""
    return f"{type(exc).__name__}: {exc}"


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """A run's ``summary.json``."""
    return json.loads((Path(run_dir) / SUMMARY_FILE).read_text(encoding="utf-8"))


# --------------------------------------------------------------- output directories


def unwritable_reason(path: str | Path) -> str | None:
    """Why a run could not create and write ``path`` (``None``: it can).

    Walks up to the nearest existing ancestor (Hydra creates the rest) and tries to create
    a temporary file there: permission bits alone say nothing to root or on a read-only
    mount. Creates and removes nothing else.
    """
    target = Path(path).expanduser().absolute()
    existing = target
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        return f"cannot write in {existing}: {e.strerror or e}"
    return None


def _refuse_dir(key: str, value: str, reason: str) -> None:
    print(
        f"grokedge: configuration error: {key}={value!r} is not allowed: {reason}; "
        f"allowed: a directory that can be created and written ({key}=DIR)",
        file=sys.stderr,
    )
    sys.exit(CONFIG_ERROR_EXIT)


class OutputDirCheck(HydraCallback):
    """Hydra callback: refuse an output directory that cannot be written, before Hydra
    creates it or writes ``.hydra/`` (exit status 2, one message naming the key)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        value = str(OmegaConf.select(config, "hydra.run.dir"))
        reason = unwritable_reason(value)
        if reason is not None:
            _refuse_dir("hydra.run.dir", value, reason)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        value = str(OmegaConf.select(config, "hydra.sweep.dir"))
        reason = unwritable_reason(value)
        if reason is not None:
            _refuse_dir("hydra.sweep.dir", value, reason)


class SweepStatus(HydraCallback):
    """Hydra callback: after the last job of a sweep, list the jobs whose ``summary.json``
    says ``"status": "failed"`` and exit with status 1 if there are any.

    ``train.main`` catches a sweep job's exception (the other jobs go on) and records it in
    the job's ``summary.json``; this callback turns the failures back into the sweep's
    exit status. It reads the files, so it works for every launcher (the in-process basic
    one, joblib's worker processes, SLURM). Summaries older than the sweep are ignored (a
    reused sweep directory).
    """

    def __init__(self) -> None:
        self._started: float | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
        failed: list[tuple[Path, str]] = []
        for path in sorted(sweep_dir.rglob(SUMMARY_FILE)):
            if self._started is not None and path.stat().st_mtime < self._started - 1:
                continue
            try:
                summary = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if summary.get("status") == STATUS_FAILED:
                failed.append((path.parent, str(summary.get("error"))))
        if failed:
            lines = "\n".join(f"  {d}: {err}" for d, err in failed)
            print(f"grokedge: {len(failed)} sweep job(s) failed:\n{lines}", file=sys.stderr)
            sys.exit(1)


# ------------------------------------------------------------------ non-finite loss


NONFINITE_ACTIONS = ("stop", "warn")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf (``nonfinite.action=stop``)."""


class NonFiniteLossGuard(Callback):
    """Watch the training loss for NaN/inf; stop the run with a clear error, or warn.

    A non-finite loss gives non-finite gradients, so the optimizer step writes NaN/inf into
    the weights and every later loss is non-finite too. GramCallback skips (and counts) the
    non-finite deltas either way, so its window is never corrupted; this guard decides
    whether the run goes on.

    Args:
        action: ``stop``: raise :class:`NonFiniteLossError` naming the first bad step
            (the run ends, ``summary.json`` says ``"status": "failed"``); ``warn``: warn
            once and train on.
        check_every: optimizer steps between host reads of the (device-side) flag. The
            first bad step is recorded exactly whatever this is; a larger value saves a
            host synchronisation per step on an accelerator, at the cost of stopping up to
            ``check_every − 1`` steps late.
        config_key: config key named in messages.

    Attributes:
        first_bad_step: the optimizer step whose loss was first non-finite (``None``: none).
    """

    def __init__(self, action: str = "stop", check_every: int = 1, config_key: str = "nonfinite"):
        super().__init__()
        if action not in NONFINITE_ACTIONS:
            raise ValueError(
                f"{config_key}.action={action!r} is not allowed: one of "
                f"{', '.join(NONFINITE_ACTIONS)}"
            )
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ValueError(
                f"{config_key}.check_every={check_every!r} is not allowed: an integer >= 1"
            )
        self.action = action
        self.check_every = check_every
        self.config_key = config_key
        self.first_bad_step: int | None = None
        self._first: torch.Tensor | None = None  # 0-d int64 on the loss's device; -1: none

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, torch.Tensor) or self.first_bad_step is not None:
            return
        step = trainer.global_step  # the step that used this loss's gradient
        bad = ~torch.isfinite(loss.detach()).all()
        if self._first is None:
            self._first = torch.full((), -1, dtype=torch.int64, device=loss.device)
        # Device-side: record the first bad step without a host synchronisation.
        self._first = torch.where(bad & (self._first < 0), step, self._first)
        if step % self.check_every and not trainer.should_stop:
            return
        first = int(self._first)
        if first < 0:
            return
        self.first_bad_step = first
        message = (
            f"non-finite training loss at step {first}: its update wrote NaN/inf into the "
            "weights (GramCallback skips non-finite deltas; its window keeps the earlier ones)"
        )
        if self.action == "stop":
            raise NonFiniteLossError(
                f"{message}. Stopped ({self.config_key}.action=stop; "
                f"{self.config_key}.action=warn trains on)"
            )
        warnings.warn(f"{message}; training goes on ({self.config_key}.action=warn)", stacklevel=2)

    def state_dict(self) -> dict[str, Any]:
        return {"first_bad_step": self.first_bad_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.first_bad_step = state_dict.get("first_bad_step")


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
