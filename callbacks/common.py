"""Shared plumbing of the causal-analysis callbacks (ablation, perturbation, probes, ...).

- argument checks whose errors name the config key, the value and what is allowed;
- :func:`fixed_subset`: a fixed, seeded evaluation subset of a task's test set as one
  batch (deduplicated rows keep exact multiplicities);
- :class:`BucketedEvaluate`: the functional evaluation of that batch in length buckets;
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
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from threadpoolctl import threadpool_limits
from torch import Tensor, nn

from grokedge.analysis_log import AnalysisLog, Phases, log_table
from grokedge.batch import IGNORE_INDEX, Batch
from grokedge.callbacks.gram import GramCallback, analysed_module, find_gram_callback
from grokedge.functional import (
    EVALUATE,
    TRACE,
    check_evaluate,
    check_module_has,
    check_trace,
    input_keys_of,
)
from grokedge.spectral import (
    ParameterSelector,
    flat_evaluator,
)
from grokedge.spectral.probes import ProbeData, hidden_states_and_targets, row_strings

SEQUENCES, ROWS = "sequences", "rows"
SAMPLE_UNITS = (SEQUENCES, ROWS)

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
    (:func:`fixed_subset`); ``phase_at``, ``phase_post``: phase widths
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


# --------------------------------------------------------------------------- subsets


def _rows_of(batches: Iterable[Batch]) -> tuple[list[Batch], list[tuple[int, int]], Tensor]:
    kept, where, weights = [], [], []
    for b, batch in enumerate(batches):
        batch = {k: v for k, v in batch.items() if isinstance(v, Tensor)}
        kept.append(batch)
        n = batch["labels"].shape[0]
        w = batch.get("weight")
        w = torch.ones(n) if w is None else w.detach().to("cpu", torch.float64)
        where += [(b, r) for r in range(n)]
        weights.append(w.to(torch.float64))
    return kept, where, torch.cat(weights) if weights else torch.zeros(0, dtype=torch.float64)


def fixed_subset(
    batches: Iterable[Batch],
    n: int | None,
    seed: int,
    unit: str = SEQUENCES,
    pad_id: int = 0,
) -> Batch:
    """A fixed, seeded evaluation subset of a set of batches, merged into one batch.

    Evaluation batches may hold *deduplicated* rows: a row of ``weight`` w stands for w
    identical sequences (Dyck's 5,000 test sequences are ~2,200 rows). Two ways to draw:

    - ``unit="sequences"`` (default): ``n`` of the *original* sequences (Σ weight of them)
      without replacement, deduplicated again: each drawn row gets as weight the number of
      its copies drawn. This is "n test sequences" as the paper evaluates them, at the
      cost of the distinct rows only. Needs integral weights (else rows are drawn);
    - ``unit="rows"``: ``n`` distinct rows, each keeping its full-set multiplicity as
      weight (a weighted subset of the whole set's distribution).

    ``n=None`` or ``n`` at least the set's size: the whole set, weights unchanged. The draw
    uses its own CPU generator seeded ``seed`` (no global random state is touched).
    Rows are ordered by labelled length (stable; see :class:`BucketedEvaluate`); tensors
    of rank >= 2 are right-padded to the widest batch (``labels`` with ``IGNORE_INDEX``,
    the others with ``pad_id``, the task's padding id: right padding never changes a real
    position of a causal encoder or decoder, and the seq2seq encoder masks ``pad_id``).

    Returns:
        One batch: every key of the input batches, ``weight`` [B] float32.
    """
    kept, where, weights = _rows_of(batches)
    if not where:
        raise ValueError("the evaluation set has no rows")
    generator = torch.Generator().manual_seed(int(seed))
    total_rows = len(where)
    integral = bool(torch.all(weights == weights.round())) and bool(torch.all(weights >= 0))
    if n is None:
        chosen, new_weight = torch.arange(total_rows), weights
    elif unit == SEQUENCES and integral:
        counts = weights.round().long()
        total = int(counts.sum())
        if n >= total:
            chosen, new_weight = torch.arange(total_rows), weights
        else:
            owner = torch.repeat_interleave(torch.arange(total_rows), counts)
            drawn = owner[torch.randperm(total, generator=generator)[:n]]
            per_row = torch.bincount(drawn, minlength=total_rows)
            chosen = per_row.nonzero().squeeze(1)
            new_weight = per_row[chosen].to(torch.float64)
    else:
        if n >= total_rows:
            chosen, new_weight = torch.arange(total_rows), weights
        else:
            chosen = torch.randperm(total_rows, generator=generator)[:n].sort().values
            new_weight = weights[chosen]

    picked = [where[i] for i in chosen.tolist()]
    # Rows by labelled length (stable): length buckets are then contiguous row ranges.
    lengths = [_labelled_length(kept[b]["labels"][r]) for b, r in picked]
    order = sorted(range(len(picked)), key=lambda i: lengths[i])
    picked = [picked[i] for i in order]
    new_weight = new_weight[torch.tensor(order, dtype=torch.long)]
    keys = [k for k in kept[0] if all(k in b for b in kept)]
    out: Batch = {}
    for key in keys:
        width = max(int(b[key].shape[1]) for b in kept) if kept[0][key].ndim >= 2 else None
        parts = []
        for b_idx, r in picked:
            part = kept[b_idx][key][r : r + 1]
            if width is not None and part.shape[1] < width:
                fill = IGNORE_INDEX if key == "labels" else pad_id
                pad = part.new_full((1, width - part.shape[1], *part.shape[2:]), fill)
                part = torch.cat([part, pad], dim=1)
            parts.append(part)
        out[key] = torch.cat(parts)
    out["weight"] = new_weight.to(torch.float32)
    return out


def _labelled_length(labels: Tensor) -> int:
    """1 + the last labelled position of a row (0 if none)."""
    idx = (labels != IGNORE_INDEX).nonzero()
    return int(idx.max()) + 1 if idx.numel() else 0


def loader_batches(loader: Any) -> list[Batch]:
    """The batches of an evaluation loader: read from its map-style dataset of pre-built
    batches when it has one (no iteration: a DataLoader iterator draws a seed from the
    global random stream), else by iterating it."""
    dataset = getattr(loader, "dataset", None)
    if getattr(loader, "batch_size", 0) is None and hasattr(dataset, "__getitem__"):
        try:
            return [dataset[i] for i in range(len(dataset))]
        except TypeError:  # not sized
            pass
    return list(loader)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def model_inputs(model: Any, batch: Batch) -> tuple[Tensor, ...]:
    """The batch entries ``model`` takes (its ``input_keys``), in order."""
    return tuple(batch[k] for k in input_keys_of(model))


UNALIGNED_KEYS = ("src",)
"""Batch keys never trimmed with the labels (a seq2seq source has its own width)."""

DEFAULT_BUCKETS = 4


class BucketedEvaluate:
    """A :data:`~grokedge.spectral.FlatEvaluate` that runs one fixed batch in length buckets.

    The fixed subset is padded to its longest row; evaluating it in ``buckets`` groups of
    consecutive rows (rows sorted by length, as :func:`fixed_subset` returns them), each
    trimmed to its own longest row, skips most of the padding (~30 % of the tokens of a
    300-sequence Dyck subset). Right padding never changes a real position (causal model),
    and the bucket results are combined with the same token weights as
    ``TokenStats.mean_loss`` / ``accuracy``, so loss and accuracy equal those of the whole
    batch up to float summation order; the logits come back [B, T, C] in the batch's
    layout (zeros past each bucket's width, where no label is). Called with any other
    batch it is the plain ``flat_evaluator``.

    Args:
        evaluate_params, selector, params, dtype: as ``flat_evaluator``.
        batch: the fixed batch (compared by identity at each call).
        buckets: number of row groups (1: no bucketing).
    """

    def __init__(
        self,
        evaluate_params: Any,
        selector: ParameterSelector,
        params: Any,
        batch: Batch,
        buckets: int = DEFAULT_BUCKETS,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.inner = flat_evaluator(evaluate_params, selector, params, dtype)
        self.batch = batch
        labels = batch["labels"]
        rows, width = labels.shape
        lengths = [_labelled_length(row) for row in labels]
        if any(a > b for a, b in zip(lengths, lengths[1:], strict=False)):
            buckets = 1  # not sorted by length: no contiguous buckets
        n = max(1, min(buckets, rows))
        bounds = sorted({round(i * rows / n) for i in range(n + 1)})
        valid = labels != IGNORE_INDEX
        weight = batch["weight"].to(torch.float64)
        self.width = width
        self.parts: list[tuple[int, int, int, Batch]] = []
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            w = max(1, max(lengths[lo:hi]))
            sub = {}
            for key, value in batch.items():
                aligned = value.ndim >= 2 and value.shape[1] == width
                aligned = aligned and key not in UNALIGNED_KEYS
                sub[key] = value[lo:hi, :w] if aligned else value[lo:hi]
            self.parts.append((lo, hi, w, sub))
        self._acc_weight = [
            float((weight[lo:hi, None] * valid[lo:hi]).sum()) for lo, hi, *_ in self.parts
        ]
        self._loss_weight: list[float] | None = None

    def _loss_weights(self, classes: int) -> list[float]:
        if self._loss_weight is None:
            labels = self.batch["labels"]
            ok = (labels != IGNORE_INDEX) & (labels < classes)
            weight = self.batch["weight"].to(torch.float64)
            self._loss_weight = [
                float((weight[lo:hi, None] * ok[lo:hi]).sum()) for lo, hi, *_ in self.parts
            ]
        return self._loss_weight

    def __call__(self, flat: Tensor, batch: Batch) -> tuple[Any, Any, Tensor]:
        if batch is not self.batch:
            return self.inner(flat, batch)
        results = [self.inner(flat, sub) for *_, sub in self.parts]
        classes = results[0][2].shape[-1]
        loss_w = self._loss_weights(classes)
        loss = sum(r[0] * (w / sum(loss_w)) for r, w in zip(results, loss_w, strict=True) if w)
        acc = sum(
            r[1] * (w / sum(self._acc_weight))
            for r, w in zip(results, self._acc_weight, strict=True)
            if w
        )
        logits = torch.cat([F.pad(r[2], (0, 0, 0, self.width - r[2].shape[1])) for r in results])
        return loss, acc, logits

    def loss_fn(self) -> Any:
        """``θ_sel [p] -> loss`` on the fixed batch (differentiable under torch.func)."""
        return lambda flat: self(flat, self.batch)[0]


# --------------------------------------------------------------------------- measures


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
