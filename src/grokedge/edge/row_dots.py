"""Dot products of a new delta with the window's stored rows, in the buffers' precision.

What :meth:`grokedge.edge.window.UpdateWindow.push` computes for the rows and columns it
overwrites (the four matrix–vector products of a push), and where the numba kernels of
``grokedge.edge.window_kernels`` take over on the CPU.

The dot products are taken of the *stored* values (a low-precision buffer rounds the new
delta first), so that G is the Gram of the deltas that later materialise the edge
vectors, and summed in ``accum_dtype`` (float64 by default):

- float64 buffers: float64 products, exact to float64 round-off;
- float32 buffers (the default): float32 products over column blocks, read in place
  (no up-cast copy), each block's [2W + 2, 2] result added into a float64 accumulator.
  On the CPU from p = ``KERNEL_MIN_P`` (2^20) on, one fused pass reads every stored row
  once for both new parts (``grokedge.edge.window_kernels``, blocks of
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
from types import ModuleType

import torch
from torch import Tensor

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
"""Columns per float32 block of ``row_dots`` on the CPU. The block sets the float32
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

ACCUM_CHUNK_ACCELERATOR = 1 << 22
"""``ACCUM_CHUNK`` off the CPU: fewer, larger kernels."""

SCRATCH_BYTES_ACCELERATOR = 256 << 20
"""Cap of the up-cast scratch off the CPU: ≈ 2.8M columns at W = 5, 0.8M at W = 20."""


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
    """The float32-block path of ``row_dots``: float32 buffers, a wider accumulator."""
    return (
        dtype == torch.float32
        and accum_dtype != torch.float32
        and float32_products_exact_enough(device)
    )


def row_dots(
    rows: Tensor,
    new: tuple[Tensor, ...],
    accum_dtype: torch.dtype,
    scratch: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``rows @ N.T`` and ``N @ N.T`` for N = the stacked ``new`` vectors, in one pass.

    Args:
        rows: [m, p]; new: n vectors [p] (same dtype and device as ``rows``).
        scratch: optional reusable [m + n, chunk] ``accum_dtype`` up-cast buffer (see
            ``scratch_for``; unused by the float64 and float32-block paths).
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
        kernels = kernels_for(rows.device, p)
        if accum_dtype == torch.float64 and kernels is not None and kernels.supports(rows, new):
            return kernels.fused_row_dots(rows, new)  # one pass over the rows (CPU)
        return row_dots_blocks(rows, new, accum_dtype)
    out = torch.zeros(m + n, n, dtype=accum_dtype, device=rows.device)
    if scratch is None:
        scratch = scratch_for(m + n, p, rows.dtype, accum_dtype, rows.device)
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
    """``grokedge.edge.window_kernels`` if its kernels run here, else ``None`` (with
    one warning). Imported on the first push of a long enough window rather than with this
    module (numba takes ≈ 0.2 s to import), and run once on tiny inputs, so that a
    platform where numba cannot compile or cache them falls back here, not mid-push."""
    try:
        from grokedge.edge import window_kernels

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


def kernels_for(device: torch.device, p: int) -> ModuleType | None:
    """The numba kernels for a window of rows of length ``p`` on ``device``: only on the
    CPU (numba is not imported for an accelerator's window) and from ``KERNEL_MIN_P`` on;
    ``None`` otherwise or where they cannot run."""
    if device.type != "cpu" or p < KERNEL_MIN_P:
        return None
    return _window_kernels()


def row_dots_blocks(
    rows: Tensor, new: tuple[Tensor, ...], accum_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``row_dots`` in the rows' own dtype per column block, summed in ``accum_dtype``
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


def scratch_for(
    rows: int, p: int, dtype: torch.dtype, accum_dtype: torch.dtype, device: torch.device
) -> Tensor | None:
    """The up-cast scratch of ``row_dots`` for ``rows`` = stored rows + new vectors:
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
