"""What a probe reads: the task's declared targets and the samples of one target.

A task's DataModule declares its probe targets with ``probe_targets(batch)`` (name ->
[B, T] tensor aligned with ``labels``; ``IGNORE_INDEX`` where a position has no value).
The analyses (probes, the functional R² of the classes, the interventions' read-outs)
read them here, checked, and build their grouped samples with :func:`probe_data`.
Plain torch: no Lightning.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from grokedge.batch import Batch
from grokedge.functional import input_keys_of
from grokedge.spectral.perturbation import UNALIGNED_KEYS
from grokedge.spectral.probes import ProbeData, hidden_states_and_targets, row_strings


def probe_target_tensors(datamodule: Any, batch: Batch, key: str) -> dict[str, Tensor]:
    """``datamodule.probe_targets(batch)`` checked: name -> [B, T] aligned with ``labels``;
    a task that declares none, or a wrong shape, is a ValueError naming ``key``."""
    fn = getattr(datamodule, "probe_targets", None)
    if not callable(fn):
        raise ValueError(
            f"{key}: the task's DataModule ({type(datamodule).__name__}) declares no "
            "probe_targets(batch); allowed: a task with probe targets (dyck, modular, scan)"
        )
    targets = dict(fn(batch))
    if not targets:
        raise ValueError(f"{key}: {type(datamodule).__name__}.probe_targets returned nothing")
    for name, t in targets.items():
        if t.shape != batch["labels"].shape:
            raise ValueError(
                f"{key}: probe target {name!r} has shape {list(t.shape)}, expected the "
                f"labels' {list(batch['labels'].shape)}"
            )
    return targets


def pad_id_of(datamodule: Any) -> int:
    """The task's padding id (``model_dims()["pad_id"]``; 0 where it declares none)."""
    dims = getattr(datamodule, "model_dims", None)
    return int(dims().get("pad_id", 0)) if callable(dims) else 0


def probe_data(
    datamodule: Any, module: Any, batch: Batch, hidden: Tensor, target: Tensor
) -> ProbeData:
    """The probe samples of ``target`` [B, T] in ``hidden`` [B, T, d], grouped by string.

    The one place the analyses build their fold groups: a row's string is its model
    inputs (``module``'s ``input_keys``) read by
    :func:`~grokedge.spectral.probes.row_strings`, the inputs aligned with ``labels`` up
    to the row's last labelled position, a seq2seq source (``UNALIGNED_KEYS``) without
    its trailing padding. Identical strings in several rows (an evaluation set that is not
    deduplicated) are then one group and never straddle a fold; distinct rows keep their
    row indices as groups.
    """
    labels = batch["labels"]
    aligned, unaligned = [], []
    for key in input_keys_of(module):
        value = batch[key]
        is_aligned = value.ndim >= 2 and value.shape[1] == labels.shape[1]
        (aligned if is_aligned and key not in UNALIGNED_KEYS else unaligned).append(value)
    strings = row_strings(labels, aligned, unaligned, pad_id_of(datamodule))
    return hidden_states_and_targets(hidden, target, batch.get("weight"), strings)
