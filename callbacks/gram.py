"""GramCallback: the sliding window of update deltas and its spectral edge, online.

A thin adapter from Lightning hooks to ``grokedge.spectral`` (docs/theory.md §1;
docs/design.md, "data flow" steps 2-3):

- every optimizer step, a ``DecoupledWeightDecayTracker`` registered as an optimizer
  step pre-hook adds that step's exact weight-decay displacement −η_t ω_g θ_t (η, ω read
  from the parameter's own group at that step) to a flat accumulator. The pre-hook runs
  inside ``optimizer.step()``, after Lightning's closure (backward, gradient clipping),
  so it sees exactly the θ_t, η_t and ω_g the update uses;
- every ``interval`` optimizer steps it closes a delta: total = θ_now − θ_at_last_capture,
  wd = the accumulator, grad = total − wd (implicit), pushes it into an ``UpdateWindow``
  (incremental W×W Grams) and publishes an ``EdgeState`` (σ, top-k edge vectors, the
  per-delta projections of the grad and wd parts on each v_k).

Other callbacks read ``edge`` / ``previous`` (see :func:`find_gram_callback`) or register
with :meth:`GramCallback.add_listener`; none recomputes the edge.

All p-sized work stays on the parameters' device (or ``buffer_device``); only W×W
matrices and scalars reach the host.

Under data parallelism (Lightning's DDP: ``trainer=ddp``) each rank keeps only its
contiguous slice ``[start, stop)`` of θ_sel (``shard``): its window, WD accumulator, θ at
the last capture and edge vectors are slices, so memory and the O(W·p) work per rank fall
with the number of ranks. One all-reduce of the packed W×W matrices per delta gives every
rank the exact global Grams, hence the same σ, u_k and projections; ``edge.vectors`` is
the rank's slice of v_k (:meth:`GramCallback.gather_vectors` assembles whole ones where a
model evaluation needs them). Every rank runs the same collectives in the same order;
only rank 0 writes files (the loggers and ``analyses.jsonl`` are rank-zero only).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from grokedge.spectral import (
    DecoupledWeightDecayTracker,
    EdgeState,
    ParameterSelector,
    UpdateWindow,
    g23,
    gaps,
    kstar_ratio,
    kstar_weighted,
    spectral_ratio,
)
from grokedge.spectral.edge import WindowSpectrum
from grokedge.spectral.edge_definitions import (
    NORMALIZED,
    PAPER,
    all_spectra,
    check_definition,
    definition_edge,
)
from grokedge.spectral.memory import window_memory_bytes
from grokedge.spectral.provenance import WindowProvenance, window_provenance
from grokedge.spectral.selection import _validate_select
from grokedge.spectral.sharding import (
    Collective,
    LocalCollective,
    Shard,
    default_collective,
    reduced_window_matrices,
    to_comm_device,
)
from grokedge.spectral.window import MIN_WINDOW

GRAM_KEY = "callbacks.gram"
"""Where ``callbacks=gram`` puts this callback's config; named in error messages."""

BUFFER_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

EdgeListener = Callable[[L.Trainer, L.LightningModule, EdgeState], None]
"""Called as ``listener(trainer, pl_module, state)`` after each new edge."""

STATE_VERSION = 1

SHARDED_STATE_VERSION = 2
"""A checkpoint written by a sharded run: whole vectors gathered from every rank (so it
can be resumed on any number of ranks) plus each rank's partial W×W matrices."""


def _check_int(key: str, value: Any, minimum: int, allowed: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key}={value!r} is not allowed: {allowed}")
    return value


def _plain_select(select: Any) -> Any:
    """Hydra hands lists over as ``ListConfig``: make them plain lists."""
    if isinstance(select, str):
        return select
    try:
        return list(select)
    except TypeError:
        return select


def analysed_module(pl_module: nn.Module) -> nn.Module:
    """The module whose parameter names the selector matches: ``pl_module.net`` if any.

    Names are then those of ``GrokModule.evaluate`` (e.g. ``blocks.0.attn.in_proj_weight``).
    """
    net = getattr(pl_module, "net", None)
    return net if isinstance(net, nn.Module) else pl_module


