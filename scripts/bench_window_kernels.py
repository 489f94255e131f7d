"""The window's two p-sized float32 passes in isolation: numba kernels against torch.

    python scripts/bench_window_kernels.py --threads 1 --p 2359296 --window 5 --top-k 4

One process, random float32 rows. Each figure is the min (and median) over ``--reps``
calls, each after a 64 MiB streaming add has evicted the operands from the caches, as a
capture finds them:

- the push's dot products of the 2W stored rows with the new total and WD parts:
  torch's two GEMVs per 2^16-column block (``row_dots.row_dots_blocks``) against
  ``window_kernels.fused_row_dots`` at several ``FUSED_BLOCK`` sizes; and one pure read of
  the rows (a float32 sum), the floor any pass over them has;
- the edge vectors ``coeffs @ X`` ([k, W] @ [W, p]): torch's blocked GEMM
  (``COMBINE_CHUNK`` columns) against ``window_kernels.combine_rows`` at several
  ``COMBINE_BLOCK`` sizes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from grokedge.edge import row_dots, window_kernels
from grokedge.edge import window as window_module

BLOCKS = (1 << 10, 1 << 12, 1 << 14, 1 << 16)
EVICT = 16 << 20  # float32 elements of the cache-evicting add (64 MiB)


def timed(fn: Callable[[], object], reps: int, evict: torch.Tensor) -> tuple[float, float]:
    """(min, median) milliseconds of ``fn`` over ``reps`` calls from cold caches."""
    fn()  # compile / warm up
    times = []
    for _ in range(reps):
        evict.add_(1.0)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times), 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--p", type=int, default=2_359_296, help="row length")
    parser.add_argument("--window", type=int, default=5, help="W")
    parser.add_argument("--top-k", type=int, default=4, help="edge vectors k")
    parser.add_argument("--reps", type=int, default=21, help="timed calls per figure")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not window_kernels.available():
        raise SystemExit("numba is not importable: nothing to compare")
    gen = torch.Generator().manual_seed(0)
    p, w, k = args.p, args.window, args.top_k
    rows = torch.randn(2 * w, p, generator=gen)
    new = (torch.randn(p, generator=gen), torch.randn(p, generator=gen))
    coeffs = torch.randn(k, w, generator=gen)
    out = torch.empty(k, p)
    evict = torch.zeros(EVICT)
    print(f"p = {p:,}, W = {w}, k = {k}, {torch.get_num_threads()} torch thread(s)\n")
    print("| pass | variant | min (median) ms |\n|---|---|---|")

    def report(name: str, variant: str, fn: Callable[[], object]) -> None:
        best, med = timed(fn, args.reps, evict)
        print(f"| {name} | {variant} | {best:.2f} ({med:.2f}) |", flush=True)

    dots = "push dot products"
    report(dots, "pure read of the 2W rows (sum)", lambda: rows.sum())
    report(
        dots,
        "torch: two GEMVs per 2^16 block",
        lambda: row_dots.row_dots_blocks(rows, new, torch.float64),
    )
    saved = window_kernels.FUSED_BLOCK
    for block in BLOCKS:
        window_kernels.FUSED_BLOCK = block
        report(
            dots,
            f"kernel, 2^{block.bit_length() - 1} block",
            lambda: window_kernels.fused_row_dots(rows, new),
        )
    window_kernels.FUSED_BLOCK = saved

    comb = "edge vectors"
    x = rows[:w]
    chunk = window_module.COMBINE_CHUNK

    def torch_gemm() -> None:
        for src, dst in zip(x.split(chunk, dim=1), out.split(chunk, dim=1), strict=True):
            torch.mm(coeffs, src, out=dst)

    report(comb, f"torch: GEMM per 2^{chunk.bit_length() - 1} block", torch_gemm)
    saved = window_kernels.COMBINE_BLOCK
    for block in BLOCKS:
        window_kernels.COMBINE_BLOCK = block
        report(
            comb,
            f"kernel, 2^{block.bit_length() - 1} block",
            lambda: window_kernels.combine_rows(coeffs, x, out),
        )
    window_kernels.COMBINE_BLOCK = saved
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
