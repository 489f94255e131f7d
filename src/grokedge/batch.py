"""The batch contract's two names, in one module with no Lightning: ``Batch`` and
``IGNORE_INDEX``.

A batch maps names to tensors (``tokens``/``labels``, or ``src``/``tgt_in``/``labels``,
plus ``weight`` and optional row masks; ``grokedge.tasks.base`` describes each key).
Everything that builds, reads or evaluates batches — the tasks, the module, the
callbacks, the functional protocol and the Lightning-free ``grokedge.spectral`` —
imports both from here.
"""

from __future__ import annotations

from torch import Tensor

Batch = dict[str, Tensor]
"""A batch: key -> tensor (see the module docstring)."""

IGNORE_INDEX = -100
"""Label value that the loss and every metric skip (padding, unlabelled positions);
torch's default ``ignore_index``."""
