"""numba kernels for the CPU passes of ``grokedge.edge.window.UpdateWindow`` over
its float32 rows: the push's dot products and the edge vectors' combination.

**Row dots.** A push needs ``rows @ [t; w]ᵀ`` (the [m, 2] dots of every stored row with
the new total part t and weight-decay part w) and the new parts' own dots t·t, t·w, w·w.
Two BLAS matrix–vector products per column block read the block twice (the second time
from cache) and run well below memory speed for these skinny shapes; ``fused_row_dots``
reads each stored element once, for both products, two rows at a time so that every load
of t and w serves four multiply-adds. Precision is the float32-block contract of
``grokedge.edge.window``: float32 products summed within blocks of ``FUSED_BLOCK``
columns (in any order: the compiler vectorises the sums), each block's partial sums added
into float64. A block's float32 error is at most ``FUSED_BLOCK``·u·Σ|x_i y_i|
(u = 2⁻²⁴) whatever the summation order.

**Combination.** The edge vectors are ``coeffs @ X`` for a [k, W] matrix of coefficients
and the W stored rows X: a GEMM with k, W ≈ 4, 5 that BLAS runs at well below memory
speed. ``combine_rows`` makes two output rows at a time from up to ``COMBINE_GROUP``
input rows held in registers (one load of each input element per output pair), in
float32 like the GEMM it replaces.

The kernels are compiled by numba on first use (cached on disk by numba afterwards). They
are a float32 CPU fast path: ``available()`` is False when numba cannot be imported, and
the window then takes its torch path with the same contract.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

FUSED_BLOCK = 1 << 14
"""Columns per float32 partial sum. Sets the rounding bound (b·u ≈ 10⁻³ worst case,
≈ √b·u ≈ 8·10⁻⁶ typically, before the vectorised partial sums shrink it) and keeps the
two new parts' blocks (2 · 64 KiB) in L2 while every row pair streams past them.
Measured at p = 2.4M, W = 5 (one thread, 2-core EPYC): 2^10 4.4 ms, 2^12 3.7, 2^14 3.5,
2^16 3.8, against 6.7 for torch's GEMVs (scripts/bench_window_kernels.py;
docs/benchmarks.md, Cost of ``callbacks=gram``, (g))."""

COMBINE_BLOCK = 1 << 14
"""Columns per step of ``combine_rows``: the W input and two output blocks stay in L2.
Measured at p = 2.4M, W = 5, k = 4 (one thread): 2^10 3.5 ms, 2^12 2.8, 2^14 2.5,
2^16 3.1, against 4.5 for the blocked torch GEMM (scripts/bench_window_kernels.py)."""

COMBINE_GROUP = 5
"""Input rows per pass of ``combine_rows`` (the default window, W = 5, in one pass; a
larger W takes ⌈W/5⌉ passes, each after the first adding into the outputs)."""

# Reassociation (vectorised sums) and contraction (FMA) only: no-NaN/no-inf flags would
# let the compiler assume away the non-finite deltas that the push must detect.
_FASTMATH = {"reassoc", "contract"}

try:
    import numba
except ImportError:  # pragma: no cover - numba is a declared dependency
    numba = None


def available() -> bool:
    """Whether the fused kernel can run here (numba importable)."""
    return numba is not None


if numba is not None:

    @numba.njit(fastmath=_FASTMATH, boundscheck=False, error_model="numpy", cache=True)
    def _pair_dots(x, y, a, b):  # pragma: no cover - compiled
        """x·a, x·b, y·a, y·b in float32 over one block (x, y, a, b: [b] float32)."""
        xa = np.float32(0.0)
        xb = np.float32(0.0)
        ya = np.float32(0.0)
        yb = np.float32(0.0)
        for c in range(x.shape[0]):
            ac = a[c]
            bc = b[c]
            u = x[c]
            v = y[c]
            xa += u * ac
            xb += u * bc
            ya += v * ac
            yb += v * bc
        return xa, xb, ya, yb

    @numba.njit(fastmath=_FASTMATH, boundscheck=False, error_model="numpy", cache=True)
    def _pair_combination(o0, o1, x0, x1, x2, x3, x4, a, b, add):  # pragma: no cover
        """o0 (+)= a · [x0..x4], o1 (+)= b · [x0..x4] over one block (a, b: [5])."""
        a0, a1, a2, a3, a4 = a[0], a[1], a[2], a[3], a[4]
        b0, b1, b2, b3, b4 = b[0], b[1], b[2], b[3], b[4]
        if add:
            for c in range(o0.shape[0]):
                v0, v1, v2, v3, v4 = x0[c], x1[c], x2[c], x3[c], x4[c]
                o0[c] += a0 * v0 + a1 * v1 + a2 * v2 + a3 * v3 + a4 * v4
                o1[c] += b0 * v0 + b1 * v1 + b2 * v2 + b3 * v3 + b4 * v4
        else:
            for c in range(o0.shape[0]):
                v0, v1, v2, v3, v4 = x0[c], x1[c], x2[c], x3[c], x4[c]
                o0[c] = a0 * v0 + a1 * v1 + a2 * v2 + a3 * v3 + a4 * v4
                o1[c] = b0 * v0 + b1 * v1 + b2 * v2 + b3 * v3 + b4 * v4

    @numba.njit(fastmath=_FASTMATH, boundscheck=False, error_model="numpy", cache=True)
    def _combine_kernel(coef, rows, out, block):  # pragma: no cover - compiled
        """out = coef[:, :W] @ rows, float32. coef: [k, G·5], zero past column W; rows:
        [W, p] (a group's missing rows are read as the last row, times a zero); out:
        [k, p]."""
        k = coef.shape[0]
        width, p = rows.shape
        last = width - 1
        spare = np.empty(block, dtype=np.float32)  # the second output of an odd last pair
        zero = np.zeros(COMBINE_GROUP, dtype=np.float32)
        for lo in range(0, p, block):
            hi = min(lo + block, p)
            for i in range(0, k, 2):
                o0 = out[i, lo:hi]
                o1 = out[i + 1, lo:hi] if i + 1 < k else spare[: hi - lo]
                for j in range(0, width, COMBINE_GROUP):
                    b = coef[i + 1, j : j + COMBINE_GROUP] if i + 1 < k else zero
                    _pair_combination(
                        o0,
                        o1,
                        rows[j, lo:hi],
                        rows[min(j + 1, last), lo:hi],
                        rows[min(j + 2, last), lo:hi],
                        rows[min(j + 3, last), lo:hi],
                        rows[min(j + 4, last), lo:hi],
                        coef[i, j : j + COMBINE_GROUP],
                        b,
                        j > 0,
                    )

    @numba.njit(fastmath=_FASTMATH, boundscheck=False, error_model="numpy", cache=True)
    def _fused_kernel(rows, t, w, out, block):  # pragma: no cover - compiled
        """out[:m] += rows @ [t; w]ᵀ and out[m:] += [t; w] @ [t; w]ᵀ, float32 per block
        of ``block`` columns, float64 across blocks."""
        m, p = rows.shape
        for lo in range(0, p, block):
            hi = min(lo + block, p)
            a = t[lo:hi]
            b = w[lo:hi]
            r = 0
            while r + 1 < m:
                xa, xb, ya, yb = _pair_dots(rows[r, lo:hi], rows[r + 1, lo:hi], a, b)
                out[r, 0] += xa
                out[r, 1] += xb
                out[r + 1, 0] += ya
                out[r + 1, 1] += yb
                r += 2
            if r < m:  # an odd row count: the last row alone (its second result unused)
                xa, xb, _, _ = _pair_dots(rows[r, lo:hi], a, a, b)
                out[r, 0] += xa
                out[r, 1] += xb
            ta, tb, wa, wb = _pair_dots(a, b, a, b)
            out[m, 0] += ta
            out[m, 1] += tb
            out[m + 1, 0] += wa
            out[m + 1, 1] += wb


def warm_up() -> None:
    """Run both kernels once on tiny inputs: compiles them (or loads them from numba's
    cache) now, and raises here if this platform cannot."""
    rows = torch.zeros(3, 4)
    fused_row_dots(rows, (rows[0], rows[1]))
    combine_rows(torch.zeros(1, 3), rows, torch.empty(1, 4))


def _cpu_float32(*tensors: Tensor) -> bool:
    """Whether every tensor is a contiguous float32 CPU tensor (what the kernels read
    through ``Tensor.numpy()``)."""
    return all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors
    )


def supports(rows: Tensor, new: tuple[Tensor, ...]) -> bool:
    """Whether ``fused_row_dots`` takes these operands: a contiguous float32 [m, p] CPU
    matrix and two contiguous float32 [p] CPU vectors (numba's presence is
    ``available()``)."""
    return len(new) == 2 and _cpu_float32(rows, *new)


def fused_row_dots(rows: Tensor, new: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """``rows @ N.T`` and ``N @ N.T`` for N = [t; w], in one pass over ``rows``.

    Args:
        rows: [m, p] float32, contiguous, on the CPU; new: (t, w), each [p] float32,
            contiguous, on the CPU (``supports``).
    Returns:
        ([m, 2], [2, 2]) float64 on the CPU: float32 products per ``FUSED_BLOCK``
        columns, summed in float64.
    """
    m = rows.shape[0]
    out = np.zeros((m + 2, 2), dtype=np.float64)
    t, w = new
    _fused_kernel(rows.numpy(), t.numpy(), w.numpy(), out, FUSED_BLOCK)
    dots = torch.from_numpy(out)
    return dots[:m], dots[m:]


def supports_combine(coeffs: Tensor, rows: Tensor, out: Tensor) -> bool:
    """Whether ``combine_rows`` takes these operands: contiguous float32 CPU tensors of
    matching shapes."""
    return (
        _cpu_float32(coeffs, rows, out)
        and coeffs.shape[1] == rows.shape[0]
        and out.shape == (coeffs.shape[0], rows.shape[1])
    )


def combine_rows(coeffs: Tensor, rows: Tensor, out: Tensor) -> Tensor:
    """``coeffs @ rows`` into ``out``, one pass over ``rows`` per ``COMBINE_GROUP`` of them.

    Args:
        coeffs: [k, W] float32; rows: [W, p] float32; out: [k, p] float32 (all contiguous,
            on the CPU: ``supports_combine``).
    Returns:
        ``out``, float32 products and sums (as a float32 GEMM).
    """
    k, width = coeffs.shape
    padded = -(-width // COMBINE_GROUP) * COMBINE_GROUP
    coef = np.zeros((k, padded), dtype=np.float32)  # zeros past W: the padding rows' weights
    coef[:, :width] = coeffs.numpy()
    _combine_kernel(coef, rows.numpy(), out.numpy(), COMBINE_BLOCK)
    return out
