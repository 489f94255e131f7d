"""Log the report's figures (``wandb.Image``) and tables (``wandb.Table``) to W&B.

Where: a *separate* run in the same project and group as the training run, with
``job_type="report"``, written offline beside the training run's own
(``<run_dir>/wandb/offline-run-*``), so that ``wandb sync <run_dir>/wandb/offline-run-*``
uploads both and the W&B group shows them together.

Why not into the training run itself: wandb 0.31 cannot resume an offline run. Checked:
``wandb.init(id=<its id>, resume="allow", mode="offline")`` starts a *new* offline run
directory with the same id whose history restarts at step 0 and which records neither
group nor job type; syncing it after the original overwrites the original's history
(wandb/wandb#5865; offline resume is the open wandb/wandb#12110). A sibling run loses
nothing. Under ``WANDB_MODE=online`` the same sibling run streams instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from grokedge.reporting.table_format import Table
from grokedge.reporting.wandb_records import OfflineRun, read_offline_run

REPORT_JOB_TYPE = "report"


def training_runs(run_dir: Path) -> list[OfflineRun]:
    """The W&B offline training runs of a run directory (not earlier report runs)."""
    out = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*")):
        info = read_offline_run(path)
        if info is not None and info.job_type != REPORT_JOB_TYPE:
            out.append(info)
    return out


def wandb_mode() -> str | None:
    """``offline`` (grokedge's default) or ``online`` from WANDB_MODE; None if disabled."""
    mode = os.environ.get("WANDB_MODE", "offline").lower()
    if mode == "disabled":
        return None
    return "online" if mode == "online" else "offline"


def log_report(
    directory: Path,
    project: str,
    group: str | None,
    name: str,
    figures: Mapping[str, Path],
    tables: Sequence[Table],
    summary: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
) -> Path | None:
    """One report run under ``directory/wandb``: images, tables, summary values.

    Returns the run's directory (offline), or None when W&B is disabled.
    """
    mode = wandb_mode()
    if mode is None:
        return None
    import wandb

    if wandb.run is not None:  # never log into whatever run this process has open
        wandb.finish()
    directory.mkdir(parents=True, exist_ok=True)
    before = set((directory / "wandb").glob("offline-run-*"))
    run = wandb.init(
        project=project,
        group=group or None,
        job_type=REPORT_JOB_TYPE,
        name=name,
        dir=str(directory),
        mode=mode,
        config=dict(config or {}),
    )
    try:
        payload: dict[str, Any] = {
            f"report/figure/{key}": wandb.Image(str(path), caption=key)
            for key, path in figures.items()
        }
        for table in tables:
            payload[f"report/table/{table.key}"] = wandb.Table(
                columns=table.columns, data=table.rows
            )
        run.log(payload)
        run.summary.update({k: v for k, v in summary.items()})
    finally:
        run.finish()
    after = set((directory / "wandb").glob("offline-run-*")) - before
    return sorted(after)[-1] if after else None
