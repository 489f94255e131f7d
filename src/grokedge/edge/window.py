"""The sliding window of update deltas and its incrementally maintained W×W matrices.

Each delta comes in two parts on the same p coordinates (a slice of θ_sel, see
``selection``): the total update δ_i and its exact weight-decay part δ_wd,i. With
X = [δ_1; …; δ_W] and X_wd = [δ_wd,1; …; δ_wd,W] the window keeps

    G  = X Xᵀ          (Gram,        G[i, j]  = δ_i · δ_j)
    C  = X_wd Xᵀ       (cross-Gram,  C[i, j]  = δ_wd,i · δ_j)
    Gw = X_wd X_wdᵀ    (wd Gram,     Gw[i, j] = δ_wd,i · δ_wd,j)

A push overwrites one ring slot and recomputes only that slot's rows and columns: four
matrix–vector products, O(W·p), instead of O(W²·p) for a full recompute. The matrices are
*partial* when the window holds a slice of θ_sel: summing them over the slices gives the
whole's (docs/design.md, Scale). The dot products themselves, their precision on each
buffer dtype and the CPU kernels: :mod:`grokedge.edge.row_dots`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from grokedge.edge.row_dots import kernels_for, row_dots, scratch_for

MIN_WINDOW = 2
"""A spectrum needs at least two deltas (docs/theory.md §1)."""

COMBINE_CHUNK = 1 << 16
"""Columns per block of ``UpdateWindow.combine``'s torch GEMM on the CPU (the edge vectors;
float32 windows take ``window_kernels.combine_rows`` instead, when numba is present)."""

TOTAL, WD = 0, 1
"""Indices of the two parts in the stacked buffer."""

NEW_PARTS = 2
"""Vectors a push brings: the total delta and its weight-decay part."""

UNKNOWN_SPAN = (-1, -1)
"""The (begin, end) steps recorded for a delta pushed without its span."""


class UpdateWindow:
    """A W-slot ring buffer of (total, weight-decay) deltas with incremental Grams.

    Args:
        size: W, the number of slots (>= 2).
        p: length of each delta (the whole θ_sel or this rank's slice of it).
        device: where the buffers live (the parameters' device).
        dtype: storage dtype of the deltas.
        accum_dtype: dtype of the dot products and of the W×W matrices on the device.

    Read-outs (``gram()`` …) are [count, count], float64, on the CPU, in chronological
    order (oldest delta first) whatever the ring position.
    """

    def __init__(
        self,
        size: int,
        p: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        accum_dtype: torch.dtype = torch.float64,
    ) -> None:
        if size < MIN_WINDOW:
            raise ValueError(f"window size W must be >= {MIN_WINDOW}, got {size}")
        if p < 0:
            raise ValueError(f"p must be >= 0, got {p}")
        self.size = size
        self.p = p
        self.accum_dtype = accum_dtype
        self._buf = torch.zeros(2, size, p, dtype=dtype, device=device)
        # Ring-ordered W×W matrices stay on the device: a push needs no host sync.
        mats = torch.zeros(3, size, size, dtype=accum_dtype, device=self._buf.device)
        self._gram, self._cross, self._wd_gram = mats.unbind(0)
        self._mats = mats
        self._head = 0  # slot the next push writes
        self.count = 0  # filled slots, <= size
        self.pushes = 0  # deltas pushed since creation
        # δ_evicted · δ_newest of the latest push (0-d, accum_dtype, on the device); None
        # when it evicted nothing. Relates consecutive windows (geometry.window_shift_grams).
        self.last_evicted_dot: Tensor | None = None
        # (begin, end) optimizer steps of the delta in each ring slot: its provenance.
        # UNKNOWN_SPAN where the caller gave none (or an old checkpoint had none).
        self._spans: list[tuple[int, int]] = [UNKNOWN_SPAN] * size
        self._scratch: Tensor | None = None  # reused by push (no page faults per push)

    @property
    def device(self) -> torch.device:
        return self._buf.device

    @property
    def dtype(self) -> torch.dtype:
        return self._buf.dtype

    def __len__(self) -> int:
        return self.count

    @torch.no_grad()
    def push(
        self,
        total: Tensor,
        wd: Tensor | None = None,
        check_finite: bool = False,
        reduce: Callable[[Tensor], Tensor] | None = None,
        span: tuple[int, int] | None = None,
    ) -> bool:
        """Add one delta, evicting the oldest when full.

        One pass over the buffer: the new parts are dotted with every stored row *before*
        the slot is overwritten, so the same products give the new Gram rows, the dot with
        the evicted delta (``last_evicted_dot``) and, from the new parts' own dots, a
        finiteness check.

        Args:
            total: [p] total update δ = θ_now − θ_prev.
            wd: [p] its weight-decay part δ_wd (``None``: no weight decay, zeros).
            check_finite: if either part has a NaN/inf entry, change nothing and return
                False (one host sync of a 2×2 matrix).
            reduce: when the window holds one slice of a sharded vector, the sum over
                ranks of the new parts' own [2, 2] dot products (e.g. ``Shard.sum``), so
                that every rank takes the same decision on non-finite deltas (a NaN in
                one rank's slice makes the sum non-finite on all). Collective: all ranks
                must push together. ``None``: this slice alone.
            span: (begin, end) optimizer steps of the delta, θ(end) − θ(begin); kept for
                the window's provenance (:meth:`spans`). ``None``: unknown.
        Returns:
            True if the delta was pushed.
        """
        if total.shape != (self.p,):
            raise ValueError(f"total must have shape [{self.p}], got {list(total.shape)}")
        if wd is not None and wd.shape != (self.p,):
            raise ValueError(f"wd must have shape [{self.p}], got {list(wd.shape)}")
        size, slot = self.size, self._head
        # Dot products of the values as they will be stored (low-precision buffers round),
        # on the buffers' device (which may differ from the parameters').
        new_total = total.to(self.device, self.dtype)
        new_wd = torch.zeros_like(new_total) if wd is None else wd.to(self.device, self.dtype)
        every = self._buf.view(2 * size, self.p)
        # dots[a*W + j, b] = part_a[j] · new_part_b over the *old* slots (empty ones are
        # zero); own[a, b] = new_part_a · new_part_b.
        if self._scratch is None:
            # None again on the float32-block path (no scratch); the float32 matmul
            # precision is read at every push, so a change of it switches paths.
            self._scratch = scratch_for(
                2 * size + NEW_PARTS, self.p, self.dtype, self.accum_dtype, self.device
            )
        dots, own = row_dots(every, (new_total, new_wd), self.accum_dtype, self._scratch)
        if reduce is not None and check_finite:
            own_total = reduce(own.clone())
        else:
            own_total = own
        if check_finite and not bool(torch.isfinite(own_total).all()):
            return False
        self.last_evicted_dot = dots[slot, TOTAL].clone() if self.count == size else None
        dots[slot] = own[TOTAL]  # the slot now holds the new delta
        dots[size + slot] = own[WD]
        self._buf[TOTAL, slot].copy_(new_total)
        self._buf[WD, slot].copy_(new_wd)
        self._spans[slot] = UNKNOWN_SPAN if span is None else (int(span[0]), int(span[1]))
        d_tot, w_tot = dots[:size, TOTAL], dots[:size, WD]  # δ_j·δ_new, δ_j·δ_wd,new
        d_wd, w_wd = dots[size:, TOTAL], dots[size:, WD]  # δ_wd,j·δ_new, δ_wd,j·δ_wd,new
        self._gram[slot, :] = d_tot
        self._gram[:, slot] = d_tot
        self._cross[slot, :] = w_tot
        self._cross[:, slot] = d_wd
        self._wd_gram[slot, :] = w_wd
        self._wd_gram[:, slot] = w_wd
        self._head = (slot + 1) % size
        self.count = min(self.count + 1, size)
        self.pushes += 1
        return True

    def reset(self) -> None:
        """Forget every delta (e.g. after an intervention that breaks the trajectory)."""
        self._buf.zero_()
        self._mats.zero_()
        self._head = self.count = 0
        self.last_evicted_dot = None
        self._spans = [UNKNOWN_SPAN] * self.size

    def order(self) -> list[int]:
        """Ring slots of the filled deltas, oldest first."""
        first = (self._head - self.count) % self.size
        return [(first + i) % self.size for i in range(self.count)]

    def spans(self) -> list[tuple[int, int]]:
        """(begin, end) optimizer steps of the filled deltas, oldest first."""
        return [self._spans[i] for i in self.order()]

    def _chronological(self, mat: Tensor) -> Tensor:
        """``mat`` [..., W, W] with its last two dimensions in chronological order, as
        float64 on the CPU."""
        idx = torch.tensor(self.order(), dtype=torch.long, device=mat.device)
        return mat.index_select(-2, idx).index_select(-1, idx).to("cpu", torch.float64)

    def matrices(self) -> Tensor:
        """[3, count, count] float64 CPU, chronological: G, C = X_wd Xᵀ and X_wd X_wdᵀ
        (``gram()``, ``cross_gram()``, ``wd_gram()`` in one read-out: one index and one
        host copy instead of three)."""
        return self._chronological(self._mats)

    def gram(self) -> Tensor:
        """G = X Xᵀ, [count, count] float64 on the CPU, chronological."""
        return self._chronological(self._gram)

    def cross_gram(self) -> Tensor:
        """C = X_wd Xᵀ (C[i, j] = δ_wd,i · δ_j), [count, count] float64 CPU, chronological."""
        return self._chronological(self._cross)

    def wd_gram(self) -> Tensor:
        """X_wd X_wdᵀ, [count, count] float64 on the CPU, chronological."""
        return self._chronological(self._wd_gram)

    def _part(self, part: int) -> Tensor:
        first = (self._head - self.count) % self.size
        if first + self.count <= self.size:
            return self._buf[part, first : first + self.count]
        idx = torch.tensor(self.order(), dtype=torch.long, device=self.device)
        return self._buf[part].index_select(0, idx)

    def deltas(self) -> Tensor:
        """X, [count, p] chronological; a view unless the ring has wrapped (then a copy)."""
        return self._part(TOTAL)

    def wd_deltas(self) -> Tensor:
        """X_wd, [count, p] chronological; a view unless the ring has wrapped."""
        return self._part(WD)

    @torch.no_grad()
    def combine(self, coeffs: Tensor, wd: bool = False, out: Tensor | None = None) -> Tensor:
        """``coeffs @ X`` (or ``coeffs @ X_wd``) without reordering the ring.

        Args:
            coeffs: [m, count], chronological columns (any dtype, any device).
            out: optional [m, p] buffer (buffer dtype and device) to write into. Reusing
                one avoids the page faults of a fresh p-sized allocation at every call,
                which on the CPU cost more than the product itself.
        Returns:
            [m, p] in the buffer dtype on the buffer device (``out`` if given).
        """
        if coeffs.ndim != 2 or coeffs.shape[1] != self.count:
            raise ValueError(f"coeffs must be [m, {self.count}], got {list(coeffs.shape)}")
        m = coeffs.shape[0]
        if out is None:
            out = torch.empty(m, self.p, dtype=self.dtype, device=self.device)
        elif out.shape != (m, self.p) or out.dtype != self.dtype or out.device != self.device:
            raise ValueError(
                f"out must be [{m}, {self.p}] {self.dtype} on {self.device}, got "
                f"{list(out.shape)} {out.dtype} on {out.device}"
            )
        ring = torch.zeros(m, self.size, dtype=self.dtype, device=self.device)
        idx = torch.tensor(self.order(), dtype=torch.long, device=self.device)
        ring[:, idx] = coeffs.to(self.device, self.dtype)
        src = self._buf[WD if wd else TOTAL]
        kernels = kernels_for(self.device, self.p)
        if kernels is not None and kernels.supports_combine(ring, src, out):
            return kernels.combine_rows(ring, src, out)  # one pass (CPU, float32)
        if self.device.type != "cpu":
            return torch.matmul(ring, src, out=out)
        # On the CPU a [m, W] @ [W, p] GEMM is slower than the same product taken in
        # cache-sized column blocks.
        # ``split`` makes every block's view in one call (cheaper than slicing per block).
        for src_block, out_block in zip(
            src.split(COMBINE_CHUNK, dim=1), out.split(COMBINE_CHUNK, dim=1), strict=True
        ):
            torch.mm(ring, src_block, out=out_block)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Tensors and primitives only; restores bit-identical subsequent Grams."""
        return {
            "size": self.size,
            "p": self.p,
            "head": self._head,
            "count": self.count,
            "pushes": self.pushes,
            "deltas": self._buf,
            "matrices": self._mats,
            "spans": [list(span) for span in self._spans],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["size"] != self.size or state["p"] != self.p:
            raise ValueError(
                f"window state has W={state['size']}, p={state['p']}; "
                f"this window has W={self.size}, p={self.p}"
            )
        self._buf.copy_(state["deltas"])
        self._mats.copy_(state["matrices"])
        self._head = int(state["head"])
        self.count = int(state["count"])
        self.pushes = int(state["pushes"])
        spans = state.get("spans")  # absent in checkpoints written before provenance
        self._spans = (
            [UNKNOWN_SPAN] * self.size if spans is None else [(int(b), int(e)) for b, e in spans]
        )
