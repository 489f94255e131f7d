"""GramCallback: the sliding window of update deltas and its spectral edge, online.

A thin adapter from Lightning hooks to :class:`grokedge.edge.recorder.DeltaRecorder`
(the mechanics: docs/theory.md §1; docs/design.md, "data flow" steps 2-3). It checks the
``callbacks.gram.*`` config, finds the module and its optimizer, captures at
``on_train_batch_end``, logs the ``gram/*`` read-outs and calls the listeners. Other
callbacks read ``edge`` / ``previous`` (:func:`find_gram_callback`) or register with
:meth:`GramCallback.add_listener`; none recomputes the edge.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.optim import Optimizer

from grokedge.analysis_log import Phases, log_scalars
from grokedge.checks import (
    check_bool,
    check_choice,
    check_device,
    check_int,
    check_optional_int,
)
from grokedge.config_checks import built_from_config, message_label, names_python_arguments
from grokedge.edge.definitions import NORMALIZED, check_definition
from grokedge.edge.derived_windows import DerivedWindows, check_interval_multiples
from grokedge.edge.provenance import WindowProvenance
from grokedge.edge.readouts import spectrum_scalars
from grokedge.edge.recorder import BUFFER_DTYPES, DeltaRecorder
from grokedge.edge.selection import ParameterSelector, check_select
from grokedge.edge.sharding import Collective, Shard
from grokedge.edge.spectrum import EdgeState, WindowSpectrum
from grokedge.edge.weight_decay import DecoupledWeightDecayTracker
from grokedge.edge.window import MIN_WINDOW, UpdateWindow
from grokedge.functional import analysed_module
from grokedge.optimizer_facts import optimizer_for

GRAM_KEY = "callbacks.gram"
"""Where ``callbacks=gram`` puts this callback's config; named in error messages."""

EdgeListener = Callable[[L.Trainer, L.LightningModule, EdgeState], None]
"""Called as ``listener(trainer, pl_module, state)`` after each new edge."""

DerivedListener = Callable[[L.Trainer, L.LightningModule, int, int], None]
"""Called as ``listener(trainer, pl_module, interval, step)`` after each new derived
window (``interval``: its N = k·N0, in optimizer steps)."""

