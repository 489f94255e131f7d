"""Failure drills (issue 6): what real clusters do to runs, each with real Trainers and files.

- resume equivalence of the full stack (callbacks=full) after a crash mid-interval, and after
  a SIGKILL with an analysis in flight in the worker (a single run, and a sweep job resumed
  in place): the resumed directory is the whole run (issue 20);
- determinism: two CPU runs with the same seed;
- a non-finite update or loss injected mid-run: skipped, counted, the window intact;
- a sweep in which jobs fail: the others finish, each its own W&B run, failures recorded;
- bad output directory / checkpoint paths: one message, exit 2, nothing written.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from grokedge.analysis_log import read_analyses
from grokedge.callbacks.gram import GramCallback, find_gram_callback
from grokedge.edge.row_dots import F32_BLOCK
from grokedge.functional import analysed_module
from grokedge.run_files import NonFiniteLossError, read_metrics, read_summary
from grokedge.train import Run, build, compose, fit
from tests.conftest import run_cli

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


class KillAt(L.Callback):
    """SIGKILL this process at the end of optimizer step ``at_step``: no exception, no
    ``finally``, no summary; the files hold what was flushed (a job killed by a cluster)."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), signal.SIGKILL)


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


SUMMARY_TIMING_FIELDS = ("wall_s",)
"""summary.json fields a resumed run cannot share with an uninterrupted one: the process's
wall time; ``resumed_from`` (where its rows up to the checkpoint came from) is compared
on its own."""


def assert_same_run_files(full: Path, resumed: Path, kill_step: int, ckpt_step: int) -> None:
    """``resumed`` (a run directory resumed from a checkpoint at ``ckpt_step`` of a run
    stopped at ``kill_step``) holds what the uninterrupted ``full`` holds: every row of
    metrics.jsonl (exact: every float bit), every row of analyses.jsonl but for its wall
    times (:func:`_untimed`), in the same order, and summary.json but for
    :data:`SUMMARY_TIMING_FIELDS` and ``resumed_from``."""
    full_metrics, resumed_metrics = read_metrics(full), read_metrics(resumed)
    # The check can fail: the uninterrupted run has rows on both sides of the checkpoint
    # (the resumed run alone would start at it), and past the stop.
    steps = [r["step"] for r in full_metrics]
    assert min(steps) < ckpt_step < kill_step < max(steps)
    assert resumed_metrics == full_metrics
    full_rows, resumed_rows = read_analyses(full), read_analyses(resumed)
    row_steps = [r["step"] for r in full_rows]
    assert min(row_steps) < ckpt_step < kill_step < max(row_steps)
    assert _untimed(resumed_rows) == _untimed(full_rows)
    expected, got = read_summary(full), read_summary(resumed)
    assert got["status"] == expected["status"] == "ok"
    for key in SUMMARY_TIMING_FIELDS:
        assert isinstance(got.pop(key), float) and isinstance(expected.pop(key), float)
    assert got.pop("resumed_from")[-1]["step"] == ckpt_step
    assert got == expected
    # Every analysis scalar of the run is there (the issue: 51 of 66 were missing).
    analysis_keys = [k for k in expected if k.split("/")[0] in ANALYSIS_SCALARS]
    assert {k.split("/")[0] for k in analysis_keys} >= ANALYSIS_SCALARS, analysis_keys


ANALYSIS_SCALARS = {"ablation", "perturb", "curvature", "probe", "wd", "gram", "edge"}
"""Prefixes of the scalars callbacks=full logs (with the cadences of the drills below)."""


