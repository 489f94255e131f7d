"""Short real training runs for the tests: ``python -m grokedge.train`` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

QUIET = ["torch_threads=1", "progress_bar.refresh_rate=0", "logger=none"]
"""One thread (bit-reproducible numbers), no progress bar, no logger but the run files."""


def train(run_dir: Path, overrides: list[str], timeout: int = 600) -> Path:
    """Run one job into ``run_dir`` with ``overrides`` (plus :data:`QUIET`), W&B off;
    asserts that it exits 0 and returns ``run_dir``."""
    done = subprocess.run(
        [sys.executable, "-m", "grokedge.train", *overrides, *QUIET, f"hydra.run.dir={run_dir}"],
        env={**os.environ, "WANDB_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir
