"""The analysis worker, and multiprocessing's resource tracker, die with their parent.

Real processes: a parent that has started the worker (tests/worker_lifetime_parent.py, or a
real ``python -m grokedge.train`` run) is SIGKILLed, and every process it had started must
be gone within :data:`GONE_WITHIN_S` seconds. Processes are found and watched through
``/proc`` (Linux), each identified by its PID *and* start time, so that a reused PID is
never taken for a survivor, nor killed in the clean-up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from tests.real_runs import QUIET

REPO = Path(__file__).resolve().parents[1]
PARENT_SCRIPT = REPO / "tests" / "worker_lifetime_parent.py"
PROC = Path("/proc")

GONE_WITHIN_S = 10.0  # the bound: an orphan must be gone this soon after SIGKILL
POLL_S = 0.05  # the test's own polling of /proc while it times the exits
HOLD_S = 600  # the parent's (and its job's) sleep: far longer than any test here
START_TIMEOUT_S = 240  # a run's start (imports, data, the worker's imports) on a busy machine
START_POLL_S = 0.5  # polling of /proc while waiting for the run's worker

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)"),
]

Proc = tuple[int, int]
"""A process: (PID, start time in clock ticks after boot)."""


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent PID, start time in clock ticks) of ``pid``; None if there is none."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Fields after "(comm)", which may itself hold spaces and parentheses: state is
    # field 3 of proc(5), ppid field 4, starttime field 22.
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[19])


def alive(proc: Proc) -> bool:
    """Whether ``proc`` still runs (a zombie is dead: it only waits to be reaped)."""
    stat = proc_stat(proc[0])
    return stat is not None and stat[0] != "Z" and stat[2] == proc[1]


def descendants(root: int) -> list[Proc]:
    """Every living process below ``root`` (children, their children, ...)."""
    children: dict[int, list[Proc]] = defaultdict(list)
    for entry in PROC.iterdir():
        stat = proc_stat(int(entry.name)) if entry.name.isdigit() else None
        if stat is not None and stat[0] != "Z":
            children[stat[1]].append((int(entry.name), stat[2]))
    found: list[Proc] = []
    todo = [root]
    while todo:
        below = children[todo.pop()]
        found += below
        todo += [pid for pid, _ in below]
    return found


def cmdline(pid: int) -> str:
    """The command line of ``pid`` ('' once it is gone)."""
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def read_or_empty(path: Path) -> str:
    """The text of ``path``, '' if it (its process) is gone."""
    try:
        return path.read_text()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def initialised_worker(root: int) -> int | None:
    """PID of a worker below ``root`` that has loaded scikit-learn (so its initializer,
    which makes it die with its parent first, has run); None while there is none."""
    for pid, _ in descendants(root):
        if "spawn_main" in cmdline(pid) and "sklearn" in read_or_empty(PROC / str(pid) / "maps"):
            return pid
    return None


def label(command: str) -> str:
    """What a process of the parent is, from its command line."""
    if "resource_tracker" in command:
        return "resource tracker"
    if "spawn_main" in command:
        return "worker"
    return command[:120]


def kill_and_time(parent: subprocess.Popen, procs: list[Proc]) -> dict[Proc, float]:
    """SIGKILL ``parent``; seconds until each of ``procs`` was gone (absent: still alive
    :data:`GONE_WITHIN_S` seconds later; such survivors are SIGKILLed after)."""
    parent.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    parent.wait()
    gone_after: dict[Proc, float] = {}
    while len(gone_after) < len(procs) and time.monotonic() - killed < GONE_WITHIN_S:
        for proc in procs:
            if proc not in gone_after and not alive(proc):
                gone_after[proc] = time.monotonic() - killed
        time.sleep(POLL_S)
    return gone_after


def assert_all_gone(procs: list[Proc], labels: dict[Proc, str], gone: dict[Proc, float]) -> None:
    """Report each process's time to exit; fail, killing them, if any survived."""
    for proc in procs:
        seconds = f"{gone[proc]:.2f} s" if proc in gone else f"alive after {GONE_WITHIN_S} s"
        print(f"{labels[proc]} (pid {proc[0]}): {seconds} after the parent's SIGKILL")
    survivors = [proc for proc in procs if proc not in gone]
    for proc in survivors:
        if alive(proc):
            os.kill(proc[0], signal.SIGKILL)
    assert not survivors, "outlived their SIGKILLed parent: " + "; ".join(
        f"pid {pid}: {labels[(pid, start)]}" for pid, start in survivors
    )


def stop(parent: subprocess.Popen) -> None:
    """Clean-up after a failure before the kill: the parent and whatever it started."""
    if parent.poll() is None:
        procs = descendants(parent.pid)
        parent.kill()
        parent.wait()
        for proc in procs:
            if alive(proc):
                os.kill(proc[0], signal.SIGKILL)


@pytest.mark.parametrize("from_thread", [False, True], ids=["main-thread", "ended-thread"])
def test_worker_and_tracker_die_with_a_killed_parent(from_thread: bool) -> None:
    """The worker (busy with a job) and the resource tracker exit within GONE_WITHIN_S of
    the parent's SIGKILL, whether the worker was started on the parent's main thread or
    on a thread that has ended (which it must outlive while the parent lives)."""
    with subprocess.Popen(
        [sys.executable, str(PARENT_SCRIPT), str(HOLD_S)]
        + (["--from-thread"] if from_thread else []),
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    ) as parent:
        try:
            line = parent.stdout.readline()  # written once the worker has run its jobs
            assert line, f"the parent exited ({parent.wait()}) without a live worker to report"
            pids = json.loads(line)
            assert pids["parent"] == parent.pid
            procs = descendants(parent.pid)
            labels = {proc: label(cmdline(proc[0])) for proc in procs}
            assert pids["worker"] in [pid for pid, _ in procs], labels
        except BaseException:
            stop(parent)
            raise
        assert_all_gone(procs, labels, kill_and_time(parent, procs))


def test_worker_dies_with_a_killed_training_run(tmp_path: Path) -> None:
    """A real run with callbacks=full and its analyses in the worker (forced on by
    GROKEDGE_BACKGROUND=true, whatever the machine's cores), SIGKILLed once the worker
    has loaded scikit-learn (its initializer ran): nothing it started outlives it."""
    log = tmp_path / "train.log"
    with log.open("w") as out:
        run = subprocess.Popen(
            [sys.executable, "-m", "grokedge.train", "task=dyck", "callbacks=full"]
            + ["trainer.max_steps=1000000", *QUIET, f"hydra.run.dir={tmp_path / 'run'}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={
                **os.environ,
                "WANDB_MODE": "disabled",
                "OMP_NUM_THREADS": "1",
                "GROKEDGE_BACKGROUND": "true",
            },
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while initialised_worker(run.pid) is None:
            assert run.poll() is None and time.monotonic() < deadline, (
                f"no initialised worker (exit {run.poll()}):\n{log.read_text()[-3000:]}"
            )
            time.sleep(START_POLL_S)
        procs = descendants(run.pid)
        labels = {proc: label(cmdline(proc[0])) for proc in procs}
    except BaseException:
        stop(run)
        raise
    assert_all_gone(procs, labels, kill_and_time(run, procs))
