"""Deferred analysis jobs: run at once, or in the shared worker process while training goes on.

An analysis call (``grokedge.callbacks.common.AnalysisCallback``) returns a :class:`Result`,
or a :class:`Deferred` whose jobs read nothing of the live run. :class:`BackgroundJobs`
runs those jobs on the training thread or queues them on the shared
:class:`~grokedge.analysis.worker.AnalysisWorker`, and hands the finished calls back in
call order at fixed points, so that a run's files do not depend on timing. No Lightning.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from threadpoolctl import threadpool_limits

from grokedge.analysis.worker import AnalysisWorker, acquire_shared_worker, release_shared_worker


@dataclass
class Result:
    """One analysis call: ``scalars`` to log, ``fields`` of its ``analyses.jsonl`` row
    (besides step, phase, grok_step, trigger and seconds), and an optional W&B table
    ``(key, columns, rows)`` (step and phase are prepended to every row)."""

    scalars: dict[str, float]
    fields: dict[str, Any] = field(default_factory=dict)
    table: tuple[str, list[str], list[list[Any]]] | None = None


@dataclass(frozen=True)
class Deferred:
    """The part of an analysis call that can wait: independent ``jobs`` ``(work, args)``
    whose ``work(*args)`` reads only what the call captured (θ, the edge, the subset, the
    module itself or numpy arrays: nothing of the live run, no global random state), and
    ``complete``, which turns their return values (in job order) into the call's
    :class:`Result`.

    The ablation, the perturbation and the probes return one from
    :meth:`grokedge.callbacks.common.AnalysisCallback.analyse`: :class:`BackgroundJobs`
    runs the jobs at once or, with ``background`` on, in a worker process
    (:class:`grokedge.analysis.worker.AnalysisWorker`: each ``work`` must then be a
    module-level function and its ``args`` picklable) while training goes on; after
    training has ended (the ``at_end`` call) the first job runs on the training thread
    beside the worker. ``complete`` always runs on the training thread. The numbers are
    the same either way.
    """

    jobs: tuple[tuple[Callable[..., Any], tuple], ...]
    complete: Callable[[list[Any]], Result]

    def finish(self) -> Result:
        return self.complete([work(*args) for work, args in self.jobs])


@dataclass(frozen=True)
class Pending:
    """A :class:`Deferred` running on the worker: its call's identity and main-thread time."""

    step: int
    trigger: str
    seconds: float  # spent in analyse() (and in jobs run there) on the training thread
    futures: list[Future]  # per job -> (work's return value, seconds in the worker)
    complete: Callable[[list[Any]], Result]


class BackgroundJobs:
    """The deferred calls of one analysis and, when on, its handle on the shared worker.

    Args:
        config_key: the analysis' config path, named in the warning when a call cannot be
            sent to the worker.
    """

    def __init__(self, config_key: str) -> None:
        self.config_key = config_key
        self.enabled = False  # whether deferred jobs go to the worker (resolved by start)
        self.worker: AnalysisWorker | None = None
        self.pending: list[Pending] = []

    def start(self, enabled: bool, blas_threads: int) -> None:
        """Send deferred jobs to the shared worker (``enabled``), whose BLAS gets
        ``blas_threads`` threads; acquired once."""
        self.enabled = enabled
        if enabled and self.worker is None:
            self.worker = acquire_shared_worker(blas_threads=blas_threads)

    def stop(self) -> None:
        """Release this analysis' hold on the shared worker."""
        if self.worker is not None:
            self.worker = None
            release_shared_worker()

    def run(self, deferred: Deferred, after_training: bool) -> Result | list[Future]:
        """Run ``deferred`` now (its :class:`Result`), or queue its jobs on the worker (their
        futures, in job order). After training the training thread is idle: it runs the
        first job beside the worker."""
        if not self.enabled:
            return deferred.finish()
        assert self.worker is not None
        jobs = list(deferred.jobs)
        here = jobs.pop(0) if after_training and len(jobs) > 1 else None
        try:
            futures = [self.worker.submit(work, args) for work, args in jobs]
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            # A module the worker cannot receive (e.g. a class defined in a script):
            # nothing was queued; this call and the next run on the training thread.
            warnings.warn(
                f"{self.config_key}.background: the analysis cannot be sent to the worker "
                f"process ({e}); it runs on the training thread from now on",
                RuntimeWarning,
                stacklevel=3,
            )
            self.enabled = False
            return deferred.finish()
        if here is not None:
            done: Future = Future()
            # The worker's BLAS budget, so that the job's numbers are the worker's.
            with threadpool_limits(limits=self.worker.blas_threads, user_api="blas"):
                done.set_result((here[0](*here[1]), 0.0))
            futures.insert(0, done)
        return futures

    def finished(self, until: int | None = None) -> Iterator[tuple[int, str, Result, float]]:
        """The worker's calls of steps <= ``until`` (None: all), in call order, as
        ``(step, trigger, result, seconds on the training thread)``, waiting for them if
        need be; ``result.fields["worker_seconds"]`` is the worker's own time. A worker's
        exception is raised here, on the training thread."""
        while self.pending and (until is None or self.pending[0].step <= until):
            pending = self.pending.pop(0)
            outputs = [future.result() for future in pending.futures]
            result = pending.complete([output for output, _ in outputs])
            result.fields["worker_seconds"] = sum(seconds for _, seconds in outputs)
            yield pending.step, pending.trigger, result, pending.seconds