def assert_window_is_brute_force(gram: GramCallback, expected: list[torch.Tensor]) -> None:
    """The window holds exactly ``expected`` (chronological) and G = X Xᵀ of them."""
    assert gram.window is not None
    deltas = gram.window.deltas()
    assert deltas.shape[0] == len(expected)
    assert torch.equal(deltas, torch.stack(expected).to(deltas.dtype))
    x = torch.stack(expected).to(deltas.dtype).double()
    # float32 buffers: float32 products per block of b columns summed in float64, within
    # b·u·Σ|x_i y_i| of the float64 Gram (grokedge.edge.window); float64: exact.
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
    resume from last.ckpt into a new directory: it holds every metric row and every
    analyses.jsonl row of a run that never crashed (exact equality: same float bits), and
    its summary; the crashed directory's summary says it was interrupted, and by whom."""
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

    full_metrics = read_metrics(full.run_dir)
    # Before the crash the crashed run is the full run (same trajectory, same analyses).
    crashed_metrics = read_metrics(crashed.run_dir)
    # (a prefix: the rows of the batch in flight when it raised are lost with it).
    assert crashed_metrics == full_metrics[: len(crashed_metrics)]
    assert crashed_metrics[-1]["step"] >= CRASH_STEP - 2
    # The batch loss is stamped with the step of the weights it was computed at.
    loss_steps = [r["step"] for r in full_metrics if "train/batch_loss" in r]
    assert loss_steps == [0, 25, 50], loss_steps
    kinds = {r["analysis"] for r in _rows_after(read_analyses(full.run_dir), CKPT_STEP)}
    # Every analysis of callbacks=full ran after the resume point.
    assert {"gram_spectrum", "ablation", "perturbation", "probe", "wd_removal"} <= kinds, kinds
    assert_same_run_files(full.run_dir, resumed.run_dir, CRASH_STEP, CKPT_STEP)

    interrupted = read_summary(crashed.run_dir)
    assert interrupted["status"] == "interrupted"
    assert interrupted["resumed_by"] == [str(resumed.run_dir.resolve())]
    assert interrupted["resumed_at_step"] == CKPT_STEP
    assert interrupted["error"] == f"RuntimeError: drill crash at step {CRASH_STEP}"  # kept


# --------------------------------------------------------- SIGKILL, worker in flight

KILL_STEP, KILL_CKPT_STEP = 56, 40
KILLED = [
    *SMALL,
    "progress_bar.refresh_rate=0",
    "callbacks=full",
    "task.grok.threshold=0.3",  # "groks" at the first evaluation: the at-grok analyses run
    "callbacks.gram.window=3",
    "callbacks.ablation.every=20",  # 20, 40 (in the worker when the checkpoint is saved), 60
    "callbacks.ablation.n_sequences=20",
    "callbacks.ablation.n_random=2",
    "callbacks.perturbation.every=28",  # 28 (collected at the checkpoint), 56: in flight
    "callbacks.perturbation.background_steps=100",  # ... at the kill: written at the end
    "callbacks.perturbation.n_sequences=20",
    "callbacks.perturbation.grid_points=3",
    "callbacks.perturbation.n_directions=2",
    "callbacks.probe.every=25",  # 25, 50: written at 55, between the checkpoint and the kill
    "callbacks.probe.background_steps=5",
    "callbacks.probe.kinds=[linear]",
    "callbacks.probe.n_sequences=30",
    "callbacks.probe.folds=2",
    "callbacks.gap_flow.every=20",
    "callbacks.wd_removal.at_step=25",
    "callbacks.wd_removal.every=10",
    "callbacks.wd_removal.n_sequences=30",
    "callbacks.wd_removal.folds=2",
    # The user's case: the checkpoint at an evaluation step that closes a Gram window.
    f"checkpoint.every_n_train_steps={KILL_CKPT_STEP}",
    "trainer.log_every_n_steps=25",
    "trainer.max_steps=70",
]
KILL = ["+callbacks.kill._target_=test_drills.KillAt", f"+callbacks.kill.at_step={KILL_STEP}"]


def _kill_env() -> dict[str, str]:
    """Tests on PYTHONPATH (test_drills.KillAt) and the analyses forced into the worker
    (on a 2-core machine "auto" would use it too; elsewhere it might not)."""
    return {"PYTHONPATH": _test_path(), "GROKEDGE_BACKGROUND": "true"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of the drills' configuration, trained without interruption."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = run_cli([*KILLED, f"hydra.run.dir={run_dir}"], run_dir.parent, env=_kill_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def _killed(cli, cwd: Path, args: list[str], multirun: bool = False) -> None:
    """Run ``args`` (with :data:`KILL`) and check that it died of SIGKILL."""
    flags = ["-m"] if multirun else []
    proc = cli([*flags, *KILLED, *KILL, *args], cwd, env=_kill_env(), timeout=600)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])


