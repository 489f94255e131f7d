"""A worker process for the analyses' work that can wait (the probes' scikit-learn fits).

Training leaves a core idle when ``torch_threads`` is below the cores a process may use
(e.g. one torch thread on a 2-core machine). Work that reads only arrays captured at an
analysis step, and nothing of the live run, can use that core while training goes on. It
runs in a *process*, not a thread: the probes' MLP is a Python loop over many small numpy
calls, and on a thread it held the GIL so often that training slowed by about as much as
the fits cost (docs/benchmarks.md, "Cost of callbacks=full"). The process is started
with ``spawn`` (a fork of a process with torch's thread pools running is unsafe), loads
scikit-learn while training starts, and runs one job at a time with ``blas_threads``
BLAS threads: the numbers are those of the same function called in the training process
with the same thread budget.

Lightning-free. The analyses share one per process (:func:`acquire_shared_worker`), so
that their jobs take the idle core in turn; :class:`grokedge.callbacks.common.AnalysisCallback`
acquires it in ``setup`` and releases it in ``teardown``.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import torch

_LIMITS: Any = None  # the worker's threadpool limits, kept alive for its lifetime


def free_cores() -> int:
    """Cores this process may use beyond torch's intra-op threads (0 when none)."""
    return max(0, len(os.sched_getaffinity(0)) - torch.get_num_threads())


def _initialise(blas_threads: int) -> None:
    """In the worker: one torch thread, ``blas_threads`` BLAS threads, scikit-learn loaded."""
    global _LIMITS
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    _LIMITS = threadpool_limits(limits=blas_threads, user_api="blas")
    import sklearn.linear_model  # noqa: F401  (loaded now, not in the first job)
    import sklearn.neural_network  # noqa: F401


def run_pickled(job: bytes) -> tuple[Any, float]:
    """``work(*args)`` of a pickled ``(work, args)`` and its wall seconds (in the worker)."""
    work, args = pickle.loads(job)
    start = time.perf_counter()
    out = work(*args)
    return out, time.perf_counter() - start


class AnalysisWorker:
    """One spawned worker process; :meth:`submit` queues ``work(*args)`` on it.

    ``work`` must be a module-level function and ``args`` picklable (numpy arrays,
    tensors, a LightningModule without its trainer). They are pickled in :meth:`submit`,
    on the caller's thread: the job sees the values they had then, whatever training
    does to the live tensors afterwards. The future's result is ``(work's return,
    seconds)``; an exception in ``work`` is raised by ``future.result()``.

    Example:
        >>> worker = AnalysisWorker(blas_threads=1)  # doctest: +SKIP
        >>> worker.submit(sum, ([1, 2, 3],)).result()[0]  # doctest: +SKIP
        6
    """

    def __init__(self, blas_threads: int = 1) -> None:
        if blas_threads < 1:
            raise ValueError(f"blas_threads={blas_threads}; must be >= 1")
        self.blas_threads = blas_threads
        self._pool = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_initialise,
            initargs=(blas_threads,),
        )
        # Start the process (and its imports) now, while training starts.
        self._pool.submit(int)

    def submit(self, work: Callable[..., Any], args: tuple) -> Future:
        """Queue ``work(*args)``; raises what pickling them raises (nothing is queued)."""
        job = pickle.dumps((work, args), protocol=pickle.HIGHEST_PROTOCOL)
        return self._pool.submit(run_pickled, job)

    def shutdown(self) -> None:
        """Stop the process once its running job ends (jobs not yet started are cancelled:
        every caller has collected its results by then)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


_shared: AnalysisWorker | None = None
_users = 0


def acquire_shared_worker(blas_threads: int) -> AnalysisWorker:
    """The process's one worker (started by the first user): every analysis queues on
    it, so that their jobs take the one idle core in turn instead of competing for it."""
    global _shared, _users
    if _shared is None:
        _shared = AnalysisWorker(blas_threads)
    _users += 1
    return _shared


def release_shared_worker() -> None:
    """One user done; the last one stops the worker (:meth:`AnalysisWorker.shutdown`)."""
    global _shared, _users
    _users = max(0, _users - 1)
    if _users == 0 and _shared is not None:
        _shared.shutdown()
        _shared = None
