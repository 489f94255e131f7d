"""The base of the cadenced causal analyses (ablation, perturbation, probes, ...).

:class:`AnalysisCallback` wires an analysis to Lightning's hooks: its schedule
(:class:`grokedge.analysis.schedule.AnalysisSchedule`: every N optimizer steps, once when
the grok step is detected, once at the end), the run's phases (the GramCallback's),
``analyses.jsonl`` rows and their relabelling, timing, evaluation mode, the global random
state and checkpoint state. The fixed evaluation subset comes from
:func:`grokedge.analysis.subsets.fixed_subset`; argument checks from
``grokedge.config_checks``; interventions from ``grokedge.callbacks.intervention``.

Nothing here mutates the live parameters, their gradients, the optimizer or any global
random state: analyses evaluate through the module's ``evaluate(params, batch)`` /
``trace(params, batch)`` (the ``grokedge.functional`` protocol: ``GrokModule``, or any
LightningModule given them by ``grokedge.adapters.FunctionalAdapter``) under
``torch.no_grad``, draw their random numbers from their own generators and restore the
network's train/eval mode.
"""

from __future__ import annotations

import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from threadpoolctl import threadpool_limits
from torch import nn

from grokedge.analysis.background import BackgroundJobs, Deferred, Pending, Result
from grokedge.analysis.probe_targets import pad_id_of
from grokedge.analysis.random_state import preserved_random_state
from grokedge.analysis.schedule import SCHEDULE_KEYS, AnalysisSchedule
from grokedge.analysis.subsets import fixed_subset, loader_batches
from grokedge.analysis.worker import free_cores, worker_allowed
from grokedge.analysis_log import AnalysisLog, Phases, log_scalars, log_table
from grokedge.batch import Batch, to_device
from grokedge.callbacks.gram import GramCallback, find_gram_callback
from grokedge.checks import AUTO, check_bool_or_auto, check_int, not_allowed
from grokedge.config_checks import built_from_config, message_label, names_python_arguments
from grokedge.functional import (
    EVALUATE,
    TRACE,
    analysed_module,
    check_evaluate,
    check_module_has,
    check_trace,
)

CADENCE, GROK, END = "cadence", "grok", "end"
"""What triggered an analysis call (the ``trigger`` field of its rows)."""

DEFAULT_BACKGROUND_STEPS = 500
"""Steps training runs ahead of a call in the worker before its results are written
(conf/callbacks/*.yaml ``background_steps``)."""

FALLBACK_INTERVAL = 100
"""Phase widths without a GramCallback: the defaults of a 100-step Gram interval."""


# --------------------------------------------------------------------------- base class


