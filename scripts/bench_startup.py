"""Start-up benchmarks of ``python -m grokedge.train`` (issue 11, item 4: fast start).

Each command runs in a fresh process, ``--repeats`` times (after one untimed warm-up run
of each, so that every timed run finds the files in the page cache); the table gives the
median, min and max of the whole process's wall time:

- ``python -m grokedge.train --help``
- ``python -m grokedge.train --cfg job``
- ``python -c "import grokedge.train"``
- ``python -c "import lightning"``: what any run must import (torch, torchmetrics, and
  scipy.signal and matplotlib through torchmetrics), the floor of a run's overhead
- a short run, ``task=dyck callbacks=gram logger=none trainer.max_steps=10``, whose
  *overhead* is the process's wall time minus the ``wall_s`` its ``summary.json`` records
  (``wall_s`` times ``fit``: ``log_hyperparams`` and ``Trainer.fit``, so the overhead is
  interpreter start-up, imports, composing the config, building data, model, callbacks,
  loggers and trainer, writing the summary and the interpreter's exit).

    WANDB_MODE=disabled .venv/bin/python scripts/bench_startup.py --repeats 5   # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN_OVERRIDES = ["task=dyck", "callbacks=gram", "logger=none", "trainer.max_steps=10"]
TARGETS = {"--help": 2.0, "--cfg job": 2.0, "run overhead": 3.0}


def timed(cmd: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one process running ``cmd``; raises if it fails."""
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return wall


def run_overhead(env: dict[str, str], workdir: Path, index: int) -> tuple[float, float, float]:
    """(process wall, summary.json wall_s, their difference) of one short training run."""
    run_dir = workdir / f"run-{index}"
    cmd = [sys.executable, "-m", "grokedge.train", *RUN_OVERRIDES, f"hydra.run.dir={run_dir}"]
    wall = timed(cmd, env)
    fit_s = float(json.loads((run_dir / "summary.json").read_text())["wall_s"])
    return wall, fit_s, wall - fit_s


def stats(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each command")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "disabled")
    py = sys.executable
    commands = {
        "--help": [py, "-m", "grokedge.train", "--help"],
        "--cfg job": [py, "-m", "grokedge.train", "--cfg", "job"],
        "import grokedge.train": [py, "-c", "import grokedge.train"],
        "import lightning": [py, "-c", "import lightning"],  # the floor of any run
    }
    results: dict[str, list[float]] = {name: [] for name in commands}
    runs: list[tuple[float, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench_startup-") as tmp:
        workdir = Path(tmp)
        for cmd in commands.values():  # warm-up: page cache, .pyc files
            timed(cmd, env)
        run_overhead(env, workdir, -1)
        for i in range(args.repeats):  # interleaved, so that load spikes hit every command
            for name, cmd in commands.items():
                results[name].append(timed(cmd, env))
            runs.append(run_overhead(env, workdir, i))

    print(f"median of {args.repeats} fresh processes (min, max), seconds\n")
    print("| command | median | min | max | target |")
    print("|---|---|---|---|---|")
    rows: dict[str, tuple[float, float, float]] = {n: stats(v) for n, v in results.items()}
    rows["run: whole process"] = stats([r[0] for r in runs])
    rows["run: `fit` (`wall_s`)"] = stats([r[1] for r in runs])
    rows["run overhead"] = stats([r[2] for r in runs])
    for name, (med, lo, hi) in rows.items():
        target = TARGETS.get(name)
        mark = "" if target is None else f"< {target:g}" + (" met" if med < target else " missed")
        label = f"`{name}`" if name in commands else name
        print(f"| {label} | {med:.2f} | {lo:.2f} | {hi:.2f} | {mark} |")
    print(f"\nrun: python -m grokedge.train {' '.join(RUN_OVERRIDES)}")
    if args.json is not None:
        raw = {**results, "run": [list(r) for r in runs]}
        args.json.write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
