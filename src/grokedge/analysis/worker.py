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

A spawned process re-runs the main script's top-level code (as ``__mp_main__``) before it
can take a job, so a script that trains at top level, outside an
``if __name__ == "__main__":`` block, would train a second time inside the worker (and
end in ``BrokenProcessPool``). :func:`unguarded_main_line` finds that case before the
worker is started; the callbacks then keep the analyses on the training thread.
"""

from __future__ import annotations

import ast
import ctypes
import ctypes.util
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
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


@dataclass(frozen=True)
class UnguardedLine:
    """Where the main script starts the current call at top level, outside an
    ``if __name__ == "__main__":`` block: ``path`` (absolute) and 1-based ``line``."""

    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}, line {self.line}"


def _is_main_test(test: ast.expr) -> str | None:
    """``"=="`` / ``"!="`` for an ``if`` test ``__name__ == "__main__"`` (either side,
    or ``!=``), else None."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1):
        return None
    sides = (test.left, test.comparators[0])
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    mains = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    if not (names and mains):
        return None
    if isinstance(test.ops[0], ast.Eq):
        return "=="
    if isinstance(test.ops[0], ast.NotEq):
        return "!="
    return None


def _guarded(tree: ast.Module, line: int) -> bool:
    """Whether ``line`` lies inside the main-only branch of an ``if __name__ ==
    "__main__":`` (or the ``else`` of ``!=``) anywhere in the module's top-level code
    (not inside a function or class, which the re-import does not run)."""
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
            continue
        if isinstance(node, ast.If):
            kind = _is_main_test(node.test)
            branch = node.body if kind == "==" else node.orelse if kind == "!=" else []
            if branch and branch[0].lineno <= line <= (branch[-1].end_lineno or line):
                return True
        todo.extend(ast.iter_child_nodes(node))
    return False


def unguarded_main_line() -> UnguardedLine | None:
    """The main script's top-level line that the current call comes from, when a spawned
    process would run it again; None when it would not (or cannot be told).

    A ``spawn`` child re-runs the main module's top-level code as ``__mp_main__`` (by
    name for ``python -m mod``, by path for ``python script.py``; never for a package's
    ``__main__.py``, IPython's launcher, ``python -c``, a notebook or an interactive
    session: no main file). The check is exact where it matters: the frame of the main
    module's top-level code on the current stack says which statement started this
    call; the child re-runs it unless that statement lies in the main-only branch of an
    ``if __name__ == "__main__":`` (found in the script's syntax tree). A statement
    merely *present* at top level is not enough to refuse a script (defining a model or
    the data at top level is harmless); and no main frame on the stack (a call from a
    thread, or after the script's top level has finished) means no top-level line to
    blame: None, as for a main file that cannot be read or parsed.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None:
        return None
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name is not None and (name == "__main__" or name.endswith(".__main__")):
        return None  # multiprocessing does not re-run these
    if os.path.splitext(os.path.basename(path))[0] == "ipython":
        return None  # nor IPython's launcher (multiprocessing.spawn._fixup_main_from_path)
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals is main.__dict__:
            break
        frame = frame.f_back
    if frame is None:
        return None
    line = frame.f_lineno
    try:
        with open(path, "rb") as file:
            tree = ast.parse(file.read(), filename=path)
    except (OSError, SyntaxError, ValueError):
        return None
    return None if _guarded(tree, line) else UnguardedLine(os.path.abspath(path), line)


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


GUARD_FIX = 'put the training code under `if __name__ == "__main__":`'
"""The one-line fix for a script that trains at top level (the worker would re-run it)."""

_warned_unguarded: set[UnguardedLine] = set()
"""Unguarded script lines already warned about: one warning per line, not per analysis."""


def worker_allowed(asked_by: str | None = None) -> bool:
    """Whether the analyses may use the worker process: False, with one warning per script
    line, when the main script starts training outside an ``if __name__ == "__main__":``
    block (:func:`unguarded_main_line`: the spawned worker would re-run it and train a
    second time); one ValueError instead when ``asked_by`` (e.g.
    ``AblationCallback(background=True)``) requested a worker by name."""
    unguarded = unguarded_main_line()
    if unguarded is None:
        return True
    why = (
        f"the script {unguarded.path} starts training at line {unguarded.line}, outside "
        'an `if __name__ == "__main__":` block, and the analyses\' worker process '
        "(multiprocessing, spawn) re-runs that line: it would train a second time"
    )
    if asked_by is not None:
        raise ValueError(
            f"{asked_by} needs a worker process, but {why}. "
            f"Fix: {GUARD_FIX} (or background=False / 'auto')"
        )
    if unguarded not in _warned_unguarded:
        _warned_unguarded.add(unguarded)
        warnings.warn(
            f"grokedge: the analyses run on the training thread (same numbers, no idle "
            f"core used): {why}. Fix: {GUARD_FIX}",
            RuntimeWarning,
            stacklevel=3,
        )
    return False
