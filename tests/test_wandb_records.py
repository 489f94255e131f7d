"""A real offline W&B run, read back from its ``.wandb`` file: what a synced project shows.

The dashboard needs (issue 5): every metric prefix declared with ``trainer/global_step``
as its x-axis, that step logged in every history row, the headline summary values
(``grok/step``), and sweep jobs grouped so that seeds of one configuration aggregate.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from grokedge.reporting.wandb_records import history_of, iter_records, summary_of
from grokedge.train import build, compose, fit
from grokedge.wandb_setup import non_seed_overrides, wandb_init_kwargs

# docs/design.md, "Metric names": the prefixes W&B must lay out as panel sections. Written
# out here (not imported) so that dropping one from the module fails this test.
DESIGN_PREFIXES = (
    "train",
    "test",
    "grok",
    "gram",
    "edge",
    "ablation",
    "perturb",
    "curvature",
    "probe",
    "wd",
    "gapflow",
    "class",
    "decouple",
)


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 200-step Dyck run with callbacks=gram and the class callback, logged offline to W&B.

    The grok threshold is lowered to 0.5 so that the run groks within 200 steps (test
    accuracy passes 0.5 by the first evaluation) and ``grok/step`` has a value.
    """
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")  # conftest disables W&B; this test needs it on
    mp.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path_factory.mktemp("wandb_run")
    threads = torch.get_num_threads()
    try:
        cfg = compose(
            [
                "task=dyck",
                "callbacks=gram",
                "+callbacks@callbacks.classes=classes",  # the class names -> W&B summary
                "callbacks.classes.n_sequences=40",
                "logger=wandb",
                "trainer.max_steps=200",
                "task.gram_interval=50",
                "task.eval_every=50",
                "task.eval_cadence.ood=1000",
                "task.grok.threshold=0.5",
                "progress_bar.refresh_rate=0",
                "torch_threads=1",
            ],
            run_dir,
        )
        fit(build(cfg, run_dir))
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    return run_dir


def _wandb_file(run_dir: Path) -> Path:
    (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
    (path,) = list(offline.glob("run-*.wandb"))
    return path


def test_every_prefix_is_declared_against_the_global_step(offline_run: Path) -> None:
    metrics = [r.metric for r in iter_records(_wandb_file(offline_run)) if r.HasField("metric")]
    declared = {m.name for m in metrics if m.name}
    assert "trainer/global_step" in declared
    globs = {m.glob_name: m.step_metric for m in metrics if m.glob_name}
    for prefix in DESIGN_PREFIXES:
        assert globs.get(f"{prefix}/*") == "trainer/global_step", prefix


def test_history_rows_carry_the_step_of_metrics_jsonl(offline_run: Path) -> None:
    history = history_of(_wandb_file(offline_run))
    lines = (offline_run / "metrics.jsonl").read_text().splitlines()
    local = [json.loads(line) for line in lines]
    # Every history row that holds a grokedge metric holds its x-axis too.
    logged = [row for row in history if any(k.split("/")[0] in DESIGN_PREFIXES for k in row)]
    assert logged and all("trainer/global_step" in row for row in logged)
    # The same (step, value) pairs as the plain-file history, for a Gram and an eval metric.
    for key in ("gram/sigma_1", "test/acc"):
        on_disk = {(r["step"], round(r[key], 9)) for r in local if key in r}
        in_wandb = {
            (row["trainer/global_step"], round(row[key], 9)) for row in history if key in row
        }
        assert on_disk and in_wandb == on_disk, key


def test_summary_holds_the_grok_step(offline_run: Path) -> None:
    summary = summary_of(_wandb_file(offline_run))
    grok = json.loads((offline_run / "summary.json").read_text())["grok_step"]
    assert grok is not None  # the lowered threshold makes the run grok
    assert summary["grok/step"] == grok
    assert math.isfinite(summary["test/acc"])


def test_summary_holds_the_class_names(offline_run: Path) -> None:
    summary = summary_of(_wandb_file(offline_run))
    local = json.loads((offline_run / "summary.json").read_text())
    assert local["class_observed"] in ("functional", "mixed", "compression", "undetermined")
    assert summary["class/observed"] == local["class_observed"]
    assert summary["class/predicted"] == local["class_predicted"]


def test_run_record_names_the_run(offline_run: Path) -> None:
    (run,) = [r.run for r in iter_records(_wandb_file(offline_run)) if r.HasField("run")]
    assert run.project == "grokedge"
    assert run.run_id and run.display_name


def test_sweep_jobs_group_by_configuration_not_by_seed() -> None:
    extra = {"group": "dyck-12-00-00", "name": "optimizer.weight_decay=1,seed=42"}
    a = wandb_init_kwargs(extra, ["optimizer.weight_decay=1", "seed=42"], multirun=True)
    b = wandb_init_kwargs(extra, ["seed=137", "optimizer.weight_decay=1"], multirun=True)
    c = wandb_init_kwargs(extra, ["optimizer.weight_decay=0", "seed=42"], multirun=True)
    assert a["group"] == b["group"] == "dyck-12-00-00/optimizer.weight_decay=1"
    assert c["group"] != a["group"]
    assert a["job_type"] == b["job_type"] == "optimizer.weight_decay=1"
    assert a["name"] == extra["name"]  # the job's own name is kept
    # A group the user chose is not in ``extra`` and so never rewritten; single runs unchanged.
    assert "group" not in wandb_init_kwargs({"name": "x"}, ["seed=1"], multirun=True)
    assert wandb_init_kwargs(extra, ["seed=1"], multirun=False) == extra
    assert non_seed_overrides(["seed=1"]) == ""
    # W&B's 128-character limit on groups: long configurations stay distinct groups.
    many = [f"callbacks.ablation.knob_{i}=1" for i in range(10)]
    d = wandb_init_kwargs(extra, [*many, "optimizer.weight_decay=0", "seed=1"], multirun=True)
    e = wandb_init_kwargs(extra, [*many, "optimizer.weight_decay=1", "seed=1"], multirun=True)
    assert len(d["group"]) <= 128 and len(e["group"]) <= 128 and d["group"] != e["group"]
    assert len(d["job_type"]) <= 64