def _assert_killed_after_checkpoint(run_dir: Path) -> Path:
    """The killed directory: no summary, rows written after its checkpoint (which the
    resumed run must drop), the probe of step 50 among them and the perturbation of step
    56 not yet (in the worker at the kill). Returns the checkpoint."""
    assert not (run_dir / "summary.json").exists()
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    stamp = torch.load(ckpt, weights_only=True)
    assert stamp["global_step"] == KILL_CKPT_STEP
    lines = stamp["grokedge"]["lines"]
    assert len(read_metrics(run_dir)) > lines["metrics.jsonl"] > 0
    rows = read_analyses(run_dir)
    assert len(rows) > lines["analyses.jsonl"] > 0
    after = rows[lines["analyses.jsonl"] :]
    assert any(r["analysis"] == "probe" and r["step"] == 50 for r in after)
    assert not any(r["analysis"] == "perturbation" and r["step"] == KILL_STEP for r in rows)
    return ckpt


def _assert_each_call_once(run_dir: Path) -> None:
    """The worker's calls around the checkpoint and the kill are each recorded once, and
    were run in the worker (``worker_seconds``)."""
    rows = read_analyses(run_dir)
    for analysis, step in (("ablation", 40), ("perturbation", 28), ("probe", 50),
                           ("perturbation", KILL_STEP)):  # fmt: skip
        found = [r for r in rows if r["analysis"] == analysis and r["step"] == step]
        assert len(found) == 1, (analysis, step, len(found))
        assert "worker_seconds" in found[0], (analysis, step)


@pytest.mark.slow
def test_a_run_sigkilled_with_an_analysis_in_flight_resumes_into_a_whole_directory(
    cli, tmp_path: Path, uninterrupted: Path
) -> None:
    """SIGKILL at step 56 (checkpoint at 40, with the worker's ablation of step 40
    collected into it; the probe of 50 written after it; the perturbation of 56 in the
    worker), resumed as the README says (``resume=<run_dir>/checkpoints/last.ckpt``, a new
    run directory): the new directory is the uninterrupted run's, row for row; the killed
    one gets an "interrupted" summary naming it."""
    killed = tmp_path / "killed"
    _killed(cli, tmp_path, [f"hydra.run.dir={killed}"])
    ckpt = _assert_killed_after_checkpoint(killed)

    resumed = tmp_path / "resumed"
    proc = cli([*KILLED, f"resume={ckpt}", f"hydra.run.dir={resumed}"], tmp_path,
               env=_kill_env())  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RuntimeWarning" not in proc.stderr  # nothing was missing
    _assert_each_call_once(resumed)
    assert_same_run_files(uninterrupted, resumed, KILL_STEP, KILL_CKPT_STEP)
    assert read_summary(resumed)["resumed_from"] == [
        {"run_dir": str(killed.resolve()), "checkpoint": str(ckpt.resolve()), "step": 40}
    ]
    summary = read_summary(killed)
    assert summary["status"] == "interrupted" and summary["task"] == "dyck"
    assert summary["resumed_by"] == [str(resumed.resolve())]
    assert summary["resumed_at_step"] == KILL_CKPT_STEP
    assert str(resumed.resolve()) in summary["reason"]


@pytest.mark.slow
def test_a_sigkilled_sweep_job_resumed_in_place_is_whole(
    cli, tmp_path: Path, uninterrupted: Path
) -> None:
    """A sweep job (``-m``) SIGKILLed after its checkpoint, resumed as one job of the same
    sweep directory with ``resume=`` (its files cut back to the checkpoint, then continued):
    the job's directory is the uninterrupted run's, and the sweep exits 0."""
    sweep = tmp_path / "sweep"
    _killed(cli, tmp_path, [f"hydra.sweep.dir={sweep}"], multirun=True)
    job = sweep / "0"
    ckpt = _assert_killed_after_checkpoint(job)

    proc = cli(["-m", *KILLED, f"resume={ckpt}", f"hydra.sweep.dir={sweep}"], tmp_path,
               env=_kill_env())  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0"]
    _assert_each_call_once(job)
    assert_same_run_files(uninterrupted, job, KILL_STEP, KILL_CKPT_STEP)


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


def _test_path() -> str:
    """PYTHONPATH for a run that instantiates ``test_drills.<Callback>`` (this module
    imports ``tests.conftest``: the repository root too)."""
    return os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])


def _sweep_env() -> dict[str, str]:
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": _test_path()}


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
