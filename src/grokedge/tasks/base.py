"""The contract between a task's data and the rest of grokedge.

A *batch* is a ``dict[str, Tensor]`` built once, in memory, by the task's DataModule:

Encoder tasks (``dyck``, ``modular``)
    ``tokens``  LongTensor [B, T]  input token ids (right-padded with the task's pad id)
    ``labels``  LongTensor [B, T]  target class per position; ``IGNORE_INDEX`` where none

Sequence-to-sequence tasks (``scan``)
    ``src``     LongTensor [B, S]  command token ids, right-padded with ``PAD_ID``
    ``tgt_in``  LongTensor [B, L]  ``BOS`` + action ids (teacher forcing), padded
    ``labels``  LongTensor [B, L]  action ids + ``EOS``; ``IGNORE_INDEX`` at padding

Every batch also has
    ``weight``  FloatTensor [B]    multiplicity of each row (1.0 unless rows were
                                   deduplicated: a row that stands for k identical
                                   examples carries weight k, so weighted means equal the
                                   means over the original examples)
and evaluation batches may carry masks over rows, e.g. ``unseen`` BoolTensor [B]
(the row's string does not occur in the training set).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

Batch = dict[str, Tensor]

IGNORE_INDEX = -100
"""Label value that the loss and every metric skip (padding, unlabelled positions)."""


class _FixedBatches(torch.utils.data.Dataset):
    """A list of pre-built batches served as they are (no collation)."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Batch:
        return self.batches[i]


def fixed_batch_loader(batches: list[Batch]) -> DataLoader:
    """A DataLoader over pre-built batches: no workers, no collation, no copies."""
    return DataLoader(_FixedBatches(batches), batch_size=None, shuffle=False, num_workers=0)


class _EndlessBatches(IterableDataset):
    def __init__(self, sample: Any) -> None:
        self.sample = sample

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.sample()


def endless_loader(sample: Any) -> DataLoader:
    """An endless DataLoader whose batches come from ``sample()``.

    Training is counted in optimizer steps, not epochs, so the train loader never ends;
    ``sample`` owns its random generator so the batch sequence depends only on the seed.
    """
    return DataLoader(_EndlessBatches(sample), batch_size=None, num_workers=0)


class GrokDataModule(L.LightningDataModule, ABC):
    """Base of the task DataModules.

    Subclasses set, in ``__init__`` or ``setup``:

    - ``eval_names``: names of the evaluation sets in ``val_dataloader()`` order; the first
      one is the held-out test set whose metric decides grokking. Metric names are
      ``f"{name}/{metric}"`` (``test/acc``, ``train/acc``, ``ood/acc``).
    - ``model_dims()``: the sizes the model needs from the data (vocabulary, classes,
      maximum lengths) as keyword arguments of the model's constructor.
    """

    task_name: str = ""
    eval_names: tuple[str, ...] = ("test",)

    @abstractmethod
    def model_dims(self) -> dict[str, int]:
        """Constructor keyword arguments the model needs from the data."""
