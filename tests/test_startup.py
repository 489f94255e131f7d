"""Fast start (issue 11, item 4): what the entry point imports before it needs it.

Wall-clock times are measured by scripts/bench_startup.py, never asserted here; these
tests pin the imports that made ``--help`` and ``--cfg job`` slow, so that the laziness
cannot silently regress.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

# W&B, matplotlib and scikit-learn are for some runs only; Lightning (with torch,
# torchmetrics, scipy.signal and matplotlib behind it: ~3 s on 2 cores) is for runs only.
NEVER_AT_IMPORT = ("wandb", "matplotlib", "sklearn", "lightning", "torch")


def _python(*args: str) -> subprocess.CompletedProcess:
    """``python *args`` in a fresh process from the repository root; it must succeed."""
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env={**os.environ, "WANDB_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _loaded(code: str) -> list[str]:
    """The modules of NEVER_AT_IMPORT in ``sys.modules`` after ``code``, in a fresh process."""
    probe = f"{code}\nimport sys\nprint(sorted(m for m in {NEVER_AT_IMPORT!r} if m in sys.modules))"
    return ast.literal_eval(_python("-c", probe).stdout.strip().splitlines()[-1])


def test_import_train_loads_no_heavy_package() -> None:
    assert _loaded("import grokedge.train") == []


@pytest.mark.parametrize("args", [["--help"], ["--cfg", "job"]], ids=["help", "cfg"])
def test_help_and_cfg_load_no_heavy_package(args: list[str]) -> None:
    """``python -m grokedge.train --help`` / ``--cfg job`` print without Lightning."""
    proc = _python("-X", "importtime", "-m", "grokedge.train", *args)
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert sorted(m for m in NEVER_AT_IMPORT if m in imported) == []
    assert "task" in proc.stdout  # the config (or the help's config groups) was printed


def test_callbacks_package_imports_each_callback_on_first_use() -> None:
    """A run instantiating GramCallback by its ``_target_`` loads no other analysis."""
    code = (
        "import sys\n"
        "from grokedge.callbacks.gram import GramCallback\n"
        "assert 'grokedge.callbacks.probe' not in sys.modules\n"
        "assert 'grokedge.callbacks.ablation' not in sys.modules\n"
        "from grokedge.callbacks import ProbeCallback, find_gram_callback\n"
        "assert ProbeCallback.__module__ == 'grokedge.callbacks.probe'\n"
    )
    assert "lightning" in _loaded(code)  # the probe ran


def test_a_run_prints_lightnings_messages_once(cli, tmp_path) -> None:
    """Lightning imported lazily or early, its messages reach the user once (on stderr),
    not a second time through Hydra's logging."""
    run_dir = tmp_path / "run"
    overrides = ["callbacks=none", "logger=none", "trainer.max_steps=2"]
    proc = cli([*overrides, f"hydra.run.dir={run_dir}"], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run_dir / "summary.json").is_file()
    assert (proc.stdout + proc.stderr).count("`Trainer.fit` stopped") == 1
