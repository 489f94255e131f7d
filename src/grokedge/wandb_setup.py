"""W&B dashboards that show the lifecycle without manual panel set-up.

Two pieces, both called from ``train.py``:

- :func:`wandb_init_kwargs`: the ``wandb.init`` arguments grokedge adds to a job's
  ``WandbLogger``: in a multirun, ``group`` = the sweep *and* the job's non-seed
  overrides (so that a group holds exactly the seeds of one configuration and W&B's
  grouped charts average over seeds, not over ω) and ``job_type`` = the non-seed
  overrides (a second "group by" key in the UI).
- :class:`WandbDashboardCallback`: at fit start, ``define_metric`` for every metric prefix
  of docs/design.md, "Metric names", with ``trainer/global_step`` as its x-axis (W&B makes
  one panel section per prefix); at train end, the run's summary values ``grok/step`` and
  any ``class/*``.

W&B knows nothing of grokedge beyond this module; the rest of the package logs through
Lightning's loggers. Under ``WANDB_MODE=disabled`` or without a ``WandbLogger`` both are
no-ops.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from grokedge.analysis_log import wandb_loggers

STEP_METRIC = "trainer/global_step"
"""The x-axis of every grokedge metric: Lightning's ``WandbLogger`` adds this key, with
``trainer.global_step``, to every row it logs."""

METRIC_PREFIXES: tuple[str, ...] = (
    "train",
    "test",
    "ood",
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
    "report",
)
"""Metric prefixes (docs/design.md, "Metric names"): one panel section each in W&B."""

SEED_KEYS = frozenset({"seed"})
"""Override keys that distinguish repetitions of one configuration (aggregated over)."""
RESUME_KEYS = frozenset({"resume"})
"""Override keys that say where a run continues from, not what it is."""
NOT_CONFIGURATION_KEYS = SEED_KEYS | RESUME_KEYS
"""Override keys left out of a run's configuration (its W&B group, the report's groups)."""


def non_seed_overrides(overrides: Iterable[str]) -> str:
    """The job's overrides without the seed and ``resume=``, sorted, joined by commas ("" if
    none).

    Example:
        >>> non_seed_overrides(["seed=42", "optimizer.weight_decay=1", "task=dyck"])
        'optimizer.weight_decay=1,task=dyck'
    """
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in NOT_CONFIGURATION_KEYS]
    return ",".join(sorted(kept))


def wandb_init_kwargs(
    extra: Mapping[str, Any], overrides: Sequence[str], multirun: bool
) -> dict[str, Any]:
    """``extra`` (the ``WandbLogger`` arguments ``train.py`` chose) plus grokedge's grouping.

    In a multirun, a group that ``train.py`` derived from the sweep (present in ``extra``:
    the user's own ``logger.wandb.group`` is never in it and is kept as given) gets the
    job's non-seed overrides appended, so seeds of one configuration share a group;
    ``job_type`` is the non-seed overrides (W&B allows 64 characters; longer strings are
    cut; a group longer than 128 characters keeps its head and a hash of the whole).
    """
    out = dict(extra)
    if not multirun:
        return out
    config = non_seed_overrides(overrides)
    if "group" in out and config:
        out["group"] = _capped(f"{out['group']}/{config}", GROUP_MAX)
    out.setdefault("job_type", (config or "default")[:JOB_TYPE_MAX])
    return out


GROUP_MAX, JOB_TYPE_MAX = 128, 64
"""W&B's limits on ``group`` and ``job_type`` (characters)."""


def _capped(text: str, limit: int) -> str:
    """``text`` if it fits, else its head and a hash of the whole: still one group per
    configuration, never two configurations in one group."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha1(text.encode()).hexdigest()[:10]
    return f"{text[: limit - 11]}~{digest}"


def _finite(value: Any) -> float | None:
    try:
        x = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


class WandbDashboardCallback(Callback):
    """Declares grokedge's metrics to W&B and writes the run's headline summary values.

    - ``on_fit_start``: ``define_metric(STEP_METRIC)`` and, per prefix in
      :data:`METRIC_PREFIXES`, ``define_metric(f"{prefix}/*", step_metric=STEP_METRIC)``.
      Lightning's ``WandbLogger`` declares a catch-all ``*`` already; the per-prefix
      declarations make the x-axis explicit for every prefix in the run's records, so a
      synced project plots each metric against the optimizer step, not W&B's own counter.
    - ``on_train_end`` (before ``train.py`` finishes the W&B run): summary ``grok/step``
      (``None`` when the run did not grok: the key is present either way, so a runs table
      can sort and filter on it), every numeric ``class/*`` value logged and the
      ``class_*`` fields of the callbacks' ``summary_fields()`` (the class names) as
      ``class/*``.

    A no-op without an active ``WandbLogger`` (``logger=none``, ``WANDB_MODE=disabled``).
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in wandb_loggers(trainer):
            run = logger.experiment
            run.define_metric(STEP_METRIC)
            for prefix in METRIC_PREFIXES:
                run.define_metric(f"{prefix}/*", step_metric=STEP_METRIC, step_sync=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loggers = wandb_loggers(trainer)
        if not loggers:
            return
        grok = getattr(pl_module, "grok_step", None)
        values: dict[str, Any] = {"grok/step": None if grok is None else int(grok)}
        for source in (trainer.logged_metrics, trainer.callback_metrics):
            for key, value in source.items():
                if key.startswith("class/") and _finite(value) is not None:
                    values[key] = _finite(value)
        # The class names themselves are strings (no logged scalar carries them): the
        # classifying callback's summary_fields() (``class_observed`` ...) as ``class/*``.
        for callback in trainer.callbacks:
            fields = getattr(callback, "summary_fields", None)
            if callable(fields) and callback is not self:
                for key, value in fields().items():
                    if key.startswith("class_") and isinstance(value, str | int | float):
                        values["class/" + key[len("class_") :]] = value
        for logger in loggers:
            logger.experiment.summary.update(values)