def spectrum_scalars(state: EdgeState) -> dict[str, float]:
    """The ``gram/*`` read-outs of one window (σ in parameter units, gaps in their square).

    ``gram/sigma_{j}`` (j = 1..W'), ``gram/g23`` = σ_2² − σ_3², ``gram/kstar`` =
    argmax_j σ_j/σ_{j+1}, ``gram/kstar_weighted`` = argmax_j (σ_j/Σσ)(σ_j/σ_{j+1}),
    ``gram/ratio`` = R = σ_k*/σ_{k*+1} (k* of the first definition), ``gram/deltas`` = W'.
    Undefined values are NaN (e.g. g23 with W' = 2).
    """
    sigma = state.sigma
    values = {f"gram/sigma_{j + 1}": float(s) for j, s in enumerate(sigma.tolist())}
    kstar = kstar_ratio(sigma)
    values["gram/g23"] = g23(sigma)
    values["gram/kstar"] = float(kstar)
    values["gram/kstar_weighted"] = float(kstar_weighted(sigma))
    values["gram/ratio"] = spectral_ratio(sigma, kstar) if sigma.numel() > 1 else math.nan
    values["gram/deltas"] = float(state.count)
    return values


def spectrum_row(state: EdgeState) -> dict[str, Any]:
    """The full spectrum of one window as plain lists, for ``analyses.jsonl``."""
    scalars = spectrum_scalars(state)
    return {
        "count": state.count,
        "sigma": state.sigma.tolist(),
        "gaps": gaps(state.sigma).tolist(),
        "g23": scalars["gram/g23"],
        "kstar": int(scalars["gram/kstar"]),
        "kstar_weighted": int(scalars["gram/kstar_weighted"]),
        "ratio": scalars["gram/ratio"],
    }


def log_scalars(
    trainer: L.Trainer, pl_module: L.LightningModule, values: Mapping[str, float]
) -> None:
    """Log finite ``values`` at ``global_step``: ``pl_module.log_scalars`` when it has one
    (GrokModule), else straight to the loggers. Non-finite values (undefined read-outs)
    are left out."""
    finite = {k: float(v) for k, v in values.items() if math.isfinite(float(v))}
    if not finite:
        return
    if hasattr(pl_module, "log_scalars"):
        pl_module.log_scalars(finite)
    else:
        for logger in trainer.loggers:
            logger.log_metrics(finite, step=trainer.global_step)


