"""Short real runs: real Trainer, real files on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from grokedge.run_files import read_metrics
from grokedge.train import build, compose, fit

FAST = ["trainer.max_steps=40", "task.eval_every=20", "checkpoint.every_n_train_steps=20"]


def run_in_process(tmp_path: Path, overrides: list[str], name: str = "run") -> tuple[Path, dict]:
    run_dir = tmp_path / name
    cfg = compose([*overrides, "logger=none"], run_dir)
    summary = fit(build(cfg, run_dir))
    return run_dir, summary


@pytest.mark.parametrize(
    "overrides",
    [
        ["task=dyck"],
        ["task=modular"],
        [
            "task=scan",
            "model=scan_small",
            "task.datamodule.n_train=64",
            "task.datamodule.n_test=32",
            "task.datamodule.batch_size=16",
        ],
    ],
    ids=["dyck", "modular", "scan"],
)
def test_short_run_writes_its_files(tmp_path: Path, overrides: list[str]) -> None:
    run_dir, summary = run_in_process(tmp_path, [*overrides, *FAST])
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk == summary
    for key in ("grok_step", "steps", "wall_s", "n_params", "test/acc", "train/acc"):
        assert key in on_disk
    # The configured alternatives (conf/task/*.yaml), one key each: threshold/patience.
    assert sorted(on_disk["grok_steps"]) == [
        f"{t}/{p}" for t in ("0.90", "0.95", "0.99") for p in (1, 3)
    ]
    assert on_disk["steps"] == 40 and on_disk["n_params"] > 0
    rows = read_metrics(run_dir)
    evals = [r["step"] for r in rows if "test/acc" in r]
    assert evals == [20, 40]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    if "task=scan" in overrides:
        assert "test/exact_match" in on_disk and "test/seq_acc" in on_disk


def test_resumed_run_logs_what_an_uninterrupted_run_logs(tmp_path: Path) -> None:
    common = [
        "task=dyck",
        "task.eval_every=20",
        "checkpoint.every_n_train_steps=30",
        "task.datamodule.ood_sequences=0",
        # 0.01 is met at the first evaluation (step 20), before the checkpoint at 30: the
        # resumed run evaluates from 40 on, so only the history its checkpoint carries
        # gives it the same grok_steps.
        "task.grok.alternatives.thresholds=[0.01,0.99]",
    ]
    full_dir, full_summary = run_in_process(tmp_path, [*common, "trainer.max_steps=60"], "full")
    part_dir, _ = run_in_process(tmp_path, [*common, "trainer.max_steps=30"], "part")
    ckpt = part_dir / "checkpoints" / "last.ckpt"
    resumed_dir, resumed_summary = run_in_process(
        tmp_path, [*common, "trainer.max_steps=60", f"resume={ckpt}"], "resumed"
    )
    assert full_summary["grok_steps"]["0.01/1"] == full_summary["grok_steps"]["0.01/3"] == 20
    assert resumed_summary["grok_steps"] == full_summary["grok_steps"]

    def evals(run_dir: Path) -> dict[int, float]:
        return {r["step"]: r["test/loss"] for r in read_metrics(run_dir) if "test/loss" in r}

    full, resumed = evals(full_dir), evals(resumed_dir)
    # The resumed directory starts with the part run's rows up to its checkpoint (issue 20).
    assert set(resumed) == set(full) == {20, 40, 60}
    for step in resumed:
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7)


def test_grok_step_and_stop_after_grok(tmp_path: Path) -> None:
    """A low threshold makes a short Dyck run 'grok' early; the run stops 40 steps later."""
    run_dir, summary = run_in_process(
        tmp_path,
        [
            "task=dyck",
            "task.grok.threshold=0.6",
            "trainer.max_steps=400",
            "task.eval_every=20",
            "task.stop_after_grok=40",
            "task.datamodule.ood_sequences=0",
        ],
    )
    rows = read_metrics(run_dir)
    first = next(r["step"] for r in rows if r.get("test/acc", 0) >= 0.6)
    assert summary["grok_step"] == first == summary["grok/step"]
    assert summary["steps"] == first + 40 < 400


def recomputed_grok_step(
    rows: list[dict], metric: str, threshold: float, patience: int
) -> int | None:
    """From metrics.jsonl alone: the first step starting ``patience`` consecutive
    evaluations of ``metric`` at or above ``threshold`` (float32, as the metric is)."""
    evals = [(int(r["step"]), np.float32(r[metric])) for r in rows if metric in r]
    for i in range(len(evals) - patience + 1):
        if all(v >= np.float32(threshold) for _, v in evals[i : i + patience]):
            return evals[i][0]
    return None


def test_grok_steps_agree_with_the_metric_history(tmp_path: Path) -> None:
    """summary.json's grok_steps, recomputed from the test/acc rows of metrics.jsonl; the
    run's own criterion (0.95, patience 1) gives its grok_step."""
    thresholds, patiences = (0.5, 0.9, 0.95), (1, 3)
    run_dir, summary = run_in_process(
        tmp_path,
        [
            "task=dyck",
            "callbacks=none",
            "trainer.max_steps=160",
            "task.eval_every=20",
            "task.datamodule.ood_sequences=0",
            f"task.grok.alternatives.thresholds=[{','.join(map(str, thresholds))}]",
            f"task.grok.alternatives.patiences=[{','.join(map(str, patiences))}]",
        ],
    )
    rows = read_metrics(run_dir)
    expected = {
        f"{t:.2f}/{p}": recomputed_grok_step(rows, "test/acc", t, p)
        for t in thresholds
        for p in patiences
    }
    on_disk = json.loads((run_dir / "summary.json").read_text())["grok_steps"]
    assert on_disk == summary["grok_steps"] == expected
    assert expected["0.50/1"] is not None  # the rule was exercised on a reached threshold
    assert summary["grok_step"] == expected["0.95/1"]


def test_main_job_from_another_directory(cli, tmp_path: Path) -> None:
    """The configs ship inside the package: the CLI works outside the checkout."""
    proc = cli(
        ["task=dyck", "trainer.max_steps=20", "task.eval_every=10", "logger=csv"], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [p.parent for p in tmp_path.glob("outputs/dyck/*/*/summary.json")]
    assert "parameters" in proc.stdout
    assert (run_dir / "csv" / "metrics.csv").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()


def test_multirun_gives_one_directory_and_one_wandb_run_per_job(cli, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = cli(
        [
            "-m",
            "task=dyck",
            "optimizer.weight_decay=0,1",
            "trainer.max_steps=10",
            "task.eval_every=10",
            "task.datamodule.ood_sequences=0",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert summary["steps"] == 10
        offline = list((sweep / job / "wandb").glob("offline-run-*"))
        assert len(offline) == 1, offline
        assert list(offline[0].glob("*.wandb"))
    decays = [
        OmegaConf.load(sweep / j / ".hydra" / "config.yaml").optimizer.weight_decay
        for j in ("0", "1")
    ]
    assert decays == [0, 1]


@pytest.mark.slow
def test_local_parallel_launcher_runs_each_job_with_one_thread(cli, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = cli(
        [
            "-m",
            "hydra/launcher=local",
            "task=dyck",
            "seed=1,2",
            "trainer.max_steps=10",
            "task.eval_every=10",
            "logger=none",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert summary["steps"] == 10
        assert summary["torch_threads"] == 1