DEFAULT_INTERVAL_MULTIPLES = (1, 2, 3)
"""Gram intervals recorded from one run by default: N0, 2·N0 and 3·N0 (the base
interval and two derived windows; conf/callbacks/gram_spectrum.yaml)."""


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
            analysis): ``paper``, ``burn_in`` or ``normalized`` (docs/edge_definitions.md);
            ``spectra`` holds all three whatever the choice.
        start_step: the burn-in in optimizer steps (>= 0; ``None``: one interval N, so
            θ(N) − θ(0), which carries the initial transient, is the only delta before it).
        phase_at, phase_post: the run's phases around its grok step g, in optimizer steps,
            read by every analysis (``phases``, :class:`~grokedge.analysis_log.Phases`):
            ``at`` is |step − g| <= phase_at, ``post`` ends at g + phase_post (>= phase_at),
            ``late`` after it; ``None``: one and ten intervals.
        interval_multiples: the Gram intervals N = k·``interval`` recorded from this run
            (a non-empty list of distinct integers >= 1 containing 1; default [1, 2, 3]).
            Each k >= 2 keeps a derived window of W sums of k consecutive deltas, with
            its spectra under every edge definition
            (:class:`~grokedge.edge.derived_windows.DerivedWindows`); [1]: the base
            window only. The base window and its numbers do not depend on it.
        allow_inexact_split, buffer_dtype (``float32``, ``float64``, ``bfloat16``,
            ``float16``), buffer_device (``None``: the parameters'), shard_across_ranks
            (under DDP each rank keeps its slice of θ_sel; ``false``: the whole window on
            every rank), collective (``None``: ``torch.distributed``'s default group when
            it has several processes): the :class:`DeltaRecorder`'s knobs, see there.
        config_key: config path named in error messages.

    Published (read-only for other callbacks; the :class:`DeltaRecorder`'s, see there for
    shapes and units): ``edge``, ``previous``, ``spectra``, ``provenance``, ``evicted_dot``,
    ``skipped_deltas``, ``shard``, ``window``, ``tracker``; :meth:`gather_vectors` and
    :meth:`reduce` for sharded analyses; the run's ``phases``; the derived windows'
    ``interval_multiples``, ``derived``, ``derived_intervals``, ``derived_spectra``,
    ``derived_provenance``, ``derived_published`` and :meth:`start_step_of`. Listeners
    run right after each new edge; derived listeners (:meth:`add_derived_listener`)
    after each new derived window, at the same capture.

    Logs at each closed delta (``global_step``): ``gram/skipped_deltas``, the spectrum's
    ``gram/sigma_{j}``, ``gram/g23``, ``gram/kstar``, ``gram/kstar_weighted``,
    ``gram/ratio``, ``gram/deltas`` (:func:`spectrum_scalars`) and the raw window's
    provenance ``gram/window_first_step``, ``gram/window_last_step``,
    ``gram/window_holds_burn_in``, ``gram/dominant_delta_share``, ``gram/dominant_delta_step``.

    Example:
        >>> gram = GramCallback(select="attention", interval=100, window=5, top_k=4)
        >>> trainer = L.Trainer(callbacks=[gram, EdgeAlignmentCallback()])  # doctest: +SKIP
        >>> trainer.fit(module, datamodule)                                   # doctest: +SKIP
        >>> gram.edge.sigma, gram.edge.vectors.shape                          # doctest: +SKIP
        (tensor([...], dtype=torch.float64), torch.Size([4, 131072]))
    """

    @names_python_arguments
    def __init__(
        self,
        select: str | Sequence[str] = "attention",
        interval: int = 100,
        window: int = 5,
        top_k: int = 4,
        edge_definition: str = NORMALIZED,
        start_step: int | None = None,
        phase_at: int | None = None,
        phase_post: int | None = None,
        allow_inexact_split: bool = False,
        buffer_dtype: str = "float32",
        buffer_device: str | None = None,
        shard_across_ranks: bool = True,
        collective: Collective | None = None,
        config_key: str = GRAM_KEY,
        interval_multiples: Sequence[int] = DEFAULT_INTERVAL_MULTIPLES,
    ) -> None:
        super().__init__()
        key = self.config_key = config_key
        self.from_config = built_from_config()  # messages: config keys or arguments
        checked = check_select(select, f"{key}.select")
        self.select: str | list[str] = checked if isinstance(checked, str) else list(checked)
        interval = check_int(f"{key}.interval", interval, 1)
        window = check_int(f"{key}.window", window, MIN_WINDOW)
        top_k = check_int(f"{key}.top_k", top_k, 1)
        edge_definition = check_definition(f"{key}.edge_definition", edge_definition)
        start_step = check_optional_int(f"{key}.start_step", start_step, 0)
        phase_at = check_optional_int(f"{key}.phase_at", phase_at, 0)
        phase_post = check_optional_int(f"{key}.phase_post", phase_post, 0)
        self.phases = Phases.around(interval, phase_at, phase_post, key)
        check_bool(f"{key}.allow_inexact_split", allow_inexact_split)
        check_choice(f"{key}.buffer_dtype", buffer_dtype, tuple(BUFFER_DTYPES))
        buffer_device = check_device(f"{key}.buffer_device", buffer_device)
        check_bool(f"{key}.shard_across_ranks", shard_across_ranks)
        multiples = check_interval_multiples(f"{key}.interval_multiples", interval_multiples)
        self.recorder = DeltaRecorder(
            interval,
            window,
            top_k,
            edge_definition,
            start_step,
            allow_inexact_split=allow_inexact_split,
            buffer_dtype=buffer_dtype,
            buffer_device=buffer_device,
            shard_across_ranks=shard_across_ranks,
            collective=collective,
            select=self.select,
            key=key,
            interval_multiples=multiples,
        )
        self.selector: ParameterSelector | None = None
        self._listeners: list[EdgeListener] = []
        self._derived_listeners: list[DerivedListener] = []

    @property
    def state_key(self) -> str:
        # Stable across knob changes, so that a resume with another interval or window
        # fails loudly in load_state_dict instead of silently starting a fresh window.
        return self._generate_state_key(config_key=self.config_key)

    def add_listener(self, listener: EdgeListener) -> None:
        """Call ``listener(trainer, pl_module, state)`` after every new edge (once each)."""
        if listener not in self._listeners:
            self._listeners.append(listener)

    def add_derived_listener(self, listener: DerivedListener) -> None:
        """Call ``listener(trainer, pl_module, interval, step)`` after every new derived
        window (once each), with its interval N = k·N0; it reads ``derived_spectra[N]``
        and ``derived_provenance[N]``."""
        if listener not in self._derived_listeners:
            self._derived_listeners.append(listener)

    # ----------------------------------------------------- the recorder's published state
    # Read through to the DeltaRecorder (shapes and units there); read-only but ``shard``.

    @property
    def interval(self) -> int:
        """N, optimizer steps per delta of the base window."""
        return self.recorder.interval

    @property
    def window_size(self) -> int:
        """W, deltas in the window."""
        return self.recorder.window_size

    @property
    def top_k(self) -> int:
        """Edge vectors v_1..v_k materialised."""
        return self.recorder.top_k

    @property
    def edge_definition(self) -> str:
        """Which definition's spectrum is ``edge``."""
        return self.recorder.edge_definition

    @property
    def start_step(self) -> int:
        """The burn-in of the base window, optimizer steps."""
        return self.recorder.start_step

    @property
    def allow_inexact_split(self) -> bool:
        """Whether a non-decoupled weight decay is recorded as zeros."""
        return self.recorder.allow_inexact_split

    @property
    def buffer_dtype(self) -> str:
        """Storage dtype name of the window and edge-vector buffers."""
        return self.recorder.buffer_dtype

    @property
    def buffer_device(self) -> str | None:
        """Device of the buffers (``None``: the parameters')."""
        return self.recorder.buffer_device

    @property
    def shard_across_ranks(self) -> bool:
        """Whether each rank keeps only its slice of θ_sel."""
        return self.recorder.shard_across_ranks

    @property
    def collective(self) -> Collective | None:
        """The collective given (``None``: torch.distributed's)."""
        return self.recorder.collective

    @property
    def predicted_bytes(self) -> int | None:
        """This rank's predicted buffer bytes (after ``attach``)."""
        return self.recorder.predicted_bytes

    @property
    def window(self) -> UpdateWindow | None:
        """The base window (after ``attach``)."""
        return self.recorder.window

    @property
    def tracker(self) -> DecoupledWeightDecayTracker | None:
        """The weight-decay tracker (after ``attach``)."""
        return self.recorder.tracker

    @property
    def edge(self) -> EdgeState | None:
        """The newest edge (``None`` before W' >= 2 deltas)."""
        return self.recorder.edge

    @property
    def previous(self) -> EdgeState | None:
        """The edge of the window before ``edge``'s."""
        return self.recorder.previous

    @property
    def spectra(self) -> dict[str, WindowSpectrum | None]:
        """The newest window's spectrum under each definition."""
        return self.recorder.spectra

    @property
    def provenance(self) -> WindowProvenance | None:
        """Where the newest raw window's σ_1 comes from."""
        return self.recorder.provenance

    @property
    def evicted_dot(self) -> float | None:
        """δ_evicted · δ_newest of the latest push (``None``: none)."""
        return self.recorder.evicted_dot

    @property
    def skipped_deltas(self) -> int:
        """Non-finite deltas skipped so far."""
        return self.recorder.skipped_deltas

    @property
    def last_capture_step(self) -> int | None:
        """The step of the latest capture (``None`` before ``attach``)."""
        return self.recorder.last_capture_step

    @property
    def shard(self) -> Shard | None:
        """This rank's slice of θ_sel (after ``attach``); settable (another process group)."""
        return self.recorder.shard

    @shard.setter
    def shard(self, value: Shard | None) -> None:
        self.recorder.shard = value

    def capture(self, step: int) -> bool:
        """:meth:`DeltaRecorder.capture`: close the delta at ``step``; whether it was pushed."""
        return self.recorder.capture(step)

    def push_delta(self, total: Tensor, wd: Tensor, step: int, begin: int | None = None) -> bool:
        """:meth:`DeltaRecorder.push_delta`: push a delta given whole ([n] slices when sharded)."""
        return self.recorder.push_delta(total, wd, step, begin)

    def gather_vectors(self, vectors: Tensor) -> Tensor:
        """:meth:`DeltaRecorder.gather_vectors`: whole [m, p] from slices (collective)."""
        return self.recorder.gather_vectors(vectors)

    def reduce(self, partial: Tensor) -> Tensor:
        """:meth:`DeltaRecorder.reduce`: Σ over ranks of a partial result (collective)."""
        return self.recorder.reduce(partial)

    # ------------------------------------------------------------- derived windows

    @property
    def interval_multiples(self) -> tuple[int, ...]:
        """The recorded multiples k of the base interval (sorted, 1 first)."""
        return self.recorder.interval_multiples

    @property
    def derived(self) -> DerivedWindows | None:
        """The derived windows (after ``attach``; ``None`` for interval_multiples [1])."""
        return self.recorder.derived

    @property
    def derived_intervals(self) -> list[int]:
        """N = k·N0 of every derived window (k >= 2), ascending."""
        return [k * self.interval for k in self.interval_multiples if k > 1]

    @property
    def derived_spectra(self) -> dict[int, dict[str, WindowSpectrum | None]]:
        """{N: {definition: WindowSpectrum | None}} of each derived window's newest state
        (``{}`` for a window not yet published)."""
        d = self.derived
        return {} if d is None else {d.interval(k): d.spectra[k] for k in d.multiples}

    @property
    def derived_provenance(self) -> dict[int, WindowProvenance | None]:
        """{N: provenance of the newest raw derived window, or None}."""
        d = self.derived
        return {} if d is None else {d.interval(k): d.provenance[k] for k in d.multiples}

    @property
    def derived_published(self) -> list[int]:
        """N of the derived windows published by the latest capture."""
        d = self.derived
        return [] if d is None else [d.interval(k) for k in d.published]

    def start_step_of(self, interval: int) -> int:
        """The burn-in (optimizer steps) of the window of ``interval`` N: the base
        ``start_step`` for N0; for a derived window the user's ``start_step`` if set,
        else N."""
        if interval % self.interval:
            raise ValueError(f"{interval} is not a multiple of the base interval {self.interval}")
        return self.recorder.start_step_for(interval // self.interval)

    # ------------------------------------------------------------------------- checks

    def make_selector(self, pl_module: nn.Module) -> ParameterSelector:
        """The selector over ``analysed_module(pl_module)``; ValueError naming
        ``<config_key>.select`` if it matches nothing."""
        return ParameterSelector.from_module(
            analysed_module(pl_module), self.select, key=f"{self.config_key}.select"
        )

    @names_python_arguments
    def check_module(self, pl_module: nn.Module, optimizer: Optimizer | None = None) -> None:
        """Validate against a built model before training (for ``train.build``): ValueError
        naming the key if the selector matches nothing or, with an optimizer (given or from
        ``pl_module.optimizer_factory``), if its weight decay cannot be split exactly and
        ``allow_inexact_split`` is false."""
        selector = self.make_selector(pl_module)
        if optimizer is None and callable(getattr(pl_module, "optimizer_factory", None)):
            optimizer = pl_module.optimizer_factory(analysed_module(pl_module).parameters())
        if optimizer is not None:
            self.recorder.make_tracker(optimizer, selector.named(analysed_module(pl_module)))

    # ----------------------------------------------------------------- Lightning hooks

    @names_python_arguments
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            _refuse_fsdp(trainer, self.config_key)
            self.selector = self.make_selector(pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the strategy moved the model, built the optimizer (and initialised the
        # process group), and (for most strategies) after load_state_dict stashed a state.
        model = analysed_module(pl_module)
        self.attach(model, self._optimizer_for(trainer, model), step=trainer.global_step)
        self._report_memory(trainer)

    def _report_memory(self, trainer: L.Trainer) -> None:
        """Log ``gram/predicted_bytes`` (this rank's buffers) once; say it on rank 0."""
        assert self.predicted_bytes is not None
        values = {"gram/predicted_bytes": float(self.predicted_bytes)}
        # self.log is not allowed in on_fit_start: straight to the (rank-zero) loggers.
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
        buffers = self.recorder.describe_buffers()
        rank_zero_info(f"grokedge: {message_label(self)} predicts {buffers}")

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
        for interval in self.derived_published:
            for derived_listener in self._derived_listeners:
                derived_listener(trainer, pl_module, interval, step)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.recorder.detach()

    # ------------------------------------------------------------ the recorder's work

    def _optimizer_for(self, trainer: L.Trainer, model: nn.Module) -> Optimizer:
        assert self.selector is not None
        found = optimizer_for(trainer.optimizers, model, self.selector.names[0])
        if found is not None:
            return found[0]
        raise ValueError(f"{self.config_key}.select: no optimizer holds {self.selector.names[0]!r}")

    def attach(self, model: nn.Module, optimizer: Optimizer, step: int = 0) -> None:
        """Start recording ``model``'s selected parameters (:meth:`DeltaRecorder.attach`);
        Lightning calls it from ``on_fit_start``, call it yourself without a Trainer."""
        if self.selector is None:
            self.selector = self.make_selector(model)
        self.recorder.attach(self.selector.named(model), optimizer, step)

    def state_dict(self) -> dict[str, Any]:
        """:meth:`DeltaRecorder.state_dict`: tensors and primitives only."""
        return self.recorder.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore (before ``on_fit_start`` the state waits: ``attach`` loads it)."""
        self.recorder.load_state_dict(state_dict)


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


def find_gram_callback(
    trainer: L.Trainer,
    required: bool = True,
    from_config: bool = True,
    reader: str | None = None,
) -> GramCallback | None:
    """The trainer's ``GramCallback`` (the first, if several).

    Raises:
        ValueError: none is attached and ``required``; the message starts with ``reader``
            (the callback that needs it, as its messages name it) and words the fix for a
            config (``from_config``) or for a script.
    """
    for callback in trainer.callbacks:
        if isinstance(callback, GramCallback):
            return callback
    if required:
        who = "" if reader is None else f"{reader}: "
        fix = _ADD_GRAM[from_config]
        raise ValueError(f"{who}this analysis needs a GramCallback; fix: {fix}")
    return None


_ADD_GRAM = {
    True: "use callbacks=gram, or add gram_spectrum to the defaults of your callbacks set",
    False: "add one before this callback: L.Trainer(callbacks=[GramCallback(), ...])",
}
