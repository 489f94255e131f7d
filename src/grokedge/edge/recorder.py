"""DeltaRecorder: the online sliding window of update deltas and its edge, Trainer-free.

The mechanics behind ``grokedge.callbacks.gram.GramCallback`` (docs/theory.md §1;
docs/design.md, "data flow" steps 2-3), usable from any training loop:

- :meth:`DeltaRecorder.attach` registers a ``DecoupledWeightDecayTracker`` as an optimizer
  step pre-hook: every ``optimizer.step()`` adds that step's exact weight-decay
  displacement −η_t ω_g θ_t (η, ω read from the parameter's own group at that step) to a
  flat accumulator;
- :meth:`DeltaRecorder.capture` closes a delta: total = θ_now − θ_at_last_capture,
  wd = the accumulator, grad = total − wd (implicit), pushes it into an ``UpdateWindow``
  (incremental W×W Grams) and publishes an ``EdgeState`` (σ, top-k edge vectors, the
  per-delta projections of the grad and wd parts on each v_k), the spectra under every
  edge definition and the raw window's provenance;
- with ``interval_multiples`` [1, k, ...], each delta is also added to the blocks of the
  derived windows (:class:`grokedge.edge.derived_windows.DerivedWindows`): every
  k-th delta closes a delta over k·N and that window's spectra are published (W×W
  algebra only), so one run gives every Gram interval N = k·N0.

All p-sized work stays on the parameters' device (or ``buffer_device``); only W×W
matrices and scalars reach the host.

Sharded (a ``Collective`` with more than one process), each rank keeps only its
contiguous slice ``[start, stop)`` of θ_sel (``shard``): its window, WD accumulator, θ at
the last capture and edge vectors are slices. One all-reduce of the packed W×W matrices
per delta gives every rank the exact global Grams, hence the same σ, u_k and projections;
``edge.vectors`` is the rank's slice of v_k (:meth:`DeltaRecorder.gather_vectors`
assembles whole ones). Every rank must make the same calls in the same order.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from grokedge.checks import not_allowed
from grokedge.edge.definitions import NORMALIZED, PAPER, all_spectra, spectrum_edge
from grokedge.edge.derived_windows import DerivedWindows, check_interval_multiples
from grokedge.edge.memory import describe_memory, window_memory_bytes
from grokedge.edge.provenance import WindowProvenance, window_provenance
from grokedge.edge.recorder_state import RecorderCheckpoint
from grokedge.edge.selection import slice_views
from grokedge.edge.sharding import (
    Collective,
    LocalCollective,
    Shard,
    default_collective,
    reduced_window_matrices,
    to_comm_device,
)
from grokedge.edge.spectrum import EdgeState, WindowSpectrum
from grokedge.edge.weight_decay import DecoupledWeightDecayTracker
from grokedge.edge.window import MIN_WINDOW, UpdateWindow

BUFFER_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""The storage dtypes of the window and edge-vector buffers, by name."""


