"""Derived windows: every Gram interval N = k·N0 from the base deltas of one run.

A delta over N = k·N0 optimizer steps is the exact sum of k consecutive deltas over N0
(θ(t) − θ(t − k·N0) = Σ_j [θ(t − j·N0) − θ(t − (j + 1)·N0)]), and so is its weight-decay
part (the per-step displacements −η_t ω θ_t add up). :class:`DerivedWindows` therefore
keeps, for each multiple k >= 2, a block accumulator of the base deltas' total and WD
parts and a second ``UpdateWindow`` of W summed deltas: one training run gives the
sliding windows of every interval N = k·N0, and a derived window is the window a run
recorded directly at N = k·N0 would hold (blocks are aligned to the base captures since
attach: for a run from step 0 the j-th derived delta is θ(j·k·N0) − θ((j − 1)·k·N0)).

Each derived window's spectra under every edge definition come from the same W×W
algebra as the base window (:func:`grokedge.edge.definitions.all_spectra`); no
p-sized edge vectors are formed per window (:meth:`DerivedWindows.edge` materialises
them on demand). Its burn-in is the user's ``start_step`` when set, else one interval of
that window, k·N0 (what a direct run at N = k·N0 would use).

Cost per base delta and multiple: two p-sized adds into the accumulator; every k-th
base delta, one window push (O(W·p), as the base window's) and W×W algebra. Memory per
multiple: the [2, W, p] window and the [2, p] accumulator (``memory.derived_memory``).

Sharded (a ``Shard`` with several ranks), every p-sized buffer is this rank's slice and
the W×W matrices are summed over ranks (one all-reduce per derived window); every rank
must feed the same base deltas in the same order (``DeltaRecorder.push_delta`` does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from grokedge.checks import not_allowed
from grokedge.edge.definitions import PAPER, all_spectra, spectrum_edge
from grokedge.edge.provenance import WindowProvenance, window_provenance
from grokedge.edge.sharding import (
    Shard,
    gather_whole,
    gather_window_state,
    reduced_window_matrices,
    slice_window_state,
)
from grokedge.edge.spectrum import EdgeState, WindowSpectrum
from grokedge.edge.window import MIN_WINDOW, TOTAL, UNKNOWN_SPAN, WD, UpdateWindow

BASE_MULTIPLE = 1
"""k = 1: the base window itself (kept by the ``DeltaRecorder``, not here)."""

DERIVED_STATE_VERSION = 1


def check_interval_multiples(key: str, value: Any) -> tuple[int, ...]:
    """``value`` as a sorted tuple if it is a non-empty list of distinct integers >= 1
    that contains 1 (a Hydra ``ListConfig`` is accepted); else ValueError naming ``key``,
    the value and what is allowed."""
    try:
        items = tuple(value) if not isinstance(value, str | bytes) else None
    except TypeError:
        items = None
    ok = (
        items is not None
        and len(items) > 0
        and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in items)
        and len(set(items)) == len(items)
        and BASE_MULTIPLE in items
    )
    if not ok:
        shown = list(items) if items is not None else value
        raise not_allowed(
            f"{key}",
            shown,
            f"a non-empty list of distinct integers >= 1 that contains {BASE_MULTIPLE} (the base "
            "interval), e.g. [1, 2, 3]",
        )
    return tuple(sorted(items))  # type: ignore[arg-type]


def materialise_edge(
    spectra: dict[str, WindowSpectrum | None],
    window: UpdateWindow,
    definition: str,
    start_step: int,
    out: Tensor | None = None,
) -> EdgeState | None:
    """The top-k edge (σ, vectors [top_k, n], projections) of ``window`` under
    ``definition``, from its spectra already computed (``all_spectra`` of this window's
    newest state): no second eigendecomposition, one combination of the stored deltas.
    ``None`` when that definition has no window (fewer than two deltas). Under sharding
    the vectors are this rank's slices (no communication: the spectra hold the summed
    matrices)."""
    spec, paper = spectra.get(definition), spectra.get(PAPER)
    if spec is None or paper is None:
        return None
    # The paper spectrum keeps every row: its G and spans are the raw window's.
    return spectrum_edge(spec, paper.gram, paper.spans, window, start_step, out=out)


class DerivedWindows:
    """The sliding windows of the summed deltas over N = k·N0 for each k >= 2.

    Args:
        base_interval: N0, optimizer steps per base delta.
        multiples: the interval multiples (``check_interval_multiples``); k = 1 is ignored
            here (the base window), each k >= 2 gets a window.
        window: W, deltas per derived window (the base window's).
        top_k: directions in each spectrum's projections.
        n: elements of each delta on this rank (p unsharded).
        start_step: the user's explicit burn-in (optimizer steps) or ``None``: k·N0 for
            the window of multiple k.
        shard: this rank's slice (``None``: the whole vector, one process).
        device, dtype: of the window buffers (the base window's). The accumulators are
            [2, n] on that device in at least float32 (a bfloat16 or float16 sum of k
            deltas would round at every add; float32 and float64 buffers accumulate in
            their own dtype, so the summed delta rounds as a direct delta does).

    Published after each :meth:`feed` (read-only), keyed by k:
        spectra: ``{k: {definition: WindowSpectrum | None}}`` of the newest window
            (empty until it holds two deltas).
        provenance: ``{k: WindowProvenance | None}`` of the newest raw window.
        steps: ``{k: step | None}`` of the newest published window.
        published: the k whose window was published by the latest feed.
        discarded: ``{k: blocks}`` dropped because they held a skipped (non-finite) base
            delta or their sum was not finite.
    """

    def __init__(
        self,
        base_interval: int,
        multiples: Sequence[int],
        window: int,
        top_k: int,
        n: int,
        *,
        start_step: int | None = None,
        shard: Shard | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.base_interval = int(base_interval)
        self.multiples = tuple(int(k) for k in multiples if k > BASE_MULTIPLE)
        self.window_size = window
        self.top_k = top_k
        self.n = n
        self.user_start_step = start_step
        self.shard = shard if shard is not None else Shard.of(n)
        self.windows = {
            k: UpdateWindow(window, n, device=device, dtype=dtype) for k in self.multiples
        }
        acc_dtype = torch.promote_types(dtype, torch.float32)
        self._acc = {
            k: torch.zeros(2, n, dtype=acc_dtype, device=w.device) for k, w in self.windows.items()
        }
        self.base_pushes = 0  # base deltas fed since attach (pushed or skipped)
        self._block_begin: dict[int, int | None] = dict.fromkeys(self.multiples)
        self._block_bad: dict[int, bool] = dict.fromkeys(self.multiples, False)
        self.discarded: dict[int, int] = dict.fromkeys(self.multiples, 0)
        self.spectra: dict[int, dict[str, WindowSpectrum | None]] = {k: {} for k in self.multiples}
        self.provenance: dict[int, WindowProvenance | None] = dict.fromkeys(self.multiples)
        self.steps: dict[int, int | None] = dict.fromkeys(self.multiples)
        self.published: list[int] = []

    # ------------------------------------------------------------------ read-outs

    def interval(self, k: int) -> int:
        """N = k·N0, optimizer steps per delta of multiple k's window."""
        return k * self.base_interval

    def start_step(self, k: int) -> int:
        """The burn-in of multiple k's window: the user's ``start_step`` if set, else k·N0."""
        return self.interval(k) if self.user_start_step is None else self.user_start_step

    def edge(self, k: int, definition: str = PAPER, out: Tensor | None = None) -> EdgeState | None:
        """The top-k edge of multiple k's newest window under ``definition``, on demand
        (:func:`materialise_edge`; vectors [top_k, n] in the buffer dtype, a fresh
        allocation unless ``out``)."""
        return materialise_edge(
            self.spectra[k], self.windows[k], definition, self.start_step(k), out
        )

    # ---------------------------------------------------------------- the mechanics

    @torch.no_grad()
    def feed(
        self,
        total: Tensor,
        wd: Tensor,
        step: int,
        begin: int | None,
        finite: bool,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> list[int]:
        """Take the next base delta (total [n], its WD part [n], θ(step) − θ(begin)).

        ``finite``: whether the base window accepted it (False: a skipped, non-finite
        delta; its block is discarded when it completes). ``reduce``: the sum over ranks
        for the finiteness check of a derived push (``UpdateWindow.push``). Returns the k
        whose window was published (also in ``published``).
        """
        position = self.base_pushes
        self.base_pushes += 1
        self.published = []
        for k in self.multiples:
            i = position % k
            acc = self._acc[k]
            if i == 0:
                self._block_begin[k] = begin
                self._block_bad[k] = False
            if not finite:
                self._block_bad[k] = True  # the accumulator's content no longer matters
            elif i == 0:
                acc[TOTAL].copy_(total)
                acc[WD].copy_(wd)
            else:
                acc[TOTAL].add_(total.to(acc.device))
                acc[WD].add_(wd.to(acc.device))
            if i == k - 1 and self._close_block(k, step, reduce):
                self.published.append(k)
        return list(self.published)

    def _close_block(self, k: int, step: int, reduce: Callable[[Tensor], Tensor] | None) -> bool:
        """Push the completed block of multiple k; True when its window was published."""
        if self._block_bad[k]:
            self.discarded[k] += 1
            return False
        begin = self._block_begin[k]
        span = (UNKNOWN_SPAN[0] if begin is None else int(begin), int(step))
        window = self.windows[k]
        acc = self._acc[k]
        if not window.push(acc[TOTAL], acc[WD], check_finite=True, reduce=reduce, span=span):
            self.discarded[k] += 1  # finite parts whose sum overflowed
            return False
        if window.count < MIN_WINDOW:
            return False
        self._publish(k, step)
        return True

    def _publish(self, k: int, step: int) -> None:
        """Spectra under every definition and the raw window's provenance (W×W algebra;
        one all-reduce of the packed matrices when sharded)."""
        window = self.windows[k]
        g, c, w, _ = reduced_window_matrices(window, self.shard)
        start = self.start_step(k)
        spectra = all_spectra(g, c, w, window.spans(), self.top_k, step, start)
        paper = spectra[PAPER]
        self.spectra[k] = spectra
        self.provenance[k] = None if paper is None else window_provenance(paper, start)
        self.steps[k] = int(step)

    def reset(self) -> None:
        """Forget every derived delta and block (a fresh start, aligned to the next feed)."""
        for k in self.multiples:
            self.windows[k].reset()
            self._acc[k].zero_()
            self._block_begin[k] = None
            self._block_bad[k] = False
            self.discarded[k] = 0
            self.spectra[k] = {}
            self.provenance[k] = None
            self.steps[k] = None
        self.base_pushes = 0
        self.published = []

    # ------------------------------------------------------------------- the state

    def state_dict(self) -> dict[str, Any]:
        """Tensors and primitives only (``torch.load(weights_only=True)`` safe), keyed by
        ``str(k)``. Collective when sharded: the windows' deltas and the accumulators come
        back whole (on the CPU) with the summed matrices, plus each rank's partial
        matrices (``rank_matrices``) and ``world_size``."""
        sharded = self.shard.sharded
        windows: dict[str, Any] = {}
        for k in self.multiples:
            entry: dict[str, Any] = {
                "block_begin": self._block_begin[k],
                "block_bad": self._block_bad[k],
                "discarded": self.discarded[k],
                "step": self.steps[k],
            }
            if sharded:
                entry["window"], entry["rank_matrices"] = gather_window_state(
                    self.windows[k], self.shard
                )
                entry["accumulator"] = gather_whole(self.shard, self._acc[k])
            else:
                entry["window"] = self.windows[k].state_dict()
                entry["accumulator"] = self._acc[k]
            windows[str(k)] = entry
        return {
            "version": DERIVED_STATE_VERSION,
            "base_interval": self.base_interval,
            "multiples": list(self.multiples),
            "base_pushes": self.base_pushes,
            "world_size": self.shard.world_size,
            "windows": windows,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore (the caller checked the multiples); the newest spectra are recomputed
        from the restored windows (collective when sharded: every rank loads the same
        state). A whole-vector state is cut to this rank's slice."""
        saved = [int(k) for k in state["multiples"]]
        if saved != list(self.multiples):
            raise ValueError(
                f"derived windows for multiples {saved} cannot load into {list(self.multiples)}"
            )
        same_layout = int(state.get("world_size", 1)) == self.shard.world_size
        for k in self.multiples:
            entry = state["windows"][str(k)]
            window_state, acc = entry["window"], entry["accumulator"]
            if self.shard.sharded:
                ranks = entry.get("rank_matrices") if same_layout else None
                window_state = slice_window_state(window_state, self.shard, ranks)
                acc = self.shard.take(acc)
            self.windows[k].load_state_dict(window_state)
            self._acc[k].copy_(acc)
            begin = entry["block_begin"]
            self._block_begin[k] = None if begin is None else int(begin)
            self._block_bad[k] = bool(entry["block_bad"])
            self.discarded[k] = int(entry["discarded"])
        self.base_pushes = int(state["base_pushes"])
        self.published = []
        for k in self.multiples:
            step = state["windows"][str(k)]["step"]
            self.spectra[k], self.provenance[k], self.steps[k] = {}, None, None
            if step is not None and self.windows[k].count >= MIN_WINDOW:
                self._publish(k, int(step))
