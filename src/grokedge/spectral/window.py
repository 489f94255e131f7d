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
whole's (docs/design.md, Scale).

The dot products are taken of the *stored* values (a low-precision buffer rounds the new
delta first), so that G is the Gram of the deltas that later materialise the edge
vectors, and summed in ``accum_dtype`` (float64 by default):

- float64 buffers: float64 products, exact to float64 round-off;
- float32 buffers (the default): float32 products over column blocks, read in place
  (no up-cast copy), each block's [2W + 2, 2] result added into a float64 accumulator.
  On the CPU from p = ``KERNEL_MIN_P`` (2^20) on, one fused pass reads every stored row
  once for both new parts (``grokedge.spectral.window_kernels``, blocks of
  ``FUSED_BLOCK`` = 2^14 columns; a numba kernel); elsewhere, or without numba, two
  matrix–vector products per block of ``F32_BLOCK`` columns. The float32 rounding of a
  block's inner product of length b is at most ≈ b·u·Σ|x_i y_i| (in any summation
  order) and typically ≈ √b·u·Σ|x_i y_i| (u = 2⁻²⁴ ≈ 6·10⁻⁸; vectorised partial sums
  make it smaller still); the float64 sum over blocks adds nothing measurable, and
  independent block errors partly cancel. Relative to the natural scale √(G_ii G_jj) ≥
  Σ|x_i y_i| the error measured at p = 10⁷ is below 10⁻⁶ on either path
  (tests/test_spectral_window.py; docs/benchmarks.md, Cost of ``callbacks=gram``, (d)
  and (g));
- other buffers (bfloat16, float16), or float32 when the global float32 matmul
  precision allows reduced-precision GEMMs (TF32, bfloat16 passes): up-cast to
  ``accum_dtype`` in cache-sized chunks, as exact as float64 buffers.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

MIN_WINDOW = 2
"""A spectrum needs at least two deltas (docs/theory.md §1)."""

ACCUM_CHUNK = 1 << 16
"""Elements per chunk when up-casting low-precision buffers for the float64 dot products.
Small enough that a chunk of every row, up-cast, stays in cache ((2W + 2) · 2^16 · 8 B =
6 MiB for W = 5): the up-cast then costs no memory traffic beyond reading the buffer once
(a 2^20 chunk was 7× slower on a 2-core EPYC). Bounds the temporary memory likewise."""

SCRATCH_BYTES = 6 << 20
"""Target size of the CPU up-cast scratch (rows × chunk): larger windows take shorter
chunks so that the scratch stays in cache (W = 20 at 2^16 columns was 1.3× slower)."""

MIN_CHUNK = 1 << 12

F32_BLOCK = 1 << 16
"""Columns per float32 block of ``_row_dots`` on the CPU. The block sets the float32
error (≲ √b·u relative typically, b = the block length, u = 2⁻²⁴: ≈ 1.5·10⁻⁵ at 2^16
before the BLAS kernels' own partial sums shrink it; measured ≤ 1.3·10⁻⁷ at p = 10⁷) and the
per-block overhead (n matrix–vector products, n(n + 1)/2 dots and one float64 add: 36
blocks at p = 2.4M, 382 at 25M). A capture at 2^14 was 1.17× slower (call overhead),
at 2^17 no faster (2-core EPYC, p = 2.4M, W = 5 and 20)."""

F32_BLOCK_ACCELERATOR = 1 << 22
"""``F32_BLOCK`` off the CPU: fewer, larger kernels. The typical error bound grows as √b
(≈ 10⁻⁴ at 2^22 before the kernels' blocked partial sums shrink it); untested for
accuracy and speed on a GPU here (none was available)."""

KERNEL_MIN_P = 1 << 20
"""Shortest rows (p) for which a float32 CPU window uses the numba kernels of
``window_kernels``. Their first use in a process costs ≈ 0.5 s (numba's import and
loading the compiled kernels from its cache; ≈ 1.6 s to compile them in a fresh
checkout), and they save ≈ 2 ns per element and capture (4.8 ms at p = 2.4M, W = 5):
from 2^20 on, a few hundred captures pay for the load; below it the torch path costs the
run less (0.15 ms a capture at p = 131,072)."""

COMBINE_CHUNK = 1 << 16
"""Columns per block of ``UpdateWindow.combine``'s torch GEMM on the CPU (the edge vectors;
float32 windows take ``window_kernels.combine_rows`` instead, when numba is present)."""

ACCUM_CHUNK_ACCELERATOR = 1 << 22
"""``ACCUM_CHUNK`` off the CPU: fewer, larger kernels."""

