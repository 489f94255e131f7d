"""GramCallback: the sliding window of update deltas and its spectral edge, online.

A thin adapter from Lightning hooks to ``grokedge.spectral`` (PAPER.md §1, DESIGN.md
"data flow" steps 2-3):

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

All p-sized work stays on the parameters' device; only W×W matrices and scalars reach
the host.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from grokedge.spectral import (
    DecoupledWeightDecayTracker,
    EdgeState,
    ParameterSelector,
    UpdateWindow,
    edge_from_window,
    g23,
    gaps,
    kstar_ratio,
    kstar_weighted,
    spectral_ratio,
)
from grokedge.spectral.selection import _validate_select
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
        allow_inexact_split: run with an optimizer whose weight decay is not decoupled
            (L2 in the gradient) by recording a zero WD part, instead of failing at start.
        buffer_dtype: storage of the [2, W, p] window buffers (``float32``, ``float64``,
            ``bfloat16``, ``float16``); dot products and W×W algebra are always float64.
        config_key: config path named in error messages.

    Shapes and units: p = number of selected elements; each delta is [p] in parameter
    units; σ_j in parameter units; Gram entries in squared parameter units.

    Published (read-only for other callbacks):
        edge: ``EdgeState`` of the newest window (``None`` until it holds 2 deltas).
        previous: the ``EdgeState`` before it (for rotation; ``None`` after a restart from
            a checkpoint until the next delta, and at the start).
        evicted_dot: δ_evicted · δ_newest of the latest push (float; ``None`` when the
            window only grew), relating ``previous`` and ``edge`` for Davis–Kahan.
        skipped_deltas: non-finite deltas skipped so far.

    ``edge.vectors`` and ``previous.vectors`` live in two preallocated [top_k, p] buffers
    that alternate: a state's vectors are overwritten two windows later (copy them to keep
    them). Listeners (:meth:`add_listener`) run right after each new edge.

    Non-finite deltas (NaN/inf in θ or in the WD part) are skipped, counted and warned
    about; the next delta starts from θ at the skipped capture.

    Logs at each closed delta (``global_step``): ``gram/sigma_{j}``, ``gram/g23``,
    ``gram/kstar``, ``gram/kstar_weighted``, ``gram/ratio``, ``gram/deltas``,
    ``gram/skipped_deltas`` (see :func:`spectrum_scalars`).

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
        allow_inexact_split: bool = False,
        buffer_dtype: str = "float32",
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

        self.edge: EdgeState | None = None
        self.previous: EdgeState | None = None
        self.evicted_dot: float | None = None
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
        self, optimizer: Optimizer, named: list[tuple[str, Tensor]]
    ) -> DecoupledWeightDecayTracker:
        # With allow_inexact_split the tracker warns once and records zeros.
        try:
            return DecoupledWeightDecayTracker(
                optimizer, named, allow_inexact=self.allow_inexact_split
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
            self.selector = self.make_selector(pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs after the strategy moved the model to its device and built the optimizer,
        # and (for most strategies) after load_state_dict stashed a checkpoint's state.
        model = analysed_module(pl_module)
        self.attach(model, self._optimizer_for(trainer, model), step=trainer.global_step)

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
        log_scalars(trainer, pl_module, values)
        if pushed and self.edge is not None:
            for listener in self._listeners:
                listener(trainer, pl_module, self.edge)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

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
        self._params = [param.detach() for _, param in named]
        device = self._params[0].device
        dtype = self._params[0].dtype
        for param in self._params[1:]:
            dtype = torch.promote_types(dtype, param.dtype)
        p = self.selector.p
        self._theta_prev = torch.empty(p, dtype=dtype, device=device)
        self._total = torch.empty(p, dtype=dtype, device=device)
        self._prev_views = list(self.selector.unflatten(self._theta_prev).values())
        self._total_views = list(self.selector.unflatten(self._total).values())
        self.window = UpdateWindow(
            self.window_size, p, device=device, dtype=BUFFER_DTYPES[self.buffer_dtype]
        )
        # Preallocated: a fresh p-sized allocation per window costs page faults.
        self._vector_bufs = [
            torch.empty(self.top_k, p, dtype=self.window.dtype, device=device) for _ in range(2)
        ]
        self.tracker = self._make_tracker(optimizer, named)
        self._handle = self.tracker.register()
        self.edge = self.previous = None
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
        pushed = self.push_delta(self._total, wd, step)
        wd.zero_()
        self.tracker.steps = 0
        self.last_capture_step = int(step)
        return pushed

    @torch.no_grad()
    def push_delta(self, total: Tensor, wd: Tensor, step: int) -> bool:
        """Push one delta (total [p], its WD part [p]) and publish the new edge.

        A delta with any non-finite entry in either part is skipped, counted in
        ``skipped_deltas`` and warned about; the window, ``edge`` and ``previous`` stay
        as they were. Returns whether the delta was pushed.
        """
        assert self.window is not None
        # The push's own dot products detect NaN/inf (one host sync of a 2×2 matrix).
        if not self.window.push(total, wd, check_finite=True):
            self.skipped_deltas += 1
            warnings.warn(
                f"{self.config_key}: non-finite update delta at step {step} skipped "
                f"({self.skipped_deltas} so far); the window keeps its "
                f"{self.window.count} earlier deltas",
                RuntimeWarning,
                stacklevel=2,
            )
            return False
        evicted = self.window.last_evicted_dot
        self.evicted_dot = None if evicted is None else float(evicted)
        if self.window.count >= MIN_WINDOW:
            self.previous = self.edge
            self.edge = edge_from_window(self.window, self.top_k, step, out=self._free_buffer())
        return True

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
        return {
            "version": STATE_VERSION,
            "select": self.select,
            "interval": self.interval,
            "p": self.window.p,
            "last_capture_step": self.last_capture_step,
            "skipped_deltas": self.skipped_deltas,
            "edge_step": None if self.edge is None else self.edge.step,
            "theta_prev": self._theta_prev,
            "window": self.window.state_dict(),
            "tracker": self.tracker.state_dict(),
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
        assert self._theta_prev is not None
        key = self.config_key
        if int(state["interval"]) != self.interval:
            raise ValueError(
                f"{key}.interval={self.interval} differs from the checkpoint's "
                f"{state['interval']}; resume with the same interval"
            )
        if int(state["p"]) != self.window.p:
            raise ValueError(
                f"{key}.select={self.select!r} selects p={self.window.p} elements; the "
                f"checkpoint's window has p={state['p']}"
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
        if edge_step is not None and self.window.count >= MIN_WINDOW:
            self.edge = edge_from_window(
                self.window, self.top_k, int(edge_step), out=self._vector_bufs[0]
            )
        else:
            self.edge = None
        self.previous = None
        self.evicted_dot = None


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
