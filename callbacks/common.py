"""Shared plumbing of the causal-analysis callbacks (ablation, perturbation, probes, ...).

- argument checks whose errors name the config key, the value and what is allowed;
- the fixed, seeded evaluation subset of a task's test set as one batch
  (:func:`grokedge.tasks.subsets.fixed_subset`), evaluated in length buckets
  (:class:`grokedge.spectral.perturbation.BucketedEvaluate`);
- :class:`AnalysisCallback`: cadence (every N optimizer steps, once when the grok step
  is detected, once at the end), phases relative to the run's grok step,
  ``analyses.jsonl`` rows and their relabelling, timing, evaluation mode, the global
  random state and checkpoint state. (Interventions: ``grokedge.callbacks.intervention``.)

Nothing here mutates the live parameters, their gradients, the optimizer or any global
random state: analyses evaluate through the module's ``evaluate(params, batch)`` /
``trace(params, batch)`` (the ``grokedge.functional`` protocol: ``GrokModule``, or any
LightningModule given them by ``grokedge.adapters.FunctionalAdapter``) under
``torch.no_grad``, draw their random numbers from their own generators and restore the
network's train/eval mode.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from threadpoolctl import threadpool_limits
from torch import Tensor, nn

from grokedge.analysis_log import AnalysisLog, Phases, log_table
from grokedge.batch import Batch
from grokedge.callbacks.gram import GramCallback, analysed_module, find_gram_callback
from grokedge.functional import (
    EVALUATE,
    TRACE,
    check_evaluate,
    check_module_has,
    check_trace,
    input_keys_of,
)
from grokedge.spectral.perturbation import UNALIGNED_KEYS
from grokedge.spectral.probes import ProbeData, hidden_states_and_targets, row_strings
from grokedge.tasks.subsets import SAMPLE_UNITS, SEQUENCES, fixed_subset, loader_batches

CADENCE, GROK, END = "cadence", "grok", "end"
"""What triggered an analysis call (the ``trigger`` field of its rows)."""

DEFAULT_AT_INTERVALS = 1
DEFAULT_POST_INTERVALS = 10
FALLBACK_INTERVAL = 100
"""Phase widths without a GramCallback: as if the Gram interval were 100 steps."""


# --------------------------------------------------------------------------- validation


def check_int(key: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    """``value`` if it is an int in [minimum, maximum]; else ValueError naming ``key``."""
    ok = not isinstance(value, bool) and isinstance(value, int) and value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        allowed = f"an integer >= {minimum}" + ("" if maximum is None else f" and <= {maximum}")
        raise ValueError(f"{key}={value!r} is not allowed: {allowed}")
    return value


def check_optional_int(key: str, value: Any, minimum: int) -> int | None:
    """``None`` or an int >= minimum."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key}={value!r} is not allowed: null or an integer >= {minimum}")
    return value


