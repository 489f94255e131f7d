"""The plain files every run directory keeps, whatever W&B does.

- ``metrics.jsonl``: the full history, one ``{"step": s, "<metric>": value, ...}`` a line;
- ``summary.json``: ``status`` (``"ok"`` or ``"failed"``, then with ``error``:
  ``"<ExceptionType>: <message>"``), ``grok_step``, ``grok_steps`` (the grok step under each
  threshold × patience of ``task.grok.alternatives``, keyed ``"0.95/3"``; ``null`` where the
  metric never held), ``steps``, ``wall_s``, ``n_params`` and the last value of every logged
  scalar under its metric name; a resumed run's also ``resumed_from`` (see below).

A resumed run's directory is whole: :mod:`grokedge.resume` (checkpoints and resuming).

Also the guards around a run's files and its health: :class:`OutputDirCheck` and
:class:`SweepStatus` (Hydra callbacks: an unwritable output directory fails before Hydra
writes anything; a sweep with a failed job exits non-zero after the last job) and
:class:`NonFiniteLossGuard` (a Lightning callback: a NaN/inf training loss stops the run
with a message naming the step, or is warned about).

:class:`RunFiles` is the one writer of a run's files for any Trainer (the CLI's and a
plain ``L.Trainer(callbacks=[RunFiles(dir), ...])``): it adds a :class:`MetricHistoryLogger`
to the trainer's loggers (``logger=False`` included), points the trainer's
``default_root_dir`` (where the analyses write ``analyses.jsonl``) at the run directory,
starts fresh files there (a second run into the same directory replaces the first run's
``metrics.jsonl``, ``analyses.jsonl`` and ``summary.json``; a resumed CLI run keeps its
carried rows), writes ``summary.json`` at the end (failed runs too) and prints the
closing lines (:func:`closing_lines`) on stdout and into ``train.log`` if the run has one.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
import warnings
from argparse import Namespace
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.experimental.callback import Callback as HydraCallback
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from grokedge.analysis_log import ANALYSES_FILE, read_analyses
from grokedge.checks import not_allowed
from grokedge.closing_summary import closing_lines

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LOG_FILE = "train.log"  # Hydra's job log of a CLI run (job name "train")

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
    allowed = f"{reason}; allowed: a directory that can be created and written ({key}=DIR)"
    print(f"grokedge: configuration error: {not_allowed(key, value, allowed)}", file=sys.stderr)
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
            raise not_allowed(
                f"{config_key}.action", action, f"one of {', '.join(NONFINITE_ACTIONS)}"
            )
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise not_allowed(f"{config_key}.check_every", check_every, "an integer >= 1")
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


# ------------------------------------------------------------------ one writer for any run


class RunFiles(Callback):
    """The run directory of any Trainer: ``metrics.jsonl``, a fresh ``analyses.jsonl``,
    ``summary.json`` and the closing lines.

    Put it in the trainer's callbacks (first, so that the analyses' ``setup`` sees the
    run directory)::

        trainer = L.Trainer(logger=False, callbacks=[RunFiles("runs/mlp"), GramCallback(...)])

    At ``setup`` (fit): appends :attr:`history` (a :class:`MetricHistoryLogger`) to the
    trainer's loggers, sets the trainer's ``default_root_dir`` to ``run_dir`` (the
    analyses' ``analyses.jsonl`` goes there; so do Lightning's checkpoints unless a
    ``ModelCheckpoint`` names its own directory), and, unless resumed, deletes the
    ``metrics.jsonl``, ``analyses.jsonl`` and ``summary.json`` of an earlier run in that
    directory (rank zero): a second run into one directory replaces the first run's files.
    At the end (``teardown``; ``on_exception`` for a failed run) writes ``summary.json``
    (:meth:`summary`) and prints :func:`closing_lines` on stdout and into ``train.log`` if
    the directory has one.

    Args:
        run_dir: the run directory (created if missing).
        grok_alternatives: (thresholds, patiences) for the module's ``grok_steps`` (the
            CLI passes ``task.grok.alternatives``); None: no ``grok_steps`` field.
        fields: extra ``summary.json`` fields written first (the CLI: ``task``,
            ``torch_threads``).
        closing: print the closing lines.

    Attributes:
        history: the run's :class:`MetricHistoryLogger`.
        resumed_from: ``summary.json``'s ``resumed_from`` (set by a resume; None: fresh).
        written: the ``summary.json`` written (None: not yet).
    """

    def __init__(
        self,
        run_dir: str | Path,
        grok_alternatives: tuple[Any, Any] | None = None,
        fields: Mapping[str, Any] | None = None,
        closing: bool = True,
    ) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self.history = MetricHistoryLogger(self.run_dir)
        self.grok_alternatives = grok_alternatives
        self.fields = dict(fields or {})
        self.closing = closing
        self.resumed_from: list[dict[str, Any]] | None = None
        self.written: dict[str, Any] | None = None
        self._start: float | None = None
        self._error: BaseException | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.written, self._error = None, None
        self._start = time.perf_counter()
        if all(logger is not self.history for logger in trainer.loggers):
            trainer.loggers = [*trainer.loggers, self.history]
        # Lightning keeps the directory privately; the analyses read trainer.default_root_dir.
        trainer._default_root_dir = str(self.run_dir)
        if trainer.is_global_zero:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.resumed_from is None and self.history.resumed_at is None:
                for name in (METRICS_FILE, ANALYSES_FILE, SUMMARY_FILE):
                    (self.run_dir / name).unlink(missing_ok=True)

    def summary(
        self, trainer: L.Trainer, pl_module: L.LightningModule, error: BaseException | None
    ) -> dict[str, Any]:
        """``summary.json``: :attr:`fields`, ``status``, ``error`` (failed), ``grok_step``
        (the module's, None without one), ``grok_steps`` (when the module has
        ``grok_steps``), ``steps``, ``wall_s``, ``n_params``, ``resumed_from`` (resumed),
        the last value of every logged scalar, and the callbacks' ``summary_fields()``
        (finished runs)."""
        wall_s = 0.0 if self._start is None else time.perf_counter() - self._start
        n_params = getattr(pl_module, "n_params", None)
        if not isinstance(n_params, int):
            n_params = sum(p.numel() for p in pl_module.parameters())
        summary: dict[str, Any] = {
            **self.fields,
            "status": STATUS_OK if error is None else STATUS_FAILED,
            **({} if error is None else {"error": error_text(error)}),
            "grok_step": getattr(pl_module, "grok_step", None),
        }
        grok_steps = getattr(pl_module, "grok_steps", None)
        if callable(grok_steps) and self.grok_alternatives is not None:
            # The grok step under other thresholds × patiences, from the evaluations the
            # module keeps in its checkpoints (a resumed run's metrics.jsonl starts late).
            summary["grok_steps"] = grok_steps(*self.grok_alternatives)
        summary |= {
            "steps": trainer.global_step,
            "wall_s": round(wall_s, 3),
            "n_params": n_params,
            **({} if self.resumed_from is None else {"resumed_from": self.resumed_from}),
            **self.history.last,
        }
        for callback in trainer.callbacks:  # analyses may add fields (e.g. the run's class)
            extra = getattr(callback, "summary_fields", None)
            if callable(extra) and error is None:
                summary.update(extra())
        return summary

    def finish(
        self, trainer: L.Trainer, pl_module: L.LightningModule, error: BaseException | None
    ) -> dict[str, Any]:
        """Write ``summary.json`` and print the closing lines, once per fit; returns the
        summary (the one written before on a second call)."""
        if self.written is not None:
            return self.written
        summary = self.summary(trainer, pl_module, error)
        self.written = summary
        self.history.finalize(STATUS_OK if error is None else STATUS_FAILED)
        if not trainer.is_global_zero:  # DDP: every rank runs fit; rank 0 owns the files
            return summary
        write_summary(self.run_dir, summary)
        if self.closing:
            self.close(summary)
        return summary

    def close(self, summary: Mapping[str, Any]) -> list[str]:
        """Print :func:`closing_lines` and append them to ``train.log`` if it exists."""
        rows = read_analyses(self.run_dir, ["edge_summary"])
        lines = closing_lines(
            self.run_dir, summary.get("grok_step"), int(summary.get("steps") or 0),
            self.history.last, rows[-1] if rows else None, summary.get("error"),
        )  # fmt: skip
        text = "\n".join(lines) + "\n"
        sys.stdout.write(text)
        sys.stdout.flush()
        log = self.run_dir / LOG_FILE
        if log.is_file():
            with open(log, "a", encoding="utf-8") as f:
                f.write(text)
        return lines

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._error = exception
        self.finish(trainer, pl_module, exception)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.finish(trainer, pl_module, self._error)