SCRATCH_BYTES_ACCELERATOR = 256 << 20
"""Cap of the up-cast scratch off the CPU: ≈ 2.8M columns at W = 5, 0.8M at W = 20."""

TOTAL, WD = 0, 1
"""Indices of the two parts in the stacked buffer."""

NEW_PARTS = 2
"""Vectors a push brings: the total delta and its weight-decay part."""

UNKNOWN_SPAN = (-1, -1)
"""The (begin, end) steps recorded for a delta pushed without its span."""


def chunked_matmul_t(rows: Tensor, vecs: Tensor, accum_dtype: torch.dtype) -> Tensor:
    """``rows @ vecs.T`` accumulated in ``accum_dtype``.

    Args:
        rows: [m, p]; vecs: [n, p], same device.
    Returns:
        [m, n] in ``accum_dtype`` on the inputs' device. Inputs already in ``accum_dtype``
        are multiplied directly; others are up-cast chunk by chunk along p.
    """
    if rows.dtype == accum_dtype and vecs.dtype == accum_dtype:
        return rows @ vecs.T
    out = torch.zeros(rows.shape[0], vecs.shape[0], dtype=accum_dtype, device=rows.device)
    for lo in range(0, rows.shape[1], ACCUM_CHUNK):
        hi = lo + ACCUM_CHUNK
        out += rows[:, lo:hi].to(accum_dtype) @ vecs[:, lo:hi].to(accum_dtype).T
    return out


def float32_products_exact_enough(device: torch.device) -> bool:
    """Whether float32 GEMMs on ``device`` run in true float32 (no TF32 / bfloat16 passes).

    ``torch.set_float32_matmul_precision("high")`` (or TF32 on CUDA) lets float32 GEMMs
    round their inputs to 10-bit mantissas: far outside the Gram's documented error. The
    window then falls back to the exact up-cast path.
    """
    if torch.get_float32_matmul_precision() != "highest":
        return False
    return not (device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32)


def uses_float32_blocks(dtype: torch.dtype, accum_dtype: torch.dtype, device: torch.device) -> bool:
    """The float32-block path of ``_row_dots``: float32 buffers, a wider accumulator."""
    return (
        dtype == torch.float32
        and accum_dtype != torch.float32
        and float32_products_exact_enough(device)
    )