def check_float(
    key: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    strict_minimum: bool = False,
) -> float:
    """A finite real number in the given range; else ValueError naming ``key``."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and math.isfinite(float(value))
    if ok and minimum is not None:
        ok = float(value) > minimum if strict_minimum else float(value) >= minimum
    if ok and maximum is not None:
        ok = float(value) <= maximum
    if not ok:
        parts = []
        if minimum is not None:
            parts.append(f"{'>' if strict_minimum else '>='} {minimum}")
        if maximum is not None:
            parts.append(f"<= {maximum}")
        allowed = "a finite number" + (" " + " and ".join(parts) if parts else "")
        raise ValueError(f"{key}={value!r} is not allowed: {allowed}")
    return float(value)


def check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key}={value!r} is not allowed: true or false")
    return value


def check_choice(key: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not allowed: one of {', '.join(choices)}")
    return value


def check_choices(key: str, value: Any, choices: Sequence[str]) -> tuple[str, ...]:
    """A non-empty list of distinct entries of ``choices`` (Hydra ListConfig accepted)."""
    if isinstance(value, str):
        value = [value]
    try:
        items = tuple(value)
    except TypeError:
        items = ()
    if not items or any(v not in choices for v in items) or len(set(items)) != len(items):
        raise ValueError(
            f"{key}={value!r} is not allowed: a non-empty list of distinct values from "
            f"{', '.join(choices)}"
        )
    return items


# --------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class AnalysisSchedule:
    """When and on what an :class:`AnalysisCallback` runs: the config keys every analysis
    shares (``callbacks.<name>.every``, ``at_grok``, ...). Each subclass gives its own
    defaults (``schedule_defaults``) and takes these as keyword arguments (``**schedule``).

    ``every``: optimizer steps between calls (None: none on a cadence); ``at_grok`` /
    ``at_end``: once when the grok step is detected / on the final weights;
    ``n_sequences``, ``sample``, ``subset_seed``, ``eval_set``: the fixed evaluation subset
    (:func:`grokedge.tasks.subsets.fixed_subset`); ``phase_at``, ``phase_post``: phase widths
    around the grok step (None: from the Gram interval); ``tables``: W&B tables per call.
    """

    every: int | None = None
    at_grok: bool = True
    at_end: bool = False
    n_sequences: int | None = 300
    sample: str = SEQUENCES
    subset_seed: int = 0
    eval_set: str = "test"
    phase_at: int | None = None
    phase_post: int | None = None
    tables: bool = True

    def checked(self, key: str) -> AnalysisSchedule:
        """Itself if every value is allowed; else ValueError naming ``key``.<field>."""
        check_optional_int(f"{key}.every", self.every, 1)
        check_bool(f"{key}.at_grok", self.at_grok)
        check_bool(f"{key}.at_end", self.at_end)
        check_optional_int(f"{key}.n_sequences", self.n_sequences, 1)
        check_int(f"{key}.subset_seed", self.subset_seed, 0)
        check_choice(f"{key}.sample", self.sample, SAMPLE_UNITS)
        eval_set = self.eval_set
        if not isinstance(eval_set, str) or not eval_set:
            raise ValueError(f"{key}.eval_set={eval_set!r} is not allowed: an evaluation set name")
        phase_at = check_optional_int(f"{key}.phase_at", self.phase_at, 0)
        phase_post = check_optional_int(f"{key}.phase_post", self.phase_post, 0)
        if phase_at is not None and phase_post is not None and phase_post < phase_at:
            raise ValueError(
                f"{key}.phase_post={phase_post} is not allowed: an integer >= phase_at ({phase_at})"
            )
        check_bool(f"{key}.tables", self.tables)
        return self


SCHEDULE_KEYS = tuple(f.name for f in fields(AnalysisSchedule))


# --------------------------------------------------------------------------- random state


@contextmanager
def preserved_random_state(device: torch.device | None = None) -> Iterator[None]:
    """Restore the global random streams (torch CPU, the device's CUDA generator, numpy,
    Python's ``random``) on exit, whatever ran inside.

    The analyses draw their own random numbers from seeded generators, but some library
    code draws from the global streams behind one's back (every DataLoader iteration takes
    a base seed from torch's global generator); training that uses them (dropout) would
    then take other numbers than without the analysis.
    """
    torch_state = torch.get_rng_state()
    cuda = device is not None and device.type == "cuda" and torch.cuda.is_available()
    cuda_state = torch.cuda.get_rng_state(device) if cuda else None
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)
        np.random.set_state(np_state)
        random.setstate(py_state)


# --------------------------------------------------------------------------- devices


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def model_inputs(model: Any, batch: Batch) -> tuple[Tensor, ...]:
    """The batch entries ``model`` takes (its ``input_keys``), in order."""
    return tuple(batch[k] for k in input_keys_of(model))


def theta_norm(params: Iterable[Tensor]) -> float:
    """‖θ‖ over ``params`` (float64 sum of squares)."""
    total = 0.0
    for p in params:
        total += float(p.detach().to(torch.float64).pow(2).sum())
    return math.sqrt(total)


@torch.no_grad()
def trace_of(model: Any, batch: Batch, params: Mapping[str, Tensor] | None = None) -> Any:
    """``model.trace(params, batch)``: the ``ModelTrace`` (hidden states per block) of the
    module (``grokedge.functional.TracedModel``) with ``params`` in place (None: the live
    weights); nothing is mutated."""
    return model.trace({} if params is None else params, batch)


def probe_target_tensors(datamodule: Any, batch: Batch, key: str) -> dict[str, Tensor]:
    """``datamodule.probe_targets(batch)`` checked: name -> [B, T] aligned with ``labels``."""
    fn = getattr(datamodule, "probe_targets", None)
    if not callable(fn):
        raise ValueError(
            f"{key}: the task's DataModule ({type(datamodule).__name__}) declares no "
            "probe_targets(batch); allowed: a task with probe targets (dyck, modular, scan)"
        )
    targets = dict(fn(batch))
    if not targets:
        raise ValueError(f"{key}: {type(datamodule).__name__}.probe_targets returned nothing")
    for name, t in targets.items():
        if t.shape != batch["labels"].shape:
            raise ValueError(
                f"{key}: probe target {name!r} has shape {list(t.shape)}, expected the "
                f"labels' {list(batch['labels'].shape)}"
            )
    return targets


def hidden_for_probe(trace: Any, block: int) -> Tensor:
    return trace.hidden[block]


def pad_id_of(datamodule: Any) -> int:
    """The task's padding id (``model_dims()["pad_id"]``; 0 where it declares none)."""
    dims = getattr(datamodule, "model_dims", None)
    return int(dims().get("pad_id", 0)) if callable(dims) else 0


def probe_data(
    datamodule: Any, net: Any, batch: Batch, hidden: Tensor, target: Tensor
) -> ProbeData:
    """The probe samples of ``target`` [B, T] in ``hidden`` [B, T, d], grouped by string.

    The one place the analyses (probes, functional R², intervention read-outs) build
    their fold groups: a row's string is its model inputs (``net.input_keys``: the
    module's or its network's) read by
    :func:`~grokedge.spectral.probes.row_strings`, the inputs aligned with ``labels`` up
    to the row's last labelled position, a seq2seq source (``UNALIGNED_KEYS``) without
    its trailing padding. Identical strings in several rows (an evaluation set that is not
    deduplicated) are then one group and never straddle a fold; distinct rows keep their
    row indices as groups.
    """
    labels = batch["labels"]
    aligned, unaligned = [], []
    for key in input_keys_of(net):
        value = batch[key]
        is_aligned = value.ndim >= 2 and value.shape[1] == labels.shape[1]
        (aligned if is_aligned and key not in UNALIGNED_KEYS else unaligned).append(value)
    strings = row_strings(labels, aligned, unaligned, pad_id_of(datamodule))
    return hidden_states_and_targets(hidden, target, batch.get("weight"), strings)


def log_now(
    trainer: L.Trainer, pl_module: L.LightningModule, values: Mapping[str, float], direct: bool
) -> None:
    """Log finite ``values`` at ``global_step``: through the module (``log_scalars``) in
    hooks where Lightning allows ``self.log``, else (``direct``) straight to the loggers."""
    finite = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
    if not finite:
        return
    if direct or not hasattr(pl_module, "log_scalars"):
        for logger in trainer.loggers:
            logger.log_metrics(finite, step=trainer.global_step)
    else:
        pl_module.log_scalars(finite)


def count_blocks(net: nn.Module) -> int | None:
    """Blocks whose outputs ``ModelTrace.hidden`` holds (decoder blocks for seq2seq): the
    module's ``n_blocks`` if it declares one, else its network's block list's length."""
    declared = getattr(net, "n_blocks", None)
    if isinstance(declared, int) and not isinstance(declared, bool):
        return declared
    net = analysed_module(net)
    for name in ("decoder_blocks", "blocks"):
        blocks = getattr(net, name, None)
        if isinstance(blocks, nn.ModuleList):
            return len(blocks)
    return None


def check_block(key: str, block: int, net: nn.Module) -> None:
    n = count_blocks(net)
    if n is not None and not -n <= block < n:
        raise ValueError(
            f"{key}={block} is not allowed: a block index in [{-n}, {n - 1}] "
            f"(the model has {n} blocks; -1 = the last)"
        )


# --------------------------------------------------------------------------- base class


@dataclass
class Result:
    """One analysis call: ``scalars`` to log, ``fields`` of its ``analyses.jsonl`` row
    (besides step, phase, grok_step, trigger and seconds), and an optional W&B table
    ``(key, columns, rows)`` (step and phase are prepended to every row)."""

    scalars: dict[str, float]
    fields: dict[str, Any] = field(default_factory=dict)
    table: tuple[str, list[str], list[list[Any]]] | None = None


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
    implement :meth:`analyse`.
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

    def __init__(self, *, config_key: str, **schedule: Any) -> None:
        super().__init__()
        self.config_key = config_key
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
        self.phase_at = schedule_.phase_at
        self.phase_post = schedule_.phase_post
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

    # ------------------------------------------------------------------ identity/checks

    @property
    def state_key(self) -> str:
        return self._generate_state_key(config_key=self.config_key)

    def required(self) -> tuple[str, ...]:
        """The protocol methods this callback will call (``requires``; none when off)."""
        return self.requires

    def check_module(self, pl_module: nn.Module) -> None:
        """Checks against the built model (``train.build`` calls this before training):
        it has what :meth:`required` names and ``input_keys`` (``grokedge.functional``)."""
        needs = self.required()
        if needs:
            check_module_has(pl_module, needs, self.config_key)

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

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.check_module(pl_module)
        self.gram = find_gram_callback(trainer, required=False)
        if self.gram is None and self.needs_edge:
            try:
                find_gram_callback(trainer)
            except ValueError as e:
                raise ValueError(f"{self.config_key}: {e}") from e
        interval = self.gram.interval if self.gram is not None else FALLBACK_INTERVAL
        at = DEFAULT_AT_INTERVALS * interval if self.phase_at is None else self.phase_at
        post = DEFAULT_POST_INTERVALS * interval if self.phase_post is None else self.phase_post
        self.phases = Phases(at=at, post=max(post, at))
        self.analysis_log = AnalysisLog(trainer.default_root_dir, enabled=trainer.is_global_zero)
        if self.required() and not callable(getattr(trainer.datamodule, "val_dataloader", None)):
            raise ValueError(
                f"{self.config_key}: needs evaluation data: a LightningDataModule with "
                "val_dataloader() (trainer.fit(module, datamodule=...)); see grokedge.functional"
            )
        names = getattr(trainer.datamodule, "eval_names", ("test",))
        if self.eval_set not in names:
            raise ValueError(
                f"{self.config_key}.eval_set={self.eval_set!r} is not allowed: one of "
                f"{', '.join(names)}"
            )
        if self.gram is not None and self.needs_edge:
            order = list(trainer.callbacks)
            if order.index(self.gram) > order.index(self):
                warnings.warn(
                    f"{self.config_key}: the GramCallback comes after this callback, so "
                    "its analyses use the edge of the previous interval; list "
                    "gram_spectrum first",
                    stacklevel=2,
                )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The model is on its device now; fail before the first optimizer step.
        self.check_batch(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
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
        self._relabel(getattr(pl_module, "grok_step", None))

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
                loader_batches(loader), self.n_sequences, self.subset_seed, self.sample, pad_id
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
        assert self.phases is not None
        self._relabel(grok)
        phase = self.phases.label(step, grok)
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
        finally:
            net.train(was_training)
        self.last_seconds = time.perf_counter() - start
        self.total_seconds += self.last_seconds
        self.calls += 1
        self.last_step = step
        self.write(step, phase, grok, trigger=trigger, **result.fields, seconds=self.last_seconds)
        if self.tables and result.table is not None:
            key, columns, rows = result.table
            log_table(
                trainer, key, ["step", "phase", *columns], [[step, phase, *r] for r in rows], step
            )
        log_now(trainer, pl_module, result.scalars, direct)

    @abstractmethod
    def analyse(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> Result:
        """Run the analysis on the current weights (network in eval mode)."""

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
        """Primitives only (``torch.load(weights_only=True)`` safe)."""
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


def edge_basis(vectors: Tensor, sigma: Tensor, indices: Sequence[int]) -> Tensor:
    """Rows ``indices`` of the edge vectors whose σ is positive ([k', p]; k' may be 0)."""
    keep = [i for i in indices if i < vectors.shape[0] and i < sigma.numel() and sigma[i] > 0]
    return vectors[keep]
