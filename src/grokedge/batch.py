"""The batch contract's names, in one module with no Lightning: ``Batch``,
``IGNORE_INDEX``, ``LABELS``, ``labelled_length``, ``to_device``, ``token_labels`` and
``named_batch``.

A batch maps names to tensors (``tokens``/``labels``, or ``src``/``tgt_in``/``labels``,
plus ``weight`` and optional row masks; ``grokedge.tasks.base`` describes each key).
The analyses read every evaluation batch as a dict whose ``labels`` are [B, T]: a tuple
batch is named by :func:`named_batch` (the keys given to
``FunctionalAdapter.attach(..., batch_keys=...)``) and a classifier's labels [B] are read as
[B, 1] (:func:`token_labels`). Everything that builds, reads or evaluates batches — the
tasks, the module, the callbacks, the functional protocol and the Lightning-free ``grokedge.edge``,
``grokedge.experiments`` and ``grokedge.analysis`` — imports these names from here.
"""

from __future__ import annotations

import torch
from torch import Tensor

Batch = dict[str, Tensor]
"""A batch: key -> tensor (see the module docstring)."""

LABELS = "labels"
"""The batch key of the labels (class indices, ``IGNORE_INDEX`` where nothing is scored)."""

IGNORE_INDEX = -100
"""Label value that the loss and every metric skip (padding, unlabelled positions);
torch's default ``ignore_index``."""


def labelled_length(labels: Tensor) -> int:
    """1 + the last labelled position of a row of ``labels`` (0 if none)."""
    idx = (labels != IGNORE_INDEX).nonzero()
    return int(idx.max()) + 1 if idx.numel() else 0


def to_device(batch: Batch, device: torch.device) -> Batch:
    """``batch`` with every tensor on ``device``."""
    return {k: v.to(device) for k, v in batch.items()}


def token_labels(labels: Tensor, where: str = "the evaluation batch") -> Tensor:
    """``labels`` as [B, T]: a classifier's [B] is [B, 1] (one labelled position per row),
    [B, T] is returned as is. One ValueError naming ``where``, the shape given, what is
    allowed and the fix, for any other rank or a floating dtype."""
    if not isinstance(labels, Tensor):
        raise ValueError(
            f"{where}: labels is a {type(labels).__name__}; allowed: a LongTensor of class "
            "indices [B] (a classifier) or [B, T] (one label per position, -100 where none); "
            "fix: return labels as a tensor from the dataset / collate function"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(
            f"{where}: labels has dtype {str(labels.dtype).replace('torch.', '')} (shape "
            f"{list(labels.shape)}); allowed: integer class indices, [B] or [B, T]; fix: "
            "labels.long() (a regression target is not a label: give it as a probe target)"
        )
    if labels.ndim == 1:
        return labels[:, None]
    if labels.ndim == 2:
        return labels
    raise ValueError(
        f"{where}: labels has shape {list(labels.shape)}; allowed: [B] (a classifier) or "
        "[B, T] (one label per position, -100 where none); fix: one class index per row "
        "or per position (e.g. labels.argmax(-1) for one-hot labels, labels.flatten(1) for "
        "several positions)"
    )


def named_batch(batch: object, keys: tuple[str, ...] | None, where: str = "a batch") -> Batch:
    """``batch`` as a dict: a dict as is; a tuple or list of tensors named by ``keys``
    (``FunctionalAdapter.attach(..., batch_keys=...)``, e.g. ``("x", "labels")`` for a
    ``TensorDataset`` of inputs and labels). One ValueError naming the fix otherwise."""
    if isinstance(batch, dict):
        return batch
    if isinstance(batch, tuple | list):
        if keys is None:
            raise ValueError(
                f"{where} is a {type(batch).__name__} of {len(batch)}; allowed: a dict with "
                "'labels' and the model's inputs, or a tuple whose positions are named; fix: "
                "FunctionalAdapter.attach(module, loss_fn, batch_keys=(... one name per "
                "position, 'labels' among them))"
            )
        if len(keys) != len(batch):
            raise ValueError(
                f"{where} is a {type(batch).__name__} of {len(batch)} but batch_keys="
                f"{tuple(keys)!r} names {len(keys)} positions; fix: one name per position"
            )
        return dict(zip(keys, batch, strict=True))
    raise ValueError(
        f"{where} is a {type(batch).__name__}; allowed: a dict of tensors (with 'labels') or "
        "a tuple of tensors named by FunctionalAdapter.attach(..., batch_keys=...)"
    )
