"""A script without ``if __name__ == "__main__":`` never trains twice.

The analyses' worker is a ``spawn`` process, which re-runs the main script's top-level code;
a script that trains at top level would train again inside it. Real scripts in a tmp dir,
run in a subprocess: each appends a line to a file every time its training starts, so a
second training run (in the worker) would show as a second line.

- unguarded, ``background="auto"``: one warning naming the script line and the fix, the
  analyses run on the training thread, the numbers are the guarded run's;
- unguarded, ``background=True``: one ValueError with the fix, before training;
- guarded: the worker is used (rows carry its ``worker_seconds``), no warning;
- the syntax-tree check itself, on lines inside and outside the guard.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from grokedge.analysis.worker import _guarded

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300  # one tiny run with the worker's start-up (imports) on a busy machine
NEEDS_IDLE_CORE = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2,
    reason="background='auto' uses the worker only where a core is idle (needs >= 2 cores)",
)

BODY = """
torch.set_num_threads(1)
with open(COUNT, "a") as f:
    f.write("train\\n")
L.seed_everything(0)
net = CausalTransformer(vocab_size=3, num_classes=13, max_len=24)
dm = DyckDataModule(ood_sequences=0, n_sequences=1050)
module = GrokModule(net, functools.partial(torch.optim.AdamW, lr=1e-3),
                    eval_names=dm.eval_names)
ablation = AblationCallback(every=None, at_end=True, n_random=2, n_sequences=20,
                            background=BACKGROUND)
trainer = L.Trainer(max_steps=12, callbacks=[GramCallback(interval=2), ablation],
                    logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=RUN,
                    num_sanity_val_steps=0, check_val_every_n_epoch=None,
                    val_check_interval=6)
trainer.fit(module, datamodule=dm)
print("IN_BACKGROUND", ablation.in_background)
"""

HEAD = """
import functools
import lightning as L
import torch
from grokedge.callbacks import AblationCallback, GramCallback
from grokedge.models import CausalTransformer
from grokedge.module import GrokModule
from grokedge.tasks.dyck import DyckDataModule

COUNT = {count!r}
RUN = {run!r}
BACKGROUND = {background!r}
"""


def _script(tmp: Path, guarded: bool, background: bool | str) -> Path:
    head = HEAD.format(count=str(tmp / "count.txt"), run=str(tmp / "run"), background=background)
    if guarded:
        body = 'if __name__ == "__main__":\n' + textwrap.indent(BODY, "    ")
    else:
        body = BODY
    path = tmp / "user_script.py"
    path.write_text(head + body)
    return path


def _run(tmp: Path, guarded: bool, background: bool | str) -> subprocess.CompletedProcess:
    script = _script(tmp, guarded, background)
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp,
        env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def _trainings(tmp: Path) -> int:
    return (tmp / "count.txt").read_text().count("train")


def _ablation_rows(tmp: Path) -> list[dict]:
    rows = [json.loads(line) for line in (tmp / "run" / "analyses.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("analysis") == "ablation"]


def _numbers(row: dict) -> dict:
    """The row's measurements, without timing fields (which differ run to run)."""
    return {k: v for k, v in row.items() if "seconds" not in k}


@pytest.mark.slow
@NEEDS_IDLE_CORE
def test_unguarded_script_warns_once_and_trains_once_with_the_guarded_numbers(
    tmp_path: Path,
) -> None:
    bare, guarded = tmp_path / "bare", tmp_path / "guarded"
    bare.mkdir()
    guarded.mkdir()
    done = _run(bare, guarded=False, background="auto")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _trainings(bare) == 1
    script = bare / "user_script.py"
    line = next(
        i + 1
        for i, text in enumerate(script.read_text().splitlines())
        if text.startswith("trainer.fit(")
    )
    warning = (
        f"the script {script} starts training at line {line}, outside an "
        '`if __name__ == "__main__":` block'
    )
    assert done.stderr.count(warning) == 1, done.stderr[-3000:]
    assert 'Fix: put the training code under `if __name__ == "__main__":`' in done.stderr
    assert "IN_BACKGROUND False" in done.stdout
    assert "BrokenProcessPool" not in done.stderr

    ok = _run(guarded, guarded=True, background="auto")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert _trainings(guarded) == 1
    assert "IN_BACKGROUND True" in ok.stdout
    assert "starts training at line" not in ok.stderr
    rows_bare, rows_guarded = _ablation_rows(bare), _ablation_rows(guarded)
    assert rows_guarded and all("worker_seconds" in r for r in rows_guarded)
    assert all("worker_seconds" not in r for r in rows_bare)
    assert [_numbers(r) | {"worker_seconds": None} for r in rows_bare] == [
        _numbers(r) | {"worker_seconds": None} for r in rows_guarded
    ]


@pytest.mark.slow
@NEEDS_IDLE_CORE
def test_unguarded_script_asking_for_the_worker_fails_before_training(tmp_path: Path) -> None:
    done = _run(tmp_path, guarded=False, background=True)
    assert done.returncode != 0
    assert _trainings(tmp_path) == 1
    assert "ValueError: AblationCallback(background=True) needs a worker process" in done.stderr
    assert 'Fix: put the training code under `if __name__ == "__main__":`' in done.stderr
    assert not (tmp_path / "run" / "analyses.jsonl").exists() or not _ablation_rows(tmp_path)


SOURCE = """\
import x
a = 1
fit()
if __name__ == "__main__":
    fit()
    if a:
        fit()
else:
    fit()
if "__main__" != __name__:
    fit()
else:
    fit()
def f():
    if __name__ == "__main__":
        fit()
"""


def test_guard_check_reads_the_main_only_branches() -> None:
    tree = ast.parse(SOURCE)
    lines = SOURCE.splitlines()
    expected = {5: True, 7: True, 9: False, 11: False, 13: True, 3: False, 16: False}
    for line, guarded in expected.items():
        assert "fit()" in lines[line - 1]
        assert _guarded(tree, line) is guarded, line


def test_interactive_and_dash_c_sessions_have_no_main_file_to_check(tmp_path: Path) -> None:
    code = "from grokedge.analysis.worker import unguarded_main_line as u; print('RESULT', u())"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert done.returncode == 0, done.stderr
    assert "RESULT None" in done.stdout
    # A script: the top-level call is found (with its line), the guarded one is not.
    script = tmp_path / "probe_main.py"
    script.write_text(
        "from grokedge.analysis.worker import unguarded_main_line as u\n"
        "print('TOP', u())\n"
        'if __name__ == "__main__":\n'
        "    print('GUARDED', u())\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert done.returncode == 0, done.stderr
    assert f"TOP {script}, line 2" in done.stdout
    assert "GUARDED None" in done.stdout