class GramCallback(Callback):
    """Sliding-window Gram of the selected parameters' update deltas, with exact grad/WD split.

    Args:
        select: which parameters form θ_sel: ``"attention"`` (the paper's: every
            ``in_proj_weight`` and ``out_proj.weight``), ``"all"``, or a list of fnmatch
            patterns over the names of ``pl_module.net`` (or of the module without ``net``).
        interval: N, optimizer steps per delta (>= 1); task defaults
            ``task.gram_interval`` (100 Dyck and modular, 500 SCAN).
        window: W, deltas in the window (>= 2; the paper: 5).
        top_k: edge vectors v_1..v_k to materialise (>= 1).
        edge_definition: which window's spectrum is *the* edge (``edge``, read by every
            analysis): ``paper`` (the raw deltas), ``burn_in`` (only deltas that begin at
            or after ``start_step``) or ``normalized`` (every delta scaled to unit norm);
            see :mod:`grokedge.spectral.edge_definitions`. The spectra of all three are
            published in ``spectra`` whatever the choice.
        start_step: the burn-in, in optimizer steps (>= 0): the ``burn_in`` window takes
            only deltas that begin at or after it, and a window holding an earlier delta
            is flagged (``gram/window_holds_burn_in``). ``None``: one interval N, i.e.
            every delta but the first, θ(N) − θ(0), which carries the initial transient.
        allow_inexact_split: run with an optimizer whose weight decay is not decoupled
            (L2 in the gradient) by recording a zero WD part, instead of failing at start.
        buffer_dtype: storage of the [2, W, p] window buffers (``float32``, ``float64``,
            ``bfloat16``, ``float16``); dot products and W×W algebra are always float64.
        buffer_device: where the window and edge-vector buffers live (``None``: the
            parameters' device; e.g. ``cpu`` keeps a large window off a GPU, at the cost
            of copying each delta to it).
        shard_across_ranks: under DDP, each rank keeps its slice of θ_sel and the W×W
            matrices are all-reduced (default); ``false``: every rank keeps the whole
            window (no collectives, W·p memory per rank).
        collective: the communication of the shard (a ``grokedge.spectral.sharding.
            Collective``); ``None``: ``torch.distributed``'s default group when it has
            more than one process, else none. For tests and custom launchers.
        config_key: config path named in error messages.

    Shapes and units: p = number of selected elements; each delta is [p] in parameter
    units; σ_j in parameter units; Gram entries in squared parameter units.

    Published (read-only for other callbacks):
        edge: ``EdgeState`` of the newest window under ``edge_definition`` (``None`` until
            that window holds 2 deltas).
        spectra: ``{definition: WindowSpectrum | None}`` of the newest window under every
            definition (W×W algebra only, no vectors).
        provenance: ``WindowProvenance`` of the newest raw (``paper``) window: its span,
            burn-in flag and each delta's share of σ_1².
        previous: the ``EdgeState`` before it (for rotation; ``None`` after a restart from
            a checkpoint until the next delta, and at the start).
        evicted_dot: δ_evicted · δ_newest of the latest push (float; ``None`` when the
            window only grew, or when ``edge_definition`` is not ``paper``: it relates
            consecutive raw windows), relating ``previous`` and ``edge`` for Davis–Kahan.
        skipped_deltas: non-finite deltas skipped so far.

    ``edge.vectors`` and ``previous.vectors`` live in two preallocated [top_k, p] buffers
    that alternate: a state's vectors are overwritten two windows later (copy them to keep
    them). Listeners (:meth:`add_listener`) run right after each new edge.

    Non-finite deltas (NaN/inf in θ or in the WD part) are skipped, counted and warned
    about; the next delta starts from θ at the skipped capture.

    Logs at each closed delta (``global_step``): ``gram/sigma_{j}``, ``gram/g23``,
    ``gram/kstar``, ``gram/kstar_weighted``, ``gram/ratio``, ``gram/deltas``,
    ``gram/skipped_deltas`` (see :func:`spectrum_scalars`), and the provenance of the raw
    window: ``gram/window_first_step``, ``gram/window_last_step``,
    ``gram/window_holds_burn_in``, ``gram/dominant_delta_share`` (largest share of σ_1²
    owned by one delta), ``gram/dominant_delta_step`` (that delta's begin step).

    Example:
        >>> gram = GramCallback(select="attention", interval=100, window=5, top_k=4)
        >>> trainer = L.Trainer(callbacks=[gram, EdgeAlignmentCallback()])  # doctest: +SKIP
        >>> trainer.fit(module, datamodule)                                   # doctest: +SKIP
        >>> gram.edge.sigma, gram.edge.vectors.shape                          # doctest: +SKIP
        (tensor([...], dtype=torch.float64), torch.Size([4, 131072]))
    """

    def __init__(
        self,
        select: str | Sequence[str] = "attention",
        interval: int = 100,
        window: int = 5,
        top_k: int = 4,
        edge_definition: str = NORMALIZED,
        start_step: int | None = None,
        allow_inexact_split: bool = False,
        buffer_dtype: str = "float32",
        buffer_device: str | None = None,
        shard_across_ranks: bool = True,
        collective: Collective | None = None,
        config_key: str = GRAM_KEY,
    ) -> None:
        super().__init__()
        self.config_key = config_key
        checked = _validate_select(_plain_select(select), f"{config_key}.select")
        self.select: str | list[str] = checked if isinstance(checked, str) else list(checked)
        self.interval = _check_int(f"{config_key}.interval", interval, 1, "an integer >= 1")
        self.window_size = _check_int(
            f"{config_key}.window", window, MIN_WINDOW, f"an integer >= {MIN_WINDOW}"
        )
        self.top_k = _check_int(f"{config_key}.top_k", top_k, 1, "an integer >= 1")
        self.edge_definition = check_definition(f"{config_key}.edge_definition", edge_definition)
        self.start_step = (
            self.interval
            if start_step is None
            else _check_int(
                f"{config_key}.start_step",
                start_step,
                0,
                "null or an integer >= 0 (optimizer steps)",
            )
        )
        if not isinstance(allow_inexact_split, bool):
            raise ValueError(
                f"{config_key}.allow_inexact_split={allow_inexact_split!r} is not allowed: "
                "true or false"
            )
        self.allow_inexact_split = allow_inexact_split
        if buffer_dtype not in BUFFER_DTYPES:
            raise ValueError(
                f"{config_key}.buffer_dtype={buffer_dtype!r} is not allowed: one of "
                f"{', '.join(BUFFER_DTYPES)}"
            )
        self.buffer_dtype = buffer_dtype
        self.buffer_device = _check_device(f"{config_key}.buffer_device", buffer_device)
        if not isinstance(shard_across_ranks, bool):
            raise ValueError(
                f"{config_key}.shard_across_ranks={shard_across_ranks!r} is not allowed: "
                "true or false"
            )
        self.shard_across_ranks = shard_across_ranks
        self.collective = collective
        self.shard: Shard | None = None  # this rank's slice, set by attach
        self.predicted_bytes: int | None = None

        self.edge: EdgeState | None = None
        self.previous: EdgeState | None = None
        self.spectra: dict[str, WindowSpectrum | None] = {}
        self.provenance: WindowProvenance | None = None
        self.evicted_dot: float | None = None
        # ‖δ‖² of the raw window's oldest delta at the last publish: the evicted one's
        # norm at the next (the normalized edge's evicted dot).
        self._raw_oldest_sq = 0.0
        self.skipped_deltas = 0
        self.last_capture_step: int | None = None

        self.selector: ParameterSelector | None = None
        self.window: UpdateWindow | None = None
        self.tracker: DecoupledWeightDecayTracker | None = None
        self._params: list[Tensor] = []
        self._theta_prev: Tensor | None = None  # [p] θ at the last capture
        self._total: Tensor | None = None  # [p] scratch for the newest total delta
        self._vector_bufs: list[Tensor] = []  # two [top_k, p]: edge and previous alternate
        self._prev_views: list[Tensor] = []
        self._total_views: list[Tensor] = []
        self._handle: RemovableHandle | None = None
        self._pending_state: dict[str, Any] | None = None
        self._listeners: list[EdgeListener] = []

    # ------------------------------------------------------------------------ identity

    @property
    def state_key(self) -> str:
        # Stable across knob changes, so that a resume with another interval or window
        # fails loudly in load_state_dict instead of silently starting a fresh window.
        return self._generate_state_key(config_key=self.config_key)

    def add_listener(self, listener: EdgeListener) -> None:
        """Call ``listener(trainer, pl_module, state)`` after every new edge (once each)."""
        if listener not in self._listeners:
            self._listeners.append(listener)

    # ------------------------------------------------------------------------- checks

    def make_selector(self, pl_module: nn.Module) -> ParameterSelector:
        """The selector over ``analysed_module(pl_module)``; ValueError naming
        ``<config_key>.select`` if it matches nothing."""
        return ParameterSelector.from_module(
            analysed_module(pl_module), self.select, key=f"{self.config_key}.select"
        )

    def check_module(self, pl_module: nn.Module, optimizer: Optimizer | None = None) -> None:
        """Validate against a built model before training (for ``train.build``).

        Raises ValueError naming the key if the selector matches nothing or, when an
        optimizer is given (or ``pl_module.optimizer_factory`` builds one), if its weight
        decay cannot be split exactly and ``allow_inexact_split`` is false.
        """
        selector = self.make_selector(pl_module)
        if optimizer is None and callable(getattr(pl_module, "optimizer_factory", None)):
            optimizer = pl_module.optimizer_factory(analysed_module(pl_module).parameters())
        if optimizer is not None:
            self._make_tracker(optimizer, selector.named(analysed_module(pl_module)))

    def _make_tracker(
        self,
        optimizer: Optimizer,
        named: list[tuple[str, Tensor]],
        start: int = 0,
        stop: int | None = None,
    ) -> DecoupledWeightDecayTracker:
        # With allow_inexact_split the tracker warns once and records zeros.
        try:
            return DecoupledWeightDecayTracker(
                optimizer, named, allow_inexact=self.allow_inexact_split, start=start, stop=stop
            )
        except ValueError as e:
            raise ValueError(
                f"{self.config_key}.allow_inexact_split={self.allow_inexact_split}: {e}. "
                f"Allowed: a decoupled optimizer, or {self.config_key}."
                "allow_inexact_split=true to run without the split (the whole delta "
                "then counts as gradient)"
            ) from e

    # ----------------------------------------------------------------- Lightning hooks

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            _refuse_fsdp(trainer, self.config_key)
            self.selector = self.make_selector(pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs after the strategy moved the model to its device and built the optimizer
        # (and initialised the process group), and (for most strategies) after
        # load_state_dict stashed a checkpoint's state.
        model = analysed_module(pl_module)
        self.attach(model, self._optimizer_for(trainer, model), step=trainer.global_step)
        self._report_memory(trainer)

    def _report_memory(self, trainer: L.Trainer) -> None:
        """Log ``gram/predicted_bytes`` (this rank's buffers) once; say it on rank 0."""
        assert self.shard is not None and self.predicted_bytes is not None
        shard = self.shard
        values = {"gram/predicted_bytes": float(self.predicted_bytes)}
        # self.log is not allowed in on_fit_start: straight to the (rank-zero) loggers.
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
        where = (
            f"per rank, slice of {shard.n:,} of p = {shard.p:,} on {shard.world_size} ranks"
            if shard.sharded
            else f"p = {shard.p:,}"
        )
        rank_zero_info(
            f"grokedge: {self.config_key} predicts {self.predicted_bytes / 2**20:,.1f} MiB "
            f"of buffers ({where}; W = {self.window_size}, top_k = {self.top_k}, "
            f"{self.buffer_dtype})"
        )

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if self.last_capture_step is None or step - self.last_capture_step < self.interval:
            return
        pushed = self.capture(step)
        values: dict[str, float] = {"gram/skipped_deltas": float(self.skipped_deltas)}
        if pushed and self.edge is not None:
            values.update(spectrum_scalars(self.edge))
        if pushed and self.provenance is not None:
            values.update(self.provenance.scalars())
        log_scalars(trainer, pl_module, values)
        if pushed and self.edge is not None:
            for listener in self._listeners:
                listener(trainer, pl_module, self.edge)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # ---------------------------------------------------------------------- sharding

    def gather_vectors(self, vectors: Tensor) -> Tensor:
        """Whole edge vectors [m, p] from this rank's slices [m, n_local] (e.g. rows of
        ``edge.vectors``). Collective under sharding (every rank must call it); the input
        itself on one rank. For analyses whose model evaluation needs whole directions."""
        assert self.shard is not None
        return self.shard.gather(vectors)

    def reduce(self, partial: Tensor) -> Tensor:
        """Σ over ranks of a partial result computed on this rank's slices (e.g. the Gram
        of sliced vectors from ``geometry.stacked_gram``). Collective under sharding."""
        assert self.shard is not None
        if not self.shard.sharded:
            return partial
        return self.shard.sum(to_comm_device(self.shard, partial)).to(partial.device)

    # ------------------------------------------------------------------ the mechanics

    def _optimizer_for(self, trainer: L.Trainer, model: nn.Module) -> Optimizer:
        assert self.selector is not None
        first = dict(model.named_parameters())[self.selector.names[0]]
        for optimizer in trainer.optimizers:
            if any(p is first for g in optimizer.param_groups for p in g["params"]):
                return optimizer
        raise ValueError(f"{self.config_key}.select: no optimizer holds {self.selector.names[0]!r}")

    @torch.no_grad()
    def attach(self, model: nn.Module, optimizer: Optimizer, step: int = 0) -> None:
        """Allocate the buffers on the parameters' device and start tracking ``optimizer``.

        Takes θ at ``step`` as the first capture point, unless a checkpoint's state is
        pending (then that state is loaded). Lightning calls this from ``on_fit_start``;
        call it yourself to use the callback without a Trainer.
        """
        if self._handle is not None:
            self._handle.remove()
        if self.selector is None:
            self.selector = self.make_selector(model)
        named = self.selector.named(model)
        device = named[0][1].device
        dtype = named[0][1].dtype
        for _, param in named[1:]:
            dtype = torch.promote_types(dtype, param.dtype)
        p = self.selector.p
        if self.shard_across_ranks:
            collective = self.collective if self.collective is not None else default_collective()
        else:
            collective = LocalCollective()
        self.shard = shard = Shard.of(p, collective)
        if shard.n < 1:
            raise ValueError(
                f"{self.config_key}.select selects p={p} elements, fewer than the "
                f"{shard.world_size} ranks; allowed: at least one element per rank (or "
                f"{self.config_key}.shard_across_ranks=false)"
            )
        self._theta_prev = torch.empty(shard.n, dtype=dtype, device=device)
        self._total = torch.empty(shard.n, dtype=dtype, device=device)
        if shard.sharded:
            # Views of this rank's part of each parameter and of the slice buffers.
            by_name = dict(named)
            segments = self.selector.segments(shard.start, shard.stop)
            self._params = [
                by_name[s.name].detach().reshape(-1)[s.param_start : s.param_stop] for s in segments
            ]
            self._prev_views = [
                self._theta_prev[s.slice_offset : s.slice_offset + s.numel] for s in segments
            ]
            self._total_views = [
                self._total[s.slice_offset : s.slice_offset + s.numel] for s in segments
            ]
        else:
            self._params = [param.detach() for _, param in named]
            self._prev_views = list(self.selector.unflatten(self._theta_prev).values())
            self._total_views = list(self.selector.unflatten(self._total).values())
        buffer_device = device if self.buffer_device is None else torch.device(self.buffer_device)
        self.window = UpdateWindow(
            self.window_size, shard.n, device=buffer_device, dtype=BUFFER_DTYPES[self.buffer_dtype]
        )
        # Preallocated: a fresh p-sized allocation per window costs page faults.
        self._vector_bufs = [
            torch.empty(self.top_k, shard.n, dtype=self.window.dtype, device=buffer_device)
            for _ in range(2)
        ]
        self.predicted_bytes = window_memory_bytes(
            shard.n,
            self.window_size,
            self.top_k,
            self.buffer_dtype,
            param_dtype=dtype,
            device_type=buffer_device.type,
        )
        self.tracker = self._make_tracker(optimizer, named, shard.start, shard.stop)
        self._handle = self.tracker.register()
        self.edge = self.previous = None
        self.spectra, self.provenance = {}, None
        self.evicted_dot = None
        self.skipped_deltas = 0
        torch._foreach_copy_(self._prev_views, self._params)
        self.last_capture_step = int(step)
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._load(state)

    @torch.no_grad()
    def capture(self, step: int) -> bool:
        """Close the delta θ_now − θ_at_last_capture with its accumulated WD part.

        Returns whether it entered the window (False: non-finite, skipped).
        """
        assert self.tracker is not None and self._total is not None
        for out, param, prev in zip(self._total_views, self._params, self._prev_views, strict=True):
            torch.sub(param, prev, out=out)  # one pass: total = θ_now − θ_prev
        torch._foreach_copy_(self._prev_views, self._params)
        wd = self.tracker.accumulated
        pushed = self.push_delta(self._total, wd, step, begin=self.last_capture_step)
        wd.zero_()
        self.tracker.steps = 0
        self.last_capture_step = int(step)
        return pushed

    @torch.no_grad()
    def push_delta(self, total: Tensor, wd: Tensor, step: int, begin: int | None = None) -> bool:
        """Push one delta (total [p], its WD part [p]) and publish the new edge.

        ``begin``: the step the delta starts from (θ(step) − θ(begin)); ``None``: unknown.
        A delta with any non-finite entry in either part is skipped, counted in
        ``skipped_deltas`` and warned about; the window, ``edge`` and ``previous`` stay
        as they were. Returns whether the delta was pushed.
        """
        assert self.window is not None and self.shard is not None
        # The push's own dot products detect NaN/inf (one host sync of a 2×2 matrix);
        # sharded, their sum over ranks, so that all ranks skip or push together.
        reduce = self.reduce if self.shard.sharded else None
        span = None if begin is None else (int(begin), int(step))
        if not self.window.push(total, wd, check_finite=True, reduce=reduce, span=span):
            self.skipped_deltas += 1
            warnings.warn(
                f"{self.config_key}: non-finite update delta at step {step} skipped "
                f"({self.skipped_deltas} so far); the window keeps its "
                f"{self.window.count} earlier deltas",
                RuntimeWarning,
                stacklevel=2,
            )
            return False
        if self.window.count >= MIN_WINDOW:
            self.previous = self.edge
            self._publish(step)
        else:
            self.evicted_dot = None
        return True

    def _publish(self, step: int) -> None:
        """The spectra of the window under every definition, its provenance and the edge
        under ``edge_definition``. Sharded, every rank gets here together (the finiteness
        decision is global): one all-reduce of the packed W×W matrices and the evicted
        dot; the rest is the same W×W algebra on every rank."""
        assert self.window is not None and self.shard is not None
        g, c, w, evicted = reduced_window_matrices(self.window, self.shard)
        spans = self.window.spans()
        self.spectra = all_spectra(g, c, w, spans, self.top_k, step, self.start_step)
        paper = self.spectra[PAPER]
        self.provenance = None if paper is None else window_provenance(paper, self.start_step)
        self.edge = definition_edge(
            self.edge_definition,
            g,
            c,
            w,
            self.window,
            spans,
            self.top_k,
            step,
            self.start_step,
            out=self._free_buffer(),
        )
        self.evicted_dot = self._edge_evicted_dot(g, evicted)
        self._raw_oldest_sq = float(g[0, 0])

    def _edge_evicted_dot(self, gram: Tensor, evicted: float | None) -> float | None:
        """δ'_evicted · δ'_newest in the rows of ``edge_definition`` (what relates
        ``previous`` and ``edge`` for Davis–Kahan), or ``None`` when ``edge``'s window
        grew instead of sliding. ``gram``: the raw window's G after the push."""
        if evicted is None or self.edge is None or self.previous is None:
            return None
        if self.edge_definition == NORMALIZED:
            norms = math.sqrt(self._raw_oldest_sq * float(gram[-1, -1]))
            return evicted / norms if norms > 0 else 0.0
        # burn_in: the raw evicted delta was in the previous edge's window only if that
        # window kept its size (otherwise the burn-in had excluded it: the window grew).
        return evicted if self.edge.count == self.previous.count else None

    def _edge_step(self) -> int | None:
        """Step of the newest published window (its spectra exist even while a burn-in
        leaves ``edge`` empty)."""
        if self.edge is not None:
            return self.edge.step
        paper = self.spectra.get(PAPER)
        return None if paper is None else paper.step

    def _free_buffer(self) -> Tensor:
        """The vector buffer that ``previous`` (about to be dropped) does not use."""
        in_use = self.edge.vectors if self.edge is not None else None
        for buf in self._vector_bufs:
            if in_use is None or buf.data_ptr() != in_use.data_ptr():
                return buf
        raise AssertionError("both vector buffers in use")

    # -------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Tensors and primitives only (``torch.load(weights_only=True)`` safe)."""
        if self.window is None or self.tracker is None or self._theta_prev is None:
            return dict(self._pending_state or {})
        if self.shard is not None and self.shard.sharded:
            return self._sharded_state_dict()
        return {
            "version": STATE_VERSION,
            "select": self.select,
            "interval": self.interval,
            "p": self.window.p,
            "last_capture_step": self.last_capture_step,
            "skipped_deltas": self.skipped_deltas,
            "edge_step": self._edge_step(),
            "theta_prev": self._theta_prev,
            "window": self.window.state_dict(),
            "tracker": self.tracker.state_dict(),
        }

    @torch.no_grad()
    def _sharded_state_dict(self) -> dict[str, Any]:
        """Collective (Lightning builds the checkpoint on every rank, rank 0 writes it):
        every p-sized buffer gathered whole, so that the checkpoint resumes on any number
        of ranks, the window's matrices summed (what one process would hold), and each
        rank's own partial matrices, restored bit for bit on the same number of ranks."""
        assert self.window is not None and self.tracker is not None and self.shard is not None
        assert self._theta_prev is not None
        shard = self.shard
        window = self.window.state_dict()
        partial = window["matrices"]
        deltas = shard.gather(_comm(shard, window["deltas"])).to("cpu")
        theta_prev = shard.gather(_comm(shard, self._theta_prev)).to("cpu")
        tracker = dict(self.tracker.state_dict())
        tracker["accumulated"] = shard.gather(_comm(shard, tracker["accumulated"])).to("cpu")
        tracker["start"], tracker["stop"] = 0, shard.p
        per_rank = torch.stack(shard.collective.all_gather(_comm(shard, partial.reshape(-1)))).to(
            "cpu"
        )
        window.update(
            p=shard.p,
            deltas=deltas,
            matrices=per_rank.sum(0).reshape(partial.shape),
        )
        return {
            "version": SHARDED_STATE_VERSION,
            "select": self.select,
            "interval": self.interval,
            "p": shard.p,
            "last_capture_step": self.last_capture_step,
            "skipped_deltas": self.skipped_deltas,
            "edge_step": self._edge_step(),
            "theta_prev": theta_prev,
            "window": window,
            "tracker": tracker,
            "world_size": shard.world_size,
            "rank_matrices": per_rank.reshape(shard.world_size, *partial.shape),
        }

    def _slice_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """A whole-vector state cut down to this rank's slice (any world size wrote it)."""
        assert self.shard is not None and self.window is not None
        shard = self.shard
        window = dict(state["window"])
        deltas = shard.take(window["deltas"]).contiguous()
        if int(state.get("world_size", 1)) == shard.world_size and "rank_matrices" in state:
            matrices = state["rank_matrices"][shard.rank]
        else:
            # Another layout wrote it: this slice's partial matrices from its deltas.
            matrices = _partial_matrices(deltas)
        window.update(p=shard.n, deltas=deltas, matrices=matrices)
        tracker = dict(state["tracker"])
        tracker["accumulated"] = shard.take(tracker["accumulated"]).contiguous()
        tracker["start"], tracker["stop"] = shard.start, shard.stop
        return {
            **state,
            "p": shard.p,
            "theta_prev": shard.take(state["theta_prev"]),
            "window": window,
            "tracker": tracker,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore; before ``attach`` (Lightning restores callbacks before
        ``on_fit_start``) the state waits and ``attach`` loads it."""
        if not state_dict:
            return
        if self.window is None:
            self._pending_state = dict(state_dict)
        else:
            self._load(state_dict)

    @torch.no_grad()
    def _load(self, state: dict[str, Any]) -> None:
        assert self.window is not None and self.tracker is not None
        assert self._theta_prev is not None and self.shard is not None
        key = self.config_key
        if int(state["p"]) != self.shard.p:
            raise ValueError(
                f"{key}.select={self.select!r} selects p={self.shard.p} elements; the "
                f"checkpoint's window has p={state['p']}"
            )
        if self.shard.sharded:
            state = self._slice_state(state)
        # Unsharded, a sharded run's state loads as it is: its whole vectors and summed
        # matrices are what one process holds.
        if int(state["interval"]) != self.interval:
            raise ValueError(
                f"{key}.interval={self.interval} differs from the checkpoint's "
                f"{state['interval']}; resume with the same interval"
            )
        if int(state["window"]["size"]) != self.window.size:
            raise ValueError(
                f"{key}.window={self.window.size} differs from the checkpoint's "
                f"{state['window']['size']}; resume with the same window"
            )
        self._theta_prev.copy_(state["theta_prev"])
        self.window.load_state_dict(state["window"])
        self.tracker.load_state_dict(state["tracker"])
        self.last_capture_step = int(state["last_capture_step"])
        self.skipped_deltas = int(state["skipped_deltas"])
        # The newest edge is a deterministic function of the restored window: recompute
        # it (same buffers, same W×W matrices, same numbers) rather than storing [k, p].
        edge_step = state.get("edge_step")
        self.edge = None
        self.spectra, self.provenance = {}, None
        if edge_step is not None and self.window.count >= MIN_WINDOW:
            # Collective when sharded: every rank loads the same checkpoint.
            self._publish(int(edge_step))
        self.previous = None
        self.evicted_dot = None


def _comm(shard: Shard, tensor: Tensor) -> Tensor:
    return to_comm_device(shard, tensor.detach())


def _partial_matrices(deltas: Tensor) -> Tensor:
    """[3, W, W] float64 (G, C, X_wd X_wdᵀ in ring order) of a window slice's buffer
    [2, W, n] — what its incremental pushes would have accumulated, up to summation order."""
    total, wd = deltas[0].to(torch.float64), deltas[1].to(torch.float64)
    return torch.stack([total @ total.T, wd @ total.T, wd @ wd.T])


def _check_device(key: str, value: Any) -> str | None:
    if value is None:
        return None
    try:
        torch.device(value)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"{key}={value!r} is not allowed: null (the parameters' device) or a torch "
            "device such as cpu, cuda, cuda:1"
        ) from e
    return str(value)


def _refuse_fsdp(trainer: L.Trainer, key: str) -> None:
    """FSDP shards parameters into flat buffers whose names the selector cannot match,
    and Lightning 2.6 runs it on GPUs only: say so before training instead of failing
    inside a hook."""
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(trainer.strategy, FSDPStrategy):
        raise ValueError(
            f"{key}: the GramCallback does not support the FSDP strategy yet (its "
            "selected parameters are FSDP's sharded flat parameters); allowed strategies: "
            "single device, ddp (trainer=ddp: each rank then keeps its slice of θ_sel)"
        )


def find_gram_callback(trainer: L.Trainer, required: bool = True) -> GramCallback | None:
    """The trainer's ``GramCallback`` (the first, if several).

    Raises:
        ValueError: none is attached and ``required`` (the message says how to add one).
    """
    for callback in trainer.callbacks:
        if isinstance(callback, GramCallback):
            return callback
    if required:
        raise ValueError(
            f"this analysis needs a GramCallback ({GRAM_KEY}); use callbacks=gram, or add "
            "gram_spectrum to the defaults of your callbacks set"
        )
    return None
