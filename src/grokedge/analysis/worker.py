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
with the same thread budget. It dies with the training process, however that dies
(SIGKILL included), and so does multiprocessing's resource tracker
(:func:`_die_with_parent`; tests/test_worker_lifetime.py).

Lightning-free. The analyses share one per process (:func:`acquire_shared_worker`), so
that their jobs take the idle core in turn; :class:`grokedge.callbacks.common.AnalysisCallback`
acquires it in ``setup`` and releases it in ``teardown``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import torch

_LIMITS: Any = None  # the worker's threadpool limits, kept alive for its lifetime

PARENT_CHECK_SECONDS = 1.0
"""Seconds between the worker's checks that its parent is alive. The check is the fallback
(where the parent-death signal is not available or not armed, see :func:`_die_with_parent`),
so a second is soon enough; it costs the worker one ``getppid`` call a second and training
nothing."""

ORPHAN_EXIT_CODE = 1
"""Exit status of a worker that found its parent gone (nobody is left to read it)."""

_PR_SET_PDEATHSIG = 1  # prctl option number, from <linux/prctl.h>


def free_cores() -> int:
    """Cores this process may use beyond torch's intra-op threads (0 when none)."""
    return max(0, len(os.sched_getaffinity(0)) - torch.get_num_threads())


def _arm_parent_death_signal() -> bool:
    """Linux: have the kernel SIGKILL this process when its parent dies; False elsewhere
    (or when ``prctl`` cannot be called), leaving the polling of :func:`_watch_parent`."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):  # no libc found, or one without prctl
        return False


def _watch_parent(parent_pid: int) -> None:
    """Exit the process as soon as its parent is no longer ``parent_pid`` (checked every
    :data:`PARENT_CHECK_SECONDS`)."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_SECONDS)
    # os._exit, not sys.exit: this is not the main thread, and nothing here needs cleaning
    # up (a job's result has nobody to go to; the resource tracker removes the pool's
    # semaphores once this process, the last holder of its pipe, is gone).
    os._exit(ORPHAN_EXIT_CODE)


def _die_with_parent(parent_pid: int, pdeathsig: bool) -> None:
    """In the worker: end this process within about :data:`PARENT_CHECK_SECONDS` of its
    parent's death, however the parent died (SIGKILL included: nothing runs in it then).

    Without this an orphaned worker lives on: it waits for jobs on the pool's call queue,
    whose pipe it holds both ends of, so it never sees an end of file; and it holds the
    write end of multiprocessing's resource tracker's pipe, so the tracker lives on too.

    Two mechanisms. (1) A daemon thread compares ``os.getppid()`` with ``parent_pid``,
    the parent's PID read *in the parent*: an orphan is re-parented to init or a
    subreaper, which was alive all along and so can never have the dead parent's PID,
    so a reused PID cannot fool the check (it compares this process's own parent
    link, it does not ask whether some process with that PID exists). It also covers a
    parent that died before this runs. (2) On Linux, ``PR_SET_PDEATHSIG``: the kernel
    kills this process at once when its parent dies. The kernel sends it when the
    parent *thread* that created this process exits, not the parent process, so it is
    armed only when ``pdeathsig`` says that thread was the parent's main thread (which
    lives as long as the process). With the ``spawn`` context ProcessPoolExecutor starts
    its process from ``submit`` on the caller's thread (its management thread starts
    one only to replace a worker after ``max_tasks_per_child`` jobs, unused here), and
    :class:`AnalysisWorker` submits from its constructor, so that thread is the one
    that created the worker; were it a short-lived thread, the signal would kill a
    worker whose parent is alive.
    """
    if pdeathsig:
        _arm_parent_death_signal()
    threading.Thread(
        target=_watch_parent, args=(parent_pid,), name="watch-parent", daemon=True
    ).start()


def _initialise(blas_threads: int, parent_pid: int, pdeathsig: bool) -> None:
    """In the worker: dies with its parent (:func:`_die_with_parent`), one torch thread,
    ``blas_threads`` BLAS threads, scikit-learn loaded."""
    global _LIMITS
    _die_with_parent(parent_pid, pdeathsig)  # first: the imports below take seconds
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
        # The submit below starts the process on this thread (see _die_with_parent).
        on_main_thread = threading.current_thread() is threading.main_thread()
        self._pool = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_initialise,
            initargs=(blas_threads, os.getpid(), on_main_thread),
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
