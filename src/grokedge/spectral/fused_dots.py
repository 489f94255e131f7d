"""One pass over the window's stored rows for a push's dot products, on the CPU.

A push needs ``rows @ [t; w]ᵀ`` (the [m, 2] dots of every stored row with the new total
part t and weight-decay part w) and the new parts' own dots t·t, t·w, w·w. Two BLAS
matrix–vector products per column block read the block twice (the second time from
cache) and run well below memory speed for these skinny shapes; this kernel reads each
stored element once, for both products, two rows at a time so that every load of t and w
serves four multiply-adds.

Precision is the float32-block contract of ``grokedge.spectral.window``: float32
products summed within blocks of ``FUSED_BLOCK`` columns (in any order: the compiler
vectorises the sums), each block's partial sums added into float64. A block's float32
error is at most ``FUSED_BLOCK``·u·Σ|x_i y_i| (u = 2⁻²⁴) whatever the summation order.

The kernel is compiled by numba on first use (cached on disk by numba afterwards). It is
a float32-only fast path: ``available()`` is False when numba cannot be imported, and the
window then takes its torch path with the same contract.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

FUSED_BLOCK = 1 << 14
"""Columns per float32 partial sum. Sets the rounding bound (b·u ≈ 10⁻³ worst case,
≈ √b·u ≈ 8·10⁻⁶ typically, before the vectorised partial sums shrink it) and keeps the
two new parts' blocks (2 · 64 KiB) in L2 while every row pair streams past them.
Measured at p = 2.4M, W = 5 (one thread, 2-core EPYC): 2^10 4.3 ms, 2^12 4.1, 2^14 3.6,
2^16 3.6 (docs/benchmarks.md, issue 13's fused row dots)."""

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


def supports(rows: Tensor, new: tuple[Tensor, ...]) -> bool:
    """Whether ``fused_row_dots`` takes these operands: numba present, a contiguous
    float32 [m, p] CPU matrix and two contiguous float32 [p] CPU vectors."""
    return (
        available()
        and len(new) == 2
        and rows.device.type == "cpu"
        and rows.dtype == torch.float32
        and rows.is_contiguous()
        and all(
            v.device.type == "cpu" and v.dtype == torch.float32 and v.is_contiguous() for v in new
        )
    )


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
