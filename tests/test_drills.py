"""Failure drills (issue 6): what real clusters do to runs, each with real Trainers and files.

- resume equivalence of the full stack (callbacks=full) after a crash mid-interval;
- determinism: two CPU runs with the same seed;
- a non-finite update or loss injected mid-run: skipped, counted, the window intact;
- a sweep in which jobs fail: the others finish, each its own W&B run, failures recorded;
- bad output directory / checkpoint paths: one message, exit 2, nothing written.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from grokedge.analysis_log import read_analyses
from grokedge.callbacks.gram import GramCallback, find_gram_callback
from grokedge.functional import analysed_module
from grokedge.run_files import NonFiniteLossError, read_metrics, read_summary
from grokedge.spectral.window import F32_BLOCK
from grokedge.train import Run, build, compose, fit

TESTS = Path(__file__).resolve().parent

# One torch thread: the analyses' BLAS calls oversubscribe a shared 2-core machine badly.
SMALL = [
    "task=dyck",
    "logger=none",
    "torch_threads=1",
    "task.datamodule.ood_sequences=0",
    "task.datamodule.n_sequences=300",  # 50 train / 250 test: evaluations stay cheap
    "task.eval_every=10",
    "task.gram_interval=10",
]


class CrashAt(L.Callback):
    """Raise at the end of optimizer step ``at_step`` (a job that crashes mid-run)."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.global_step == self.at_step:
            raise RuntimeError(f"drill crash at step {self.at_step}")


class ThetaRecorder(L.Callback):
    """θ_sel (flat, the GramCallback's layout) at step 0 and every ``every`` steps."""

    def __init__(self, gram: GramCallback, every: int) -> None:
        self.gram, self.every = gram, every
        self.theta: dict[int, torch.Tensor] = {}

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.gram.selector is not None
        named = self.gram.selector.named(analysed_module(pl_module))
        self.theta[trainer.global_step] = torch.cat([p.detach().flatten() for _, p in named])

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, *args: Any, **kw: Any) -> None:
        if trainer.global_step % self.every == 0:
            self._record(trainer, pl_module)


def _build(tmp_path: Path, overrides: list[str], name: str) -> Run:
    run_dir = tmp_path / name
    return build(compose(overrides, run_dir), run_dir)


def _rows_after(rows: list[dict], step: int) -> list[dict]:
    return [r for r in rows if r["step"] > step]


WALL_TIME_FIELDS = ("seconds", "worker_seconds")


