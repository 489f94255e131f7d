"""A parent process for tests/test_worker_lifetime.py, to be killed by the test.

Starts the shared analysis worker (:func:`grokedge.analysis.worker.acquire_shared_worker`),
learns the worker's PID from a job run in it, queues a job that sleeps, prints
``{"parent": PID, "worker": PID}`` as one JSON line and sleeps itself until killed.

Usage: ``python tests/worker_lifetime_parent.py HOLD_SECONDS [--from-thread]``.
``--from-thread`` starts the worker from a thread that ends once the worker has run a job
(so its initializer has run): the worker must outlive that thread, and still die with the
process.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from grokedge.analysis.worker import AnalysisWorker, acquire_shared_worker


def started_worker() -> AnalysisWorker:
    """The shared worker, once it has run a job (raises if it died on the way)."""
    worker = acquire_shared_worker(blas_threads=1)
    worker.submit(int, ()).result()
    return worker


def main() -> None:
    """Start the worker, report the PIDs on stdout, then hold for ``argv[1]`` seconds."""
    hold_s = float(sys.argv[1])
    if "--from-thread" in sys.argv[2:]:
        started: list[AnalysisWorker] = []
        creator = threading.Thread(target=lambda: started.append(started_worker()))
        creator.start()
        creator.join()
        worker = started[0]
    else:
        worker = started_worker()
    # Raises BrokenProcessPool if the worker has died since (e.g. with its creating thread).
    worker_pid = worker.submit(os.getpid, ()).result()[0]
    worker.submit(time.sleep, (hold_s,))
    print(json.dumps({"parent": os.getpid(), "worker": worker_pid}), flush=True)
    time.sleep(hold_s)


if __name__ == "__main__":  # the spawned worker imports this file as __mp_main__
    main()