def _row_dots(
    rows: Tensor,
    new: tuple[Tensor, ...],
    accum_dtype: torch.dtype,
    scratch: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``rows @ N.T`` and ``N @ N.T`` for N = the stacked ``new`` vectors, in one pass.

    Args:
        rows: [m, p]; new: n vectors [p] (same dtype and device as ``rows``).
        scratch: optional reusable [m + n, chunk] ``accum_dtype`` up-cast buffer (see
            ``_scratch_for``; unused by the float64 and float32-block paths).
    Returns:
        ([m, n], [n, n]) in ``accum_dtype`` on the device. float32 rows
        (``uses_float32_blocks``): float32 products per column block, summed in
        ``accum_dtype`` (module docstring: error bound); other low-precision rows: each
        chunk of the rows and of the new vectors is up-cast once into a cache-sized
        scratch and multiplied there.
    """
    m, p = rows.shape
    n = len(new)
    if rows.dtype == accum_dtype:  # nothing to up-cast: multiply in place
        stacked = torch.stack(new)
        return rows @ stacked.T, stacked @ stacked.T
    if uses_float32_blocks(rows.dtype, accum_dtype, rows.device):
        kernels = _kernels_for(rows.device, p)
        if accum_dtype == torch.float64 and kernels is not None and kernels.supports(rows, new):
            return kernels.fused_row_dots(rows, new)  # one pass over the rows (CPU)
        return _row_dots_blocks(rows, new, accum_dtype)
    out = torch.zeros(m + n, n, dtype=accum_dtype, device=rows.device)
    if scratch is None:
        scratch = _scratch_for(m + n, p, rows.dtype, accum_dtype, rows.device)
    chunk = scratch.shape[1]
    for lo in range(0, p, chunk):
        hi = min(lo + chunk, p)
        block = scratch[:, : hi - lo]
        block[:m].copy_(rows[:, lo:hi])
        for i, vec in enumerate(new):
            block[m + i].copy_(vec[lo:hi])
        out.addmm_(block, block[m:].T)
    return out[:m], out[m:]


@functools.cache
def _window_kernels() -> ModuleType | None:
    """``grokedge.spectral.window_kernels`` if its kernels run here, else ``None`` (with
    one warning). Imported on the first push of a long enough window rather than with this
    module (numba takes ≈ 0.2 s to import), and run once on tiny inputs, so that a
    platform where numba cannot compile or cache them falls back here, not mid-push."""
    try:
        from grokedge.spectral import window_kernels

        if window_kernels.available():
            window_kernels.warm_up()
            return window_kernels
        reason = "numba cannot be imported"
    except Exception as error:  # any failure to build them: the fallback
        reason = f"numba could not build its kernels ({type(error).__name__}: {error})"
    warnings.warn(
        f"{reason}: the Gram window's float32 dot products and edge vectors take the "
        "torch path on the CPU (same precision contract, ≈ 1.5× slower captures at "
        "p ≥ 2.4M); reinstall grokedge's dependencies to get the kernels back",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def _kernels_for(device: torch.device, p: int) -> ModuleType | None:
    """The numba kernels for a window of rows of length ``p`` on ``device``: only on the
    CPU (numba is not imported for an accelerator's window) and from ``KERNEL_MIN_P`` on;
    ``None`` otherwise or where they cannot run."""
    if device.type != "cpu" or p < KERNEL_MIN_P:
        return None
    return _window_kernels()


def _row_dots_blocks(
    rows: Tensor, new: tuple[Tensor, ...], accum_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``_row_dots`` in the rows' own dtype per column block, summed in ``accum_dtype``
    across blocks.

    Per block: one matrix–vector product of the rows' block with each new vector's block
    (read straight from the buffers: no up-cast copy, no gather) and the new vectors' own
    dots. On a CPU two float32 GEMVs beat one [m, b] × [b, 2] GEMM (MKL's skinny-GEMM path:
    6.4 vs 8.1 ms at p = 2.4M, W = 5) and a float64 up-cast GEMM (13.5 ms).

    Args:
        rows: [m, p]; new: n vectors [p], the rows' dtype and device.
    Returns:
        ([m, n], [n, n]) in ``accum_dtype``.
    """
    m, p = rows.shape
    n = len(new)
    block_len = F32_BLOCK if rows.device.type == "cpu" else F32_BLOCK_ACCELERATOR
    # part[i, :m] = rows_block @ new_i_block; part[i, m + j] = new_i_block · new_j_block
    part = torch.zeros(n, m + n, dtype=rows.dtype, device=rows.device)
    out = torch.zeros(n, m + n, dtype=accum_dtype, device=rows.device)
    # The out= targets and the blocks are views made once per push (``split`` builds all
    # blocks in one call): slicing them per block in Python cost ≈ 0.5 ms of a 6.5 ms
    # push at p = 2.4M (36 blocks × ~14 views), call overhead and not arithmetic.
    mv_out = [part[i, :m] for i in range(n)]
    dot_out = [[part[i, m + j] for j in range(n)] for i in range(n)]
    new_blocks = [vec.split(block_len) for vec in new]
    for lo, block in enumerate(rows.split(block_len, dim=1)):
        vecs = [blocks[lo] for blocks in new_blocks]
        for i, vec in enumerate(vecs):
            torch.mv(block, vec, out=mv_out[i])
            for j in range(i, n):  # own dots: upper triangle, mirrored below
                torch.dot(vec, vecs[j], out=dot_out[i][j])
        out.add_(part)  # float64 sum across blocks: the blocks' float32 error only
    own = out[:, m:].triu()
    own = own + own.triu(1).T
    return out[:, :m].T, own


def _scratch_for(
    rows: int, p: int, dtype: torch.dtype, accum_dtype: torch.dtype, device: torch.device
) -> Tensor | None:
    """The up-cast scratch of ``_row_dots`` for ``rows`` = stored rows + new vectors:
    [rows, chunk] in ``accum_dtype``, about ``SCRATCH_BYTES`` on the CPU (cache).
    ``None`` on the float32-block path, which multiplies the buffers in place."""
    if uses_float32_blocks(dtype, accum_dtype, device):
        return None
    itemsize = torch.empty((), dtype=accum_dtype).element_size()
    if device.type == "cpu":
        fits = max(MIN_CHUNK, SCRATCH_BYTES // (rows * itemsize))
        per_chunk = min(ACCUM_CHUNK, fits)
    else:
        fits = max(MIN_CHUNK, SCRATCH_BYTES_ACCELERATOR // (rows * itemsize))
        per_chunk = min(ACCUM_CHUNK_ACCELERATOR, fits)
    return torch.empty(rows, min(per_chunk, max(p, 1)), dtype=accum_dtype, device=device)


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
            self._scratch = _scratch_for(
                2 * size + NEW_PARTS, self.p, self.dtype, self.accum_dtype, self.device
            )
        dots, own = _row_dots(every, (new_total, new_wd), self.accum_dtype, self._scratch)
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
        kernels = _kernels_for(self.device, self.p)
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