def _untimed(rows: list[dict]) -> list[dict]:
    """``rows`` without their wall-time fields (``seconds``, ``worker_seconds``: at any
    depth)."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in WALL_TIME_FIELDS}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return [strip(r) for r in rows]


def assert_continues(full: list[dict], resumed: list[dict], after: int = 45) -> None:
    """``resumed`` is the tail of ``full`` that follows the checkpoint at step ``after``:
    every row of ``full`` past ``after``, and the rows at ``after`` that were written after
    the checkpoint was saved (e.g. the loss of the next batch), identical in order and value."""
    assert resumed, "the resumed run wrote nothing"
    assert resumed[0]["step"] >= after and len(resumed) >= len(_rows_after(full, after))
    assert resumed == full[len(full) - len(resumed) :]


def assert_window_is_brute_force(gram: GramCallback, expected: list[torch.Tensor]) -> None:
    """The window holds exactly ``expected`` (chronological) and G = X Xᵀ of them."""
    assert gram.window is not None
    deltas = gram.window.deltas()
    assert deltas.shape[0] == len(expected)
    assert torch.equal(deltas, torch.stack(expected).to(deltas.dtype))
    x = torch.stack(expected).to(deltas.dtype).double()
    # float32 buffers: float32 products per block of b columns summed in float64, within
    # b·u·Σ|x_i y_i| of the float64 Gram (grokedge.spectral.window); float64: exact.
    u = torch.finfo(deltas.dtype).eps / 2
    bound = min(deltas.shape[1], F32_BLOCK) * u * (x.abs() @ x.abs().T)
    assert ((gram.window.gram() - x @ x.T).abs() <= bound).all()
    assert torch.isfinite(gram.window.wd_deltas()).all()


# ----------------------------------------------------------------- resume equivalence

FULL = [
    *SMALL,
    "callbacks=full",
    "task.grok.threshold=0.3",  # "groks" at the first evaluation: the at-grok analyses run
    "callbacks.gram.window=3",
    "callbacks.ablation.every=20",
    "callbacks.ablation.n_sequences=20",
    "callbacks.ablation.n_random=2",
    "callbacks.perturbation.every=30",
    "callbacks.perturbation.n_sequences=20",
    "callbacks.perturbation.grid_points=3",
    "callbacks.perturbation.n_directions=2",
    "callbacks.probe.every=30",
    "callbacks.probe.kinds=[linear]",
    "callbacks.probe.n_sequences=30",
    "callbacks.probe.folds=2",
    "callbacks.wd_removal.at_step=25",
    "callbacks.wd_removal.every=10",
    "callbacks.wd_removal.n_sequences=30",
    "callbacks.wd_removal.folds=2",
    "checkpoint.every_n_train_steps=15",  # saves at 15, 30, 45: mid-interval (N = 10)
    "trainer.log_every_n_steps=25",  # batch-loss rows at 0, 25, 50 (one after the resume)
    "trainer.max_steps=70",
]
CRASH_STEP, CKPT_STEP = 52, 45


@pytest.mark.slow
def test_full_stack_resumed_after_a_crash_writes_what_an_uninterrupted_run_writes(
    tmp_path: Path,
) -> None:
    """Crash at step 52 (mid-interval, after the checkpoint at 45, also mid-interval),
    resume from last.ckpt: every metric row and every analyses.jsonl row after step 45 is
    identical (exact equality: same float bits) to those of a run that never crashed."""
    full = _build(tmp_path, FULL, "full")
    fit(full)

    crashed = _build(tmp_path, FULL, "crashed")
    crashed.trainer.callbacks.append(CrashAt(CRASH_STEP))
    with pytest.raises(RuntimeError, match=f"drill crash at step {CRASH_STEP}"):
        fit(crashed)
    summary = read_summary(crashed.run_dir)
    assert summary["status"] == "failed" and summary["steps"] == CRASH_STEP
    assert summary["error"] == f"RuntimeError: drill crash at step {CRASH_STEP}"
    ckpt = crashed.run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == CKPT_STEP

    resumed = _build(tmp_path, [*FULL, f"resume={ckpt}"], "resumed")
    fit(resumed)
    assert read_summary(resumed.run_dir)["status"] == "ok"

    full_metrics = read_metrics(full.run_dir)
    # Before the crash the crashed run is the full run (same trajectory, same analyses).
    crashed_metrics = read_metrics(crashed.run_dir)
    # (a prefix: the rows of the batch in flight when it raised are lost with it).
    assert crashed_metrics == full_metrics[: len(crashed_metrics)]
    assert crashed_metrics[-1]["step"] >= CRASH_STEP - 2
    resumed_metrics = read_metrics(resumed.run_dir)
    # A resumed fit logs GramCallback's predicted buffer size once, at step 0 (a constant).
    assert resumed_metrics[0] == next(r for r in full_metrics if "gram/predicted_bytes" in r)
    assert_continues(full_metrics, resumed_metrics[1:])
    # The batch loss is stamped with the step of the weights it was computed at.
    loss_steps = [r["step"] for r in full_metrics if "train/batch_loss" in r]
    assert loss_steps == [0, 25, 50], loss_steps
    assert [r["step"] for r in resumed_metrics if "train/batch_loss" in r] == [50]

    full_rows = read_analyses(full.run_dir)
    resumed_rows = read_analyses(resumed.run_dir)
    kinds = {r["analysis"] for r in _rows_after(full_rows, CKPT_STEP)}
    # Every analysis of callbacks=full ran after the resume point.
    assert {"gram_spectrum", "ablation", "perturbation", "probe", "wd_removal"} <= kinds, kinds
    # Rows record how long their analysis took ("seconds"): wall time, not a result.
    assert_continues(_untimed(full_rows), _untimed(resumed_rows))


# ------------------------------------------------------------------------ determinism


def test_two_cpu_runs_with_the_same_seed_log_identical_metrics(tmp_path: Path) -> None:
    overrides = [*SMALL, "callbacks=gram", "callbacks.gram.window=3", "trainer.max_steps=40"]
    first = _build(tmp_path, overrides, "a")
    second = _build(tmp_path, overrides, "b")
    fit(first)
    fit(second)
    rows = read_metrics(first.run_dir)
    assert any("gram/sigma_1" in r for r in rows) and any("test/acc" in r for r in rows)
    assert rows == read_metrics(second.run_dir)  # exact: every float bit
    third = _build(tmp_path, [*overrides, "seed=43"], "c")
    fit(third)
    assert read_metrics(third.run_dir) != rows  # the seed matters: the check can fail


# -------------------------------------------------------------------------- non-finite


class PoisonWeightDecay(L.Callback):
    """Write NaN into GramCallback's WD accumulator at step ``at_step`` (mid-interval):
    a non-finite update part that leaves training itself untouched."""

    def __init__(self, gram: GramCallback, at_step: int) -> None:
        self.gram, self.at_step = gram, at_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.global_step == self.at_step:
            assert self.gram.tracker is not None
            self.gram.tracker.accumulated[0] = math.nan


def test_a_non_finite_update_is_skipped_counted_and_the_window_stays_exact(
    tmp_path: Path,
) -> None:
    run = _build(tmp_path, [*SMALL, "callbacks=gram", "trainer.max_steps=60"], "run")
    gram = find_gram_callback(run.trainer)
    assert gram is not None and gram.window_size == 5
    recorder = ThetaRecorder(gram, every=10)
    run.trainer.callbacks[:0] = [PoisonWeightDecay(gram, at_step=15), recorder]
    with pytest.warns(RuntimeWarning, match="non-finite update delta at step 20 skipped"):
        summary = fit(run)
    assert summary["status"] == "ok" and summary["steps"] == 60  # the run went on
    assert gram.skipped_deltas == 1
    rows = read_metrics(run.run_dir)
    skipped = {r["step"]: r["gram/skipped_deltas"] for r in rows if "gram/skipped_deltas" in r}
    assert skipped[10] == 0 and skipped[20] == 1 and skipped[60] == 1
    theta = recorder.theta
    # The delta closed at 20 is dropped; the next one starts from θ_20.
    kept = [(0, 10), (20, 30), (30, 40), (40, 50), (50, 60)]
    assert_window_is_brute_force(gram, [theta[b] - theta[a] for a, b in kept])


def _poison_loss_at(step: int) -> L.Callback:
    """Set a LayerNorm gain to NaN just before optimizer step ``step``: its loss is NaN."""

    class PoisonLoss(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, pl_module, *a: Any) -> None:
            if trainer.global_step == step - 1:
                norms = [p for n, p in pl_module.named_parameters() if "norm" in n]
                with torch.no_grad():
                    norms[-1].fill_(math.nan)

    return PoisonLoss()


def test_a_nan_loss_stops_the_run_with_a_message_naming_the_step(tmp_path: Path) -> None:
    run = _build(tmp_path, [*SMALL, "callbacks=gram", "trainer.max_steps=60"], "run")
    gram = find_gram_callback(run.trainer)
    recorder = ThetaRecorder(gram, every=10)
    run.trainer.callbacks[:0] = [_poison_loss_at(15), recorder]
    with pytest.raises(NonFiniteLossError, match="non-finite training loss at step 15"):
        fit(run)
    summary = read_summary(run.run_dir)
    assert summary["status"] == "failed" and summary["steps"] == 15
    assert summary["error"].startswith("NonFiniteLossError: non-finite training loss at step 15")
    assert gram.skipped_deltas == 0
    assert_window_is_brute_force(gram, [recorder.theta[10] - recorder.theta[0]])


def test_a_nan_loss_with_action_warn_trains_on_and_skips_every_later_delta(
    tmp_path: Path,
) -> None:
    overrides = [*SMALL, "callbacks=gram", "trainer.max_steps=40", "nonfinite.action=warn"]
    run = _build(tmp_path, overrides, "run")
    gram = find_gram_callback(run.trainer)
    recorder = ThetaRecorder(gram, every=10)
    run.trainer.callbacks[:0] = [_poison_loss_at(15), recorder]
    with pytest.warns(UserWarning, match="non-finite training loss at step 15"):
        summary = fit(run)
    assert summary["status"] == "ok" and summary["steps"] == 40
    assert gram.skipped_deltas == 3  # the deltas closed at 20, 30 and 40 are NaN
    assert not torch.isfinite(recorder.theta[40]).all()  # the weights are poisoned...
    assert_window_is_brute_force(gram, [recorder.theta[10] - recorder.theta[0]])  # ...not it


# ----------------------------------------------------------------- a sweep with failures

SWEEP_SMALL = [o for o in SMALL if o != "logger=none"]
CRASH = "+callbacks.crash._target_=test_drills.CrashAt"


def _jobs(sweep: Path) -> dict[str, Path]:
    """Job directory by its overrides (``.hydra/overrides.yaml``), e.g. "at_step=5,lr=-1"."""
    jobs = {}
    for overrides in sweep.glob("*/.hydra/overrides.yaml"):
        values = OmegaConf.load(overrides)
        picked = [o.split("=", 1) for o in values if "at_step=" in o or "optimizer.lr=" in o]
        key = ",".join(f"{name.split('.')[-1]}={value}" for name, value in picked)
        jobs[key] = overrides.parent.parent
    return jobs


def _sweep_env() -> dict[str, str]:
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": path}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "local"])
def test_a_sweep_with_failing_jobs_finishes_the_others_and_exits_non_zero(
    cli, tmp_path: Path, launcher: str
) -> None:
    """Four jobs: one crashes while training, two have a bad value (lr=-1), one is fine.

    The basic launcher runs them one after the other in this process (the crash is the
    first job), joblib (``hydra/launcher=local``) in two worker processes."""
    sweep = tmp_path / "sweep"
    proc = cli(
        [
            "-m",
            *SWEEP_SMALL,
            "trainer.max_steps=10",
            CRASH,
            "+callbacks.crash.at_step=5,1000",
            "optimizer.lr=0.001,-1",
            f"hydra.sweep.dir={sweep}",
            *(["hydra/launcher=local"] if launcher == "local" else []),
        ],
        cwd=tmp_path,
        env=_sweep_env(),
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "3 sweep job(s) failed" in proc.stderr, proc.stderr[-3000:]
    jobs = _jobs(sweep)
    assert set(jobs) == {"at_step=5,lr=0.001", "at_step=5,lr=-1", "at_step=1000,lr=0.001",
                         "at_step=1000,lr=-1"}, jobs  # fmt: skip
    summaries = {k: json.loads((d / "summary.json").read_text()) for k, d in jobs.items()}
    ok = summaries["at_step=1000,lr=0.001"]
    assert ok["status"] == "ok" and ok["steps"] == 10 and "error" not in ok
    crashed = summaries["at_step=5,lr=0.001"]
    assert crashed["status"] == "failed" and crashed["steps"] == 5
    assert crashed["error"] == "RuntimeError: drill crash at step 5"
    for key in ("at_step=5,lr=-1", "at_step=1000,lr=-1"):
        bad = summaries[key]
        assert bad["status"] == "failed" and bad["steps"] == 0
        assert bad["error"].startswith("ConfigError: optimizer.lr=-1 is not allowed")
        assert not list((jobs[key] / "wandb").glob("offline-run-*"))  # never started
    for key in ("at_step=1000,lr=0.001", "at_step=5,lr=0.001"):
        (offline,) = list((jobs[key] / "wandb").glob("offline-run-*"))  # one W&B run each
        assert list(offline.glob("*.wandb"))


@pytest.mark.slow
def test_a_single_run_that_crashes_exits_non_zero_and_records_the_failure(
    cli, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    proc = cli(
        [
            *SMALL,
            "trainer.max_steps=10",
            CRASH,
            "+callbacks.crash.at_step=5",
            f"hydra.run.dir={run_dir}",
        ],  # fmt: skip
        cwd=tmp_path,
        env=_sweep_env(),
    )
    assert proc.returncode == 1
    assert "drill crash at step 5" in proc.stderr
    summary = read_summary(run_dir)
    assert summary["status"] == "failed" and summary["steps"] == 5
    assert summary["error"] == "RuntimeError: drill crash at step 5"


# ------------------------------------------------------- refused before anything starts


@pytest.fixture(scope="module")
def dyck_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """last.ckpt of a 10-step Dyck run."""
    tmp = tmp_path_factory.mktemp("dyck_ckpt")
    run = _build(tmp, [*SMALL, "callbacks=none", "trainer.max_steps=10"], "run")
    fit(run)
    return run.run_dir / "checkpoints" / "last.ckpt"


REFUSED = {
    "run dir under a file": (["hydra.run.dir={file}/run"], ["hydra.run.dir=", "not a directory"]),
    "sweep dir under a file": (
        ["-m", "seed=1,2", "hydra.sweep.dir={file}/sweep"],
        ["hydra.sweep.dir=", "not a directory"],
    ),
    "missing resume": (["resume={tmp}/nope.ckpt"], ["resume=", "nope.ckpt", "no such file"]),
    "missing init_from": (
        ["init_from={tmp}/nope.ckpt"],
        ["init_from=", "nope.ckpt", "no such file"],
    ),
    "not a checkpoint": (["resume={file}"], ["resume=", "cannot be read as a checkpoint"]),
    "resume from another task": (
        ["task=modular", "resume={ckpt}"],
        ["resume=", "task=dyck", "task=modular"],
    ),
    "init_from another task": (
        ["task=modular", "init_from={ckpt}"],
        ["init_from=", "does not fit the model"],
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_paths_are_refused_before_anything_is_written(
    cli, tmp_path: Path, dyck_checkpoint: Path, case: str
) -> None:
    overrides, needles = REFUSED[case]
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory, not a checkpoint\n")
    run_dir = tmp_path / "run"
    fill = {"file": blocker, "tmp": tmp_path, "ckpt": dyck_checkpoint}
    args = [o.format(**fill) for o in overrides]
    if not any(a.startswith(("hydra.run.dir", "hydra.sweep.dir")) for a in args):
        args.append(f"hydra.run.dir={run_dir}")
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = cli([*args, "trainer.max_steps=5", "logger=none"], cwd=tmp_path, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run directory
