"""The memory a DeltaRecorder (the GramCallback's) allocates, predicted before allocating.

Pure arithmetic over ``p`` (selected elements), W, k and the dtypes: no tensor is built.
The count follows what ``DeltaRecorder.attach`` and ``UpdateWindow.push`` allocate:

==================  ==============================  =====================================
buffer              shape                           bytes
==================  ==============================  =====================================
window deltas       [2, W, p] buffer dtype          2·W·p·b_buf (total and WD parts)
edge vectors        2 × [k, p] buffer dtype         2·k·p·b_buf (edge and previous)
θ at last capture   [p] parameter dtype             p·b_θ
total-delta scratch [p] parameter dtype             p·b_θ
WD accumulator      [p] ≥ float32                   p·max(b_θ, 4)
W×W matrices        [3, W, W] float64               24·W²
up-cast scratch     [2W + 2, chunk] float64         (2W + 2)·chunk·8 (≤ 6 MiB on a CPU,
                    (none for float32 buffers:      ≤ 256 MiB on an accelerator)
                    multiplied in place)
==================  ==============================  =====================================

Besides these persistent buffers a capture briefly holds ``transient`` bytes: the new
delta's two parts cast to the buffer dtype when it differs from the parameters'
(2·p·b_buf), plus their float64 stack when the buffer is float64 (2·p·8).

For W = 5, k = 4, float32 everywhere this is (2W + 2k + 3)·4p = 84·p bytes: 8.4 GB at
p = 10⁸, of which the window is 4 GB.

Each derived window (``callbacks.gram.interval_multiples``: a multiple k >= 2 keeps the
window of the summed deltas over N = k·N0, ``grokedge.edge.derived_windows``) adds

==================  ==============================  =====================================
derived window      [2, W, p] buffer dtype          2·W·p·b_buf
block accumulator   [2, p] ≥ float32                2·p·max(b_buf, 4)
its W×W matrices    [3, W, W] float64               24·W²
its up-cast scratch as the base window's            (0 for float32 buffers)
==================  ==============================  =====================================

(no edge vectors: its spectra are W×W algebra), so [1, 2, 3] at W = 5, float32, costs
2·(2W + 2)·4p = 96·p bytes more than [1] (:func:`derived_memory`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from grokedge.checks import not_allowed
from grokedge.edge.row_dots import (
    ACCUM_CHUNK,
    ACCUM_CHUNK_ACCELERATOR,
    MIN_CHUNK,
    SCRATCH_BYTES,
    SCRATCH_BYTES_ACCELERATOR,
    uses_float32_blocks,
)
from grokedge.edge.sharding import Shard

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

ACCUM_DTYPE = torch.float64
"""The dtype of the W×W matrices and of the up-cast scratch (``UpdateWindow``'s default)."""


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float32`` for ``"float32"`` (the names of ``callbacks.gram.buffer_dtype``)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise not_allowed("buffer dtype", dtype, f"one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


@dataclass(frozen=True)
class WindowMemory:
    """Bytes GramCallback holds, by buffer (see the module docstring for the shapes).

    ``derived``: the p-sized buffers of the derived windows (their [2, W, p] windows,
    [2, p] accumulators and up-cast scratches), ``derived_matrices`` their W×W matrices;
    both 0 for ``interval_multiples`` = [1]."""

    window: int
    vectors: int
    theta_prev: int
    total: int
    wd_accumulator: int
    matrices: int
    scratch: int
    transient: int
    derived: int = 0
    derived_matrices: int = 0

    @property
    def persistent(self) -> int:
        """Bytes allocated from the first capture on, for the rest of the run."""
        return self.total_bytes - self.transient

    @property
    def total_bytes(self) -> int:
        """Persistent bytes plus the transient peak of a capture."""
        return sum(asdict(self).values())


def scratch_columns(rows: int, p: int, device_type: str = "cpu") -> int:
    """Columns of ``UpdateWindow``'s float64 up-cast scratch ([rows, columns])."""
    item = _itemsize(ACCUM_DTYPE)
    if device_type == "cpu":
        per_chunk = min(ACCUM_CHUNK, max(MIN_CHUNK, SCRATCH_BYTES // (rows * item)))
    else:
        per_chunk = min(
            ACCUM_CHUNK_ACCELERATOR, max(MIN_CHUNK, SCRATCH_BYTES_ACCELERATOR // (rows * item))
        )
    return min(per_chunk, max(p, 1))


def push_scratch_bytes(rows: int, p: int, buffer_dtype: torch.dtype, device_type: str) -> int:
    """Bytes of ``UpdateWindow``'s [rows, chunk] float64 up-cast scratch; 0 for float32
    buffers, whose float32 blocks are multiplied in place (``uses_float32_blocks``)."""
    if uses_float32_blocks(buffer_dtype, ACCUM_DTYPE, torch.device(device_type)):
        return 0
    return rows * scratch_columns(rows, p, device_type) * _itemsize(ACCUM_DTYPE)


def derived_memory(
    p: int,
    window: int,
    buffer_dtype: torch.dtype | str,
    interval_multiples: Sequence[int] = (1,),
    device_type: str = "cpu",
) -> tuple[int, int]:
    """(p-sized bytes, W×W matrix bytes) of the derived windows of ``interval_multiples``
    (one per k >= 2: a [2, W, p] window, a [2, p] accumulator in at least float32 and the
    window's up-cast scratch; its [3, W, W] float64 matrices)."""
    count = sum(1 for k in interval_multiples if k > 1)
    buf = as_dtype(buffer_dtype)
    b_acc = _itemsize(torch.promote_types(buf, torch.float32))
    per_window = (
        2 * window * p * _itemsize(buf)
        + 2 * p * b_acc
        + push_scratch_bytes(2 * window + 2, p, buf, device_type)
    )
    return count * per_window, count * 3 * window * window * _itemsize(ACCUM_DTYPE)


def window_memory(
    p: int,
    window: int,
    top_k: int,
    buffer_dtype: torch.dtype | str,
    *,
    param_dtype: torch.dtype | str = torch.float32,
    device_type: str = "cpu",
    interval_multiples: Sequence[int] = (1,),
) -> WindowMemory:
    """The bytes of each buffer a DeltaRecorder allocates for ``p`` selected elements.

    Args:
        p: selected elements (θ_sel, or this rank's slice of it), >= 1.
        window: W, deltas in the window, >= 2.
        top_k: k, edge vectors materialised, >= 1.
        buffer_dtype: storage of the window and edge vectors (``callbacks.gram.buffer_dtype``).
        param_dtype: dtype of the selected parameters (θ_prev and the total-delta scratch
            are kept in it; the WD accumulator in at least float32).
        device_type: ``"cpu"`` or an accelerator (``"cuda"``): sets the scratch size.
        interval_multiples: ``callbacks.gram.interval_multiples``; each k >= 2 adds a
            derived window (:func:`derived_memory`).
    """
    if p < 1 or window < 2 or top_k < 1:
        raise ValueError(f"need p >= 1, window >= 2, top_k >= 1; got {p}, {window}, {top_k}")
    buf = as_dtype(buffer_dtype)
    par = as_dtype(param_dtype)
    b_buf, b_par = _itemsize(buf), _itemsize(par)
    b_acc = _itemsize(torch.promote_types(torch.float32, par))
    rows = 2 * window + 2
    transient = 0
    if buf != par:
        transient += 2 * p * b_buf  # total.to(buffer dtype), wd.to(buffer dtype)
    if buf == ACCUM_DTYPE:
        transient += 2 * p * _itemsize(ACCUM_DTYPE)  # torch.stack of the two new parts
    derived, derived_matrices = derived_memory(p, window, buf, interval_multiples, device_type)
    if derived and torch.promote_types(buf, torch.float32) != buf:
        # A derived push casts its float32 accumulator to the buffer dtype (after the
        # base push: the peaks do not add up).
        transient = max(transient, 2 * p * b_buf)
    return WindowMemory(
        window=2 * window * p * b_buf,
        vectors=2 * top_k * p * b_buf,
        theta_prev=p * b_par,
        total=p * b_par,
        wd_accumulator=p * b_acc,
        matrices=3 * window * window * _itemsize(ACCUM_DTYPE),
        scratch=push_scratch_bytes(rows, p, buf, device_type),
        transient=transient,
        derived=derived,
        derived_matrices=derived_matrices,
    )


def window_memory_bytes(
    p: int,
    window: int,
    top_k: int,
    buffer_dtype: torch.dtype | str,
    *,
    param_dtype: torch.dtype | str = torch.float32,
    device_type: str = "cpu",
    interval_multiples: Sequence[int] = (1,),
) -> int:
    """Persistent bytes a DeltaRecorder allocates: ≈ (2W + 2k)·p·b_buf + 3·p·b_θ + O(W²),
    plus ≈ (2W + 2)·p·b_buf per derived window (each k >= 2 of ``interval_multiples``).

    The window's [2, W, p] deltas, two [k, p] edge-vector buffers, θ at the last capture,
    the total-delta scratch, the WD accumulator, the W×W matrices, the up-cast scratch
    and the derived windows (:func:`window_memory` itemises them; a capture adds its
    ``transient`` on top).

    Example:
        >>> window_memory_bytes(1_000_000, window=5, top_k=4, buffer_dtype="float32")
        84000600
    """
    return window_memory(
        p,
        window,
        top_k,
        buffer_dtype,
        param_dtype=param_dtype,
        device_type=device_type,
        interval_multiples=interval_multiples,
    ).persistent


def describe_memory(
    predicted_bytes: int,
    shard: Shard,
    window: int,
    top_k: int,
    buffer_dtype: str,
    derived_intervals: Sequence[int] = (),
) -> str:
    """The predicted buffer memory in words, e.g. ``22.5 MiB of buffers (p = 131,072;
    W = 5, top_k = 4, float32; with derived windows N = 200, 300)``.

    Args:
        predicted_bytes: this rank's buffers (:func:`window_memory_bytes`), bytes.
        shard: this rank's slice of θ_sel (p, n, world size).
        window, top_k, buffer_dtype: W, k and the buffers' dtype name.
        derived_intervals: N of each derived window (optimizer steps); named when given.
    """
    where = (
        f"per rank, slice of {shard.n:,} of p = {shard.p:,} on {shard.world_size} ranks"
        if shard.sharded
        else f"p = {shard.p:,}"
    )
    derived = ""
    if derived_intervals:
        derived = f"; with derived windows N = {', '.join(str(n) for n in derived_intervals)}"
    return (
        f"{predicted_bytes / 2**20:,.1f} MiB of buffers ({where}; "
        f"W = {window}, top_k = {top_k}, {buffer_dtype}{derived})"
    )