class AnalysisCallback(Callback, ABC):
    """Base of the analyses that run on a cadence over a fixed evaluation subset.

    Cadence: after the optimizer step that brings ``global_step`` to a multiple of
    ``every`` (``on_train_batch_end``, after the GramCallback has closed its delta for
    that step when it precedes this callback), and once when the run's grok step becomes
    known (``at_grok``): grok detection happens during an evaluation, so that call runs
    at the start of the next training batch (or at the end of training), on the weights
    of the detection step. With ``task.grok.patience`` 1 (the default) that is the grok
    step itself; with patience P it is the last of the P evaluations. With ``at_end``
    also once on the final weights (``on_train_end``). A step that already had a call is
    not analysed twice.

    Subclasses set ``analysis`` (row name in ``analyses.jsonl``), ``needs_edge`` and
    implement :meth:`analyse`. One that returns a :class:`Deferred` and sets
    ``background`` (True, or ``"auto"``: when a core is free, see :meth:`setup`) has its
    deferred part run in a worker process: its row and scalars are written
    ``background_steps`` steps after the call (before a checkpoint, at the end of training
    at the latest; the training thread waits there if the worker is not done), labelled
    with the step of the weights they measured.
    """

    analysis = "analysis"
    needs_edge = True
    requires: tuple[str, ...] = (EVALUATE,)
    """What the analysis calls on the module (``grokedge.functional``: ``evaluate``,
    ``trace``); checked before training and on the first evaluation batch."""

    schedule_defaults: ClassVar[Mapping[str, Any]] = {}
    """This analysis' defaults of the :class:`AnalysisSchedule` keys (its config file's)."""
    fixed_schedule: ClassVar[Mapping[str, Any]] = {}
    """Schedule keys this analysis fixes (not accepted as arguments)."""

    supports_background: ClassVar[bool] = False
    """Whether :meth:`analyse` returns a :class:`Deferred` (accepts ``background``)."""
    background_needs_cpu: ClassVar[bool] = True
    """Whether the deferred jobs evaluate the module (then only a CPU run may defer them:
    the worker is a CPU process)."""

    @names_python_arguments
    def __init__(
        self,
        *,
        config_key: str,
        background: bool | str | None = None,
        background_steps: int = DEFAULT_BACKGROUND_STEPS,
        **schedule: Any,
    ) -> None:
        super().__init__()
        self.config_key = config_key
        # Messages name config keys or Python arguments (see :meth:`argument`).
        self.from_config = built_from_config()
        if background is not None and not self.supports_background:
            raise TypeError(
                f"{type(self).__name__}.__init__() got an unexpected keyword argument 'background'"
            )
        if background is None:  # the default: use an idle core where there is one
            background = AUTO if self.supports_background else False
        self.background = check_bool_or_auto(f"{config_key}.background", background)
        self.background_steps = check_int(f"{config_key}.background_steps", background_steps, 1)
        for name in schedule:
            if name not in SCHEDULE_KEYS or name in self.fixed_schedule:
                raise TypeError(
                    f"{type(self).__name__}.__init__() got an unexpected keyword argument {name!r}"
                )
        self.schedule = AnalysisSchedule(
            **{**self.schedule_defaults, **schedule, **self.fixed_schedule}
        ).checked(config_key)
        schedule_ = self.schedule
        self.every = schedule_.every
        self.at_grok = schedule_.at_grok
        self.at_end = schedule_.at_end
        self.n_sequences = schedule_.n_sequences
        self.subset_seed = schedule_.subset_seed
        self.sample = schedule_.sample
        self.eval_set = schedule_.eval_set
        self.tables = schedule_.tables

        self.last_step: int | None = None
        self.grok_done = False
        self.calls = 0
        self.total_seconds = 0.0
        self.last_seconds = 0.0
        self.skipped = 0

        self.gram: GramCallback | None = None
        self.phases: Phases | None = None
        self.analysis_log: AnalysisLog | None = None
        self._subset: Batch | None = None
        self._relabelled_for: int | None = None

        # The deferred calls, run here or in the worker (self.background resolved in setup).
        self.jobs = BackgroundJobs(config_key)
        self._attached: tuple[L.Trainer, L.LightningModule] | None = None

    @property
    def in_background(self) -> bool:
        """Whether this analysis' deferred jobs run in the worker process."""
        return self.jobs.enabled

    # ------------------------------------------------------------------ identity/checks

    def argument(self, name: str, value: Any) -> str:
        """How a message names this callback's argument ``name`` set to ``value``: the
        config key (``callbacks.ablation.every=1000``) when the callback came from a Hydra
        config, the class and keyword (``AblationCallback(every=1000)``) when it was built
        in Python. The config key is ``config_key`` (the default config path, or the path
        a caller gave)."""
        if self.from_config:
            return f"{self.config_key}.{name}={value}"
        return f"{type(self).__name__}({name}={value!r})"

    @property
    def label(self) -> str:
        """How messages name this callback: its config key, or its class in Python."""
        return message_label(self)

    def idle_reason(self, max_steps: int, start_step: int, can_grok: bool) -> str | None:
        """Why this analysis cannot fire in a run that ends at ``max_steps`` (from
        ``start_step``; ``can_grok``: the module reports a grok step), else None: its
        cadence ``every``, ``at_grok`` and ``at_end`` (:meth:`AnalysisSchedule.idle_reason`)."""
        return self.schedule.idle_reason(max_steps, start_step, can_grok, self.argument)

    def warn_if_idle(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """At fit start: one warning when :meth:`idle_reason` says this analysis cannot fire
        before ``trainer.max_steps`` (nothing is checked for a run without max_steps)."""
        max_steps = trainer.max_steps
        if max_steps is None or max_steps < 0:
            return
        can_grok = hasattr(pl_module, "grok_step")
        reason = self.idle_reason(int(max_steps), int(trainer.global_step), can_grok)
        if reason is not None and trainer.is_global_zero:
            warnings.warn(reason, UserWarning, stacklevel=2)

    def _worker_allowed(self) -> bool:
        """False when the worker process would re-run the main script's training
        (:func:`grokedge.analysis.worker.worker_allowed`: one warning, or one ValueError
        when ``background=True`` asked for a worker by name)."""
        asked = self.argument("background", True) if self.background is True else None
        return worker_allowed(asked)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(config_key=self.config_key)

    def required(self) -> tuple[str, ...]:
        """The protocol methods this callback will call (``requires``; none when off)."""
        return self.requires

    @names_python_arguments
    def check_module(self, pl_module: nn.Module) -> None:
        """Checks against the built model (``train.build`` calls this before training):
        it has what :meth:`required` names and ``input_keys`` (``grokedge.functional``)."""
        needs = self.required()
        if needs:
            check_module_has(pl_module, needs, self.config_key)

    @names_python_arguments
    def check_data(self, datamodule: Any) -> None:
        """Checks against the task's declarations (``train.build`` calls this before
        training, ``setup`` again for a Trainer built by hand); none by default."""

    @names_python_arguments
    def check_batch(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """On the fixed evaluation subset, before the first step: ``evaluate`` and
        ``trace`` (what :meth:`required` names) return what the protocol says
        (``grokedge.functional.check_evaluate`` / ``check_trace``); else one ValueError
        naming the config key, what was expected and what came back."""
        needs = self.required()
        if not needs:
            return
        net = analysed_module(pl_module)
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad(), preserved_random_state(pl_module.device):
                batch = self.subset(trainer, pl_module)
                if EVALUATE in needs:
                    check_evaluate(pl_module, batch, self.config_key)
                if TRACE in needs:
                    block = getattr(self, "block", None)
                    check_trace(pl_module, batch, self.config_key, block)
        finally:
            net.train(was_training)

    # ----------------------------------------------------------------- Lightning hooks

    @names_python_arguments
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.check_module(pl_module)
        self.check_data(trainer.datamodule)
        self.gram = find_gram_callback(
            trainer, required=self.needs_edge, from_config=self.from_config, reader=self.label
        )
        # The run's phases are set once, on the GramCallback (callbacks.gram.phase_*).
        gram = self.gram
        self.phases = gram.phases if gram is not None else Phases.around(FALLBACK_INTERVAL)
        self.analysis_log = AnalysisLog(trainer.default_root_dir, enabled=trainer.is_global_zero)
        # The worker is one CPU process: jobs that evaluate the module need the run to be
        # one process on the CPU (a sharded edge needs collectives, a GPU other numbers).
        deferrable = trainer.world_size == 1 and (
            not self.background_needs_cpu or trainer.strategy.root_device.type == "cpu"
        )
        if self.background is True and not deferrable:
            where = " on the CPU" if self.background_needs_cpu else ""
            raise not_allowed(
                f"{self.config_key}.background",
                True,
                f"auto or false here: true needs one process{where} (world size "
                f"{trainer.world_size}, {trainer.strategy.root_device.type})",
            )
        # "auto": a worker only where it takes a core training leaves idle (torch threads
        # < the cores this process may use); elsewhere it would slow training down.
        idle = free_cores()
        auto = deferrable and idle > 0
        in_background = self.background is True or (self.background == AUTO and auto)
        if in_background:  # before the worker starts: it would re-run an unguarded script
            in_background = self._worker_allowed()
        self._attached = (trainer, pl_module)
        self.jobs.start(in_background, blas_threads=max(1, idle))
        if self.required() and not callable(getattr(trainer.datamodule, "val_dataloader", None)):
            raise ValueError(
                f"{self.config_key}: needs evaluation data: a LightningDataModule with "
                "val_dataloader() (trainer.fit(module, datamodule=...)); see grokedge.functional"
            )
        names = getattr(trainer.datamodule, "eval_names", ("test",))
        if self.eval_set not in names:
            raise not_allowed(
                f"{self.config_key}.eval_set",
                self.eval_set,
                f"one of {', '.join(names)} (the DataModule's eval_names); fix: "
                f"eval_names = ({', '.join(map(repr, (*names, self.eval_set)))}) with "
                "val_dataloader() returning one loader per name, or another eval_set",
            )
        if self.gram is not None and self.needs_edge:
            order = list(trainer.callbacks)
            if order.index(self.gram) > order.index(self):
                warnings.warn(
                    f"{self.label}: the GramCallback comes after this callback, so "
                    "its analyses use the edge of the previous interval; list "
                    "gram_spectrum first",
                    stacklevel=2,
                )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The model is on its device now; fail before the first optimizer step.
        self.check_batch(trainer, pl_module)
        self.warn_if_idle(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if self.jobs.pending:
            self._collect(until=trainer.global_step - self.background_steps)
        step = trainer.global_step
        if self.every is None or step <= 0 or step % self.every or step == self.last_step:
            return
        self._run(trainer, pl_module, CADENCE, direct=False)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int
    ) -> None:
        if self._grok_pending(pl_module):
            self._run(trainer, pl_module, GROK, direct=False)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._relabel(getattr(pl_module, "grok_step", None))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning forbids self.log in on_train_end: these calls log straight to loggers.
        if self._grok_pending(pl_module):
            self._run(trainer, pl_module, GROK, direct=True)
        if self.at_end and trainer.global_step != self.last_step:
            self._run(trainer, pl_module, END, direct=True)
        self._collect()
        self._relabel(getattr(pl_module, "grok_step", None))

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # A failed run writes no more rows; the worker's running job is left to finish.
        self.jobs.pending.clear()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.jobs.stop()

    # ------------------------------------------------------------------ the mechanics

    def _grok_pending(self, pl_module: L.LightningModule) -> bool:
        return (
            self.at_grok
            and not self.grok_done
            and getattr(pl_module, "grok_step", None) is not None
        )

    def subset(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Batch:
        """The fixed evaluation subset on the module's device (built once)."""
        if self._subset is None:
            dm = trainer.datamodule
            index = list(getattr(dm, "eval_names", ("test",))).index(self.eval_set)
            loaders = dm.val_dataloader()
            loader = loaders[index] if isinstance(loaders, list | tuple) else loaders
            pad_id = pad_id_of(dm)
            batch = fixed_subset(
                loader_batches(loader, getattr(pl_module, "batch_keys", None)),
                self.n_sequences,
                self.subset_seed,
                self.sample,
                pad_id,
            )
            self._subset = to_device(batch, pl_module.device)
        return self._subset

    def _run(
        self, trainer: L.Trainer, pl_module: L.LightningModule, trigger: str, direct: bool
    ) -> None:
        step = trainer.global_step
        grok = getattr(pl_module, "grok_step", None)
        if trigger == GROK:
            self.grok_done = True
            if step == self.last_step:  # the cadence already measured these weights
                return
        if self.needs_edge and (self.gram is None or self.gram.edge is None):
            self.skipped += 1
            return
        self._relabel(grok)
        net = analysed_module(pl_module)
        was_training = net.training
        net.eval()  # dropout off, and no draw from the global random stream
        start = time.perf_counter()
        try:
            # numpy/scipy (the sklearn probes) get the run's torch thread budget: their
            # BLAS would otherwise start a thread per core, which on a small shared
            # machine is up to 10x slower than one thread (docs/benchmarks.md).
            with (
                threadpool_limits(limits=torch.get_num_threads()),
                preserved_random_state(pl_module.device),
            ):
                result = self.analyse(trainer, pl_module, step)
                if isinstance(result, Deferred):
                    deferred = result
                    result = self.jobs.run(deferred, after_training=direct)
        finally:
            net.train(was_training)
        seconds = time.perf_counter() - start
        self.last_step = step
        if isinstance(result, Result):
            self._record(step, trigger, result, seconds, direct)
            return
        self.jobs.pending.append(Pending(step, trigger, seconds, result, deferred.complete))
        if direct:
            self._collect()

    def _collect(self, until: int | None = None) -> None:
        """Record the worker's calls of steps <= ``until`` (None: all), in call order,
        waiting for them if need be. Results are written at these fixed points (a fixed
        number of steps after their call, before a checkpoint, at the end), never when
        the worker happens to finish, so that a run's files do not depend on timing. A
        worker's exception is raised here, on the training thread."""
        for step, trigger, result, seconds in self.jobs.finished(until):
            self._record(step, trigger, result, seconds)

    def _record(
        self, step: int, trigger: str, result: Result, seconds: float, direct: bool | None = None
    ) -> None:
        """One finished call: its ``analyses.jsonl`` row, table and scalars. ``seconds``:
        the call's time on the training thread (a worker's own time is the row's
        ``worker_seconds``). ``direct`` None: a call finished on the worker, logged at
        its own ``step``."""
        assert self.phases is not None and self._attached is not None
        trainer, pl_module = self._attached
        grok = getattr(pl_module, "grok_step", None)
        self._relabel(grok)
        phase = self.phases.label(step, grok)
        self.last_seconds = seconds
        self.total_seconds += seconds
        self.calls += 1
        self.write(step, phase, grok, trigger=trigger, **result.fields, seconds=seconds)
        if self.tables and result.table is not None:
            key, columns, rows = result.table
            log_table(
                trainer, key, ["step", "phase", *columns], [[step, phase, *r] for r in rows], step
            )
        # A call finished on the worker is logged at its own step, past the live one.
        log_step = step if direct is None else None
        log_scalars(trainer, pl_module, result.scalars, bool(direct), step=log_step)

    @abstractmethod
    def analyse(
        self, trainer: L.Trainer, pl_module: L.LightningModule, step: int
    ) -> Result | Deferred:
        """Run the analysis on the current weights (network in eval mode); a
        :class:`Deferred` for a part that reads nothing of the live run."""

    def write(self, step: int, phase: str, grok: int | None, **fields: Any) -> None:
        assert self.analysis_log is not None
        self.analysis_log.write(self.analysis, step, phase, grok, **fields)

    def _relabel(self, grok: int | None) -> None:
        if grok is None or self._relabelled_for == grok or self.analysis_log is None:
            return
        assert self.phases is not None
        self.analysis_log.relabel((self.analysis,), grok, self.phases.label)
        self._relabelled_for = grok

    # -------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Primitives only (``torch.load(weights_only=True)`` safe). A checkpoint waits
        for the worker's calls, so that it and ``analyses.jsonl`` agree on them."""
        self._collect()
        return {
            "last_step": self.last_step,
            "grok_done": self.grok_done,
            "calls": self.calls,
            "total_seconds": self.total_seconds,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self.last_step = state_dict["last_step"]
        self.grok_done = bool(state_dict["grok_done"])
        self.calls = int(state_dict["calls"])
        self.total_seconds = float(state_dict["total_seconds"])
        self.skipped = int(state_dict.get("skipped", 0))
