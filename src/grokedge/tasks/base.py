"""The contract between a task's data and the rest of grokedge.

A *batch* is a ``dict[str, Tensor]`` (``grokedge.batch.Batch``) built once, in memory, by
the task's DataModule (``IGNORE_INDEX`` is ``grokedge.batch.IGNORE_INDEX``):

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

import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from grokedge.batch import Batch


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


def batch_generator(seed: int, index: int) -> torch.Generator:
    """The random generator of training batch number ``index`` of a run seeded ``seed``.

    Batches are a pure function of (seed, index), not of a generator's running state, so
    a run resumed from a checkpoint at step t draws exactly the batches an uninterrupted
    run draws from step t on, whatever the loader had prefetched when it was saved.
    """
    # Tuples of ints hash deterministically across processes (no hash randomisation).
    return torch.Generator().manual_seed(hash((seed, index)) & 0x7FFF_FFFF_FFFF_FFFF)


class _EndlessBatches(IterableDataset):
    def __init__(self, sample: Callable[[int], Batch], start: Callable[[], int]) -> None:
        self.sample = sample
        self.start = start

    def __iter__(self) -> Iterator[Batch]:
        return map(self.sample, itertools.count(self.start()))


def endless_loader(sample: Callable[[int], Batch], start: Callable[[], int]) -> DataLoader:
    """An endless DataLoader yielding ``sample(start()), sample(start() + 1), ...``.

    Training is counted in optimizer steps, not epochs, so the train loader never ends.
    ``start`` is read when iteration begins: the trainer's global step, so that a resumed
    run continues the batch sequence where the checkpoint left it.
    """
    return DataLoader(_EndlessBatches(sample, start), batch_size=None, num_workers=0)


class GrokDataModule(L.LightningDataModule, ABC):
    """Base of the task DataModules.

    Subclasses set, in ``__init__`` or ``setup``:

    - ``eval_names``: names of the evaluation sets in ``val_dataloader()`` order; the first
      one is the held-out test set whose metric decides grokking. Metric names are
      ``f"{name}/{metric}"`` (``test/acc``, ``train/acc``, ``ood/acc``).
    - ``model_dims()``: the sizes the model needs from the data (vocabulary, classes,
      maximum lengths) as keyword arguments of the model's constructor.
    - ``probe_target_names``: the names ``probe_targets(batch)`` returns (the task
      variables the probes and the functional R² may read), checked against the config
      before training (``grokedge.analysis.probe_targets``); ``answer_modulus``: for a cyclic
      answer read in the Fourier basis (modular arithmetic), its p (None: no such answer).
    """

    task_name: str = ""
    eval_names: tuple[str, ...] = ("test",)
    probe_target_names: tuple[str, ...] = ()
    answer_modulus: int | None = None

    def steps_done(self) -> int:
        """Optimizer steps already taken (the restored step when resuming), 0 standalone."""
        trainer = getattr(self, "trainer", None)
        return trainer.global_step if trainer is not None else 0

    def init_model_(self, net: torch.nn.Module, seed: int) -> None:
        """Hook to initialise ``net`` as the task's reference code does (default: keep).

        Called once, right after the model is built with the run's seed set.
        """

    @abstractmethod
    def model_dims(self) -> dict[str, int]:
        """Constructor keyword arguments the model needs from the data."""
