"""The batch contract's names, in one module with no Lightning: ``Batch``,
``IGNORE_INDEX``, ``labelled_length`` and ``to_device``.

A batch maps names to tensors (``tokens``/``labels``, or ``src``/``tgt_in``/``labels``,
plus ``weight`` and optional row masks; ``grokedge.tasks.base`` describes each key).
Everything that builds, reads or evaluates batches — the tasks, the module, the
callbacks, the functional protocol and the Lightning-free ``grokedge.edge``,
``grokedge.experiments`` and ``grokedge.analysis`` — imports these names from here.
"""

from __future__ import annotations

import torch
from torch import Tensor

Batch = dict[str, Tensor]
"""A batch: key -> tensor (see the module docstring)."""

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