class DeltaRecorder(RecorderCheckpoint):
    """Sliding window of the update deltas of some parameters, with exact grad/WD split.

    Args:
        interval: N, optimizer steps per delta (recorded in the state; a resume with
            another interval is refused). The caller decides when to :meth:`capture`.
        window: W, deltas in the window (>= 2).
        top_k: edge vectors v_1..v_k to materialise (>= 1).
        edge_definition: which window's spectrum is ``edge``: ``paper`` (raw deltas),
            ``burn_in`` (only deltas that begin at or after ``start_step``) or
            ``normalized`` (every delta scaled to unit norm); see
            :mod:`grokedge.edge.definitions`. ``spectra`` holds all three.
        start_step: the burn-in in optimizer steps; ``None``: one interval.
        allow_inexact_split: with an optimizer whose weight decay is not decoupled,
            record a zero WD part (warned once) instead of raising.
        buffer_dtype: storage of the [2, W, p] window and [top_k, p] vector buffers, a
            key of :data:`BUFFER_DTYPES`; dot products are summed in float64 (float32
            buffers: float32 products per column block, see
            :mod:`grokedge.edge.window`) and the W×W algebra is float64.
        buffer_device: where those buffers live (``None``: the parameters' device).
        shard_across_ranks: keep only this rank's slice when ``collective`` (or the
            default ``torch.distributed`` group) has several processes; ``False``: the
            whole vector, no collectives.
        collective: the communication of the shard (``None``: ``default_collective()``).
        select: the selection the parameters came from, stored in the state and named in
            errors (informational).
        key: prefix of error and warning messages (a config key, e.g. ``callbacks.gram``).
        interval_multiples: the Gram intervals N = k·``interval`` recorded from this run
            (a list of distinct integers >= 1 containing 1; default [1]: the base window
            only, nothing else allocated or computed). Each k >= 2 keeps a derived window
            of the sums of k consecutive deltas (:attr:`derived`,
            :class:`~grokedge.edge.derived_windows.DerivedWindows`), with its spectra
            under every definition at each completed block; the base window and its
            numbers are the same whatever the multiples.

    Shapes and units: p = number of recorded elements (n on this rank's slice); each
    delta is [p] in parameter units; σ_j in parameter units; Gram entries in squared
    parameter units.

    Published after each push (read-only):
        edge: ``EdgeState`` of the newest window under ``edge_definition`` (``None`` until
            that window holds 2 deltas); ``edge.vectors`` [top_k, n].
        previous: the ``EdgeState`` before it (``None`` at the start and after a load).
        spectra: ``{definition: WindowSpectrum | None}`` of the newest window.
        provenance: ``WindowProvenance`` of the newest raw (``paper``) window.
        evicted_dot: δ'_evicted · δ'_newest of the latest push in ``edge``'s rows
            (``None`` when its window grew), relating ``previous`` and ``edge``.
        skipped_deltas: non-finite deltas skipped so far.
        derived: the derived windows (``None`` for ``interval_multiples`` = [1]): their
            newest ``spectra``/``provenance``/``steps`` keyed by k, ``published`` (the k
            published by the latest push) and ``edge(k, definition)`` on demand.

    ``edge.vectors`` and ``previous.vectors`` live in two preallocated [top_k, n] buffers
    that alternate: a state's vectors are overwritten two windows later (copy to keep).

    Example:
        >>> net = torch.nn.Linear(4, 3)
        >>> opt = torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.5)
        >>> rec = DeltaRecorder(interval=1, window=3, top_k=2, edge_definition="paper")
        >>> rec.attach(net.named_parameters(), opt, step=0)
        >>> for step in range(1, 4):
        ...     net(torch.randn(8, 4)).square().mean().backward()
        ...     opt.step()
        ...     opt.zero_grad()
        ...     _ = rec.capture(step)
        >>> rec.edge.sigma.shape, rec.edge.vectors.shape
        (torch.Size([3]), torch.Size([2, 15]))
    """

    def __init__(
        self,
        interval: int,
        window: int,
        top_k: int,
        edge_definition: str = NORMALIZED,
        start_step: int | None = None,
        *,
        allow_inexact_split: bool = False,
        buffer_dtype: str = "float32",
        buffer_device: str | None = None,
        shard_across_ranks: bool = True,
        collective: Collective | None = None,
        select: Any = None,
        key: str = "recorder",
        interval_multiples: Sequence[int] = (1,),
    ) -> None:
        self.interval_multiples = check_interval_multiples(
            f"{key}.interval_multiples", interval_multiples
        )
        self.interval = interval
        self.window_size = window
        self.top_k = top_k
        self.edge_definition = edge_definition
        self.start_step = interval if start_step is None else start_step
        # Whether the user set it: a derived window's burn-in is then the same step, else
        # one interval of that window (k·N0), as a direct run at k·N0 would use.
        self._explicit_start_step = start_step
        self.allow_inexact_split = allow_inexact_split
        self.buffer_dtype = buffer_dtype
        self.buffer_device = buffer_device
        self.shard_across_ranks = shard_across_ranks
        self.collective = collective
        self.select = select
        self.key = key

        self.derived: DerivedWindows | None = None
        self._shard: Shard | None = None  # this rank's slice, set by attach
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

        self.window: UpdateWindow | None = None
        self.tracker: DecoupledWeightDecayTracker | None = None
        self._params: list[Tensor] = []
        self._theta_prev: Tensor | None = None  # [n] θ at the last capture
        self._total: Tensor | None = None  # [n] scratch for the newest total delta
        self._vector_bufs: list[Tensor] = []  # two [top_k, n]: edge and previous alternate
        self._prev_views: list[Tensor] = []
        self._total_views: list[Tensor] = []
        self._handle: RemovableHandle | None = None
        self._pending_state: dict[str, Any] | None = None

    @property
    def shard(self) -> Shard | None:
        """This rank's slice (after :meth:`attach`); the derived windows share it."""
        return self._shard

    @shard.setter
    def shard(self, value: Shard | None) -> None:
        # Replacing the shard (e.g. another process group) replaces the derived windows'.
        self._shard = value
        if self.derived is not None and value is not None:
            self.derived.shard = value

    def make_tracker(
        self,
        optimizer: Optimizer,
        named: list[tuple[str, Tensor]],
        start: int = 0,
        stop: int | None = None,
    ) -> DecoupledWeightDecayTracker:
        """The WD tracker of ``named`` (slice ``[start, stop)``), not yet registered;
        ValueError naming ``<key>.allow_inexact_split`` if the split cannot be exact."""
        # With allow_inexact_split the tracker warns once and records zeros.
        try:
            return DecoupledWeightDecayTracker(
                optimizer,
                named,
                allow_inexact=self.allow_inexact_split,
                switch=None,
                start=start,
                stop=stop,
            )
        except ValueError as e:
            raise not_allowed(
                f"{self.key}.allow_inexact_split",
                self.allow_inexact_split,
                f"{e}, or allow_inexact_split set to true to run without the split (the "
                "whole delta then counts as gradient)",
            ) from e

    # ------------------------------------------------------------------ the mechanics

    @torch.no_grad()
    def attach(
        self, named_params: Sequence[tuple[str, Tensor]], optimizer: Optimizer, step: int = 0
    ) -> None:
        """Allocate the buffers and start tracking ``optimizer``'s steps.

        ``named_params``: the recorded ``(name, parameter)`` pairs (laid out flat in
        sorted-name order). Takes θ at ``step`` as the first capture point, unless a state
        is pending from :meth:`load_state_dict` (then that state is loaded). Calling it
        again re-attaches (fresh buffers, the old hook removed).
        """
        self.detach()
        named = sorted(named_params, key=lambda item: item[0])
        device = named[0][1].device
        dtype = named[0][1].dtype
        for _, param in named[1:]:
            dtype = torch.promote_types(dtype, param.dtype)
        p = sum(param.numel() for _, param in named)
        if self.shard_across_ranks:
            collective = self.collective if self.collective is not None else default_collective()
        else:
            collective = LocalCollective()
        self.shard = shard = Shard.of(p, collective)
        if shard.n < 1:
            raise ValueError(
                f"{self.key}.select selects p={p} elements, fewer than the "
                f"{shard.world_size} ranks; allowed: at least one element per rank (or "
                f"{self.key}.shard_across_ranks=false)"
            )
        self._theta_prev = torch.empty(shard.n, dtype=dtype, device=device)
        self._total = torch.empty(shard.n, dtype=dtype, device=device)
        self._params, (self._prev_views, self._total_views) = slice_views(
            named, shard.start, shard.stop, (self._theta_prev, self._total)
        )
        buffer_device = device if self.buffer_device is None else torch.device(self.buffer_device)
        self.window = UpdateWindow(
            self.window_size, shard.n, device=buffer_device, dtype=BUFFER_DTYPES[self.buffer_dtype]
        )
        # Preallocated: a fresh p-sized allocation per window costs page faults.
        self._vector_bufs = [
            torch.empty(self.top_k, shard.n, dtype=self.window.dtype, device=buffer_device)
            for _ in range(2)
        ]
        self.derived = None
        if len(self.interval_multiples) > 1:
            self.derived = DerivedWindows(
                self.interval,
                self.interval_multiples,
                self.window_size,
                self.top_k,
                shard.n,
                start_step=self._explicit_start_step,
                shard=shard,
                device=buffer_device,
                dtype=self.window.dtype,
            )
        self.predicted_bytes = window_memory_bytes(
            shard.n,
            self.window_size,
            self.top_k,
            self.buffer_dtype,
            param_dtype=dtype,
            device_type=buffer_device.type,
            interval_multiples=self.interval_multiples,
        )
        self.tracker = self.make_tracker(optimizer, named, shard.start, shard.stop)
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

    def detach(self) -> None:
        """Stop tracking the optimizer (remove the step pre-hook); buffers stay."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def describe_buffers(self) -> str:
        """The predicted buffer memory in words (:func:`~grokedge.edge.memory.describe_memory`;
        after :meth:`attach`)."""
        assert self.shard is not None and self.predicted_bytes is not None
        derived = self.derived
        intervals = [] if derived is None else [derived.interval(k) for k in derived.multiples]
        return describe_memory(
            self.predicted_bytes,
            self.shard,
            self.window_size,
            self.top_k,
            self.buffer_dtype,
            intervals,
        )

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
        """Push one delta (total [n], its WD part [n]) and publish the new edge.

        ``begin``: the step the delta starts from (θ(step) − θ(begin)); ``None``: unknown.
        A delta with any non-finite entry in either part is skipped, counted in
        ``skipped_deltas`` and warned about; the window, ``edge`` and ``previous`` stay
        as they were. Returns whether the delta was pushed.

        With derived windows the delta is then added to their blocks (after the base
        window's push and publish, which it never changes); a completed block is pushed
        to its window and published (``derived.published``), one that holds a skipped
        delta is discarded.
        """
        assert self.window is not None and self.shard is not None
        # The push's own dot products detect NaN/inf (one host sync of a 2×2 matrix);
        # sharded, their sum over ranks, so that all ranks skip or push together.
        reduce = self.reduce if self.shard.sharded else None
        span = None if begin is None else (int(begin), int(step))
        pushed = self._push_base(total, wd, step, reduce, span)
        if self.derived is not None:
            self.derived.feed(total, wd, step, begin, pushed, reduce)
        return pushed

    def _push_base(
        self,
        total: Tensor,
        wd: Tensor,
        step: int,
        reduce: Any,
        span: tuple[int, int] | None,
    ) -> bool:
        """The base window's push and publish (:meth:`push_delta`)."""
        assert self.window is not None
        if not self.window.push(total, wd, check_finite=True, reduce=reduce, span=span):
            self.skipped_deltas += 1
            warnings.warn(
                f"{self.key}: non-finite update delta at step {step} skipped "
                f"({self.skipped_deltas} so far); the window keeps its "
                f"{self.window.count} earlier deltas",
                RuntimeWarning,
                stacklevel=3,  # push_delta's caller
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
        # The edge from its definition's spectrum, just computed: no second
        # eigendecomposition (same state as ``definition_edge``).
        self.edge = spectrum_edge(
            self.spectra[self.edge_definition],
            g,
            spans,
            self.window,
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

    def start_step_for(self, multiple: int) -> int:
        """The burn-in (optimizer steps) of the window of interval ``multiple``·N0:
        ``start_step`` for the base window (k = 1); for a derived window the user's
        ``start_step`` if set, else one interval of that window, k·N0."""
        if multiple == 1 or self._explicit_start_step is not None:
            return self.start_step
        return multiple * self.interval

    def edge_step(self) -> int | None:
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

    # ---------------------------------------------------------------------- sharding

    def gather_vectors(self, vectors: Tensor) -> Tensor:
        """Whole edge vectors [m, p] from this rank's slices [m, n] (e.g. rows of
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
