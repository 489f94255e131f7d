"""Modular arithmetic ``a ∘ b mod p``, the grokking task of the companion papers.

Each example is the four tokens ``a ∘ b =`` with the answer as the label of the last
position (``IGNORE_INDEX`` elsewhere), so the causal encoder and the token metrics of the
Dyck task serve unchanged: token accuracy here *is* answer accuracy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from grokedge.batch import IGNORE_INDEX, Batch
from grokedge.tasks.base import (
    GrokDataModule,
    batch_generator,
    endless_loader,
    fixed_batch_loader,
)


def _inverse(b: Tensor, p: int) -> Tensor:
    # Fermat: b^(p-2) = b^-1 mod p for prime p.
    return torch.tensor([pow(int(x), p - 2, p) for x in b.tolist()], dtype=torch.long)


OPERATIONS: dict[str, Callable[[Tensor, Tensor, int], Tensor]] = {
    "add": lambda a, b, p: (a + b) % p,
    "sub": lambda a, b, p: (a - b) % p,
    "mul": lambda a, b, p: (a * b) % p,
    "div": lambda a, b, p: (a * _inverse(b, p)) % p,
    # A polynomial operation that is not a group law: harder, groks later.
    "x2_xy_y2": lambda a, b, p: (a * a + a * b + b * b) % p,
}
SEQ_LEN = 4  # a, op, b, =


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, int(n**0.5) + 1))


class ModularDataModule(GrokDataModule):
    """``a ∘ b mod p`` over all pairs, a random ``train_fraction`` of them for training.

    Token ids: ``0..p-1`` numbers, ``p + i`` the i-th operation of ``OPERATIONS``,
    ``p + len(OPERATIONS)`` the ``=`` sign. Training batches walk through reshuffled epochs (each
    pair once per epoch, the usual protocol for this task).

    Args:
        operation: one of ``OPERATIONS``.
        modulus: the prime p.
        train_fraction: share of the pairs used for training.
        split_seed: seed of the train/test permutation.
        batch_size: training rows per step (capped at the training-set size).
        seed: seed of the training-batch generator.

    Example:
        >>> dm = ModularDataModule(operation="add", modulus=97)
        >>> dm.setup()
        >>> len(dm.train_rows) + len(dm.test_rows)
        9409
    """

    task_name = "modular"
    probe_target_names = ("answer", "a", "b")
    eval_names = ("test", "train")

    def __init__(
        self,
        operation: str = "add",
        modulus: int = 97,
        train_fraction: float = 0.5,
        split_seed: int = 0,
        batch_size: int = 512,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if operation not in OPERATIONS:
            raise ValueError(
                f"task.datamodule.operation={operation!r}: allowed values are "
                f"{', '.join(OPERATIONS)}"
            )
        if not _is_prime(modulus):
            raise ValueError(f"task.datamodule.modulus={modulus}: must be a prime")
        self.answer_modulus = modulus  # the answer c ∈ Z_p: its Fourier basis (probe_targets)
        if not 0.0 < train_fraction < 1.0:
            raise ValueError(f"task.datamodule.train_fraction={train_fraction}: must lie in (0, 1)")
        self.save_hyperparameters()
        self._ready = False

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        h = self.hparams
        p = h.modulus
        a, b = torch.cartesian_prod(torch.arange(p), torch.arange(p)).unbind(1)
        if h.operation == "div":  # b = 0 has no inverse
            a, b = a[b != 0], b[b != 0]
        answer = OPERATIONS[h.operation](a, b, p)
        op_id = p + list(OPERATIONS).index(h.operation)
        eq_id = p + len(OPERATIONS)
        tokens = torch.stack([a, torch.full_like(a, op_id), b, torch.full_like(a, eq_id)], 1)
        labels = torch.full_like(tokens, IGNORE_INDEX)
        labels[:, -1] = answer
        perm = torch.randperm(len(a), generator=torch.Generator().manual_seed(h.split_seed))
        n_train = int(round(h.train_fraction * len(a)))
        self.train_rows, self.test_rows = perm[:n_train], perm[n_train:]
        self.tokens, self.labels = tokens, labels
        self._epoch, self._epoch_order = -1, torch.empty(0, dtype=torch.long)
        self._ready = True

    def model_dims(self) -> dict[str, int]:
        p = self.hparams.modulus
        return {"vocab_size": p + len(OPERATIONS) + 1, "num_classes": p, "max_len": SEQ_LEN}

    def _batch(self, rows: Tensor) -> Batch:
        return {
            "tokens": self.tokens[rows],
            "labels": self.labels[rows],
            "weight": torch.ones(len(rows)),
        }

    def sample_train_batch(self, index: int) -> Batch:
        """Training batch number ``index``: a slice of its epoch's permutation.

        Epochs drop their last incomplete batch, so every batch has the same size.
        """
        size = min(self.hparams.batch_size, len(self.train_rows))
        per_epoch = len(self.train_rows) // size
        epoch, pos = divmod(index, per_epoch)
        if self._epoch != epoch:
            generator = batch_generator(self.hparams.seed, epoch)
            self._epoch_order = self.train_rows[
                torch.randperm(len(self.train_rows), generator=generator)
            ]
            self._epoch = epoch
        return self._batch(self._epoch_order[pos * size : (pos + 1) * size])

    def train_dataloader(self) -> DataLoader:
        return endless_loader(self.sample_train_batch, self.steps_done)

    def probe_targets(self, batch: Batch) -> dict[str, Tensor]:
        """Task variables for the hidden-state probes: name -> [B, T], ``IGNORE_INDEX``
        where not probed. All at the last position (``=``, where the answer is read):
        ``answer`` (a ∘ b mod p, the labels), ``a`` and ``b`` (the operands). Each is a
        residue mod p: a linear probe of it read as a number measures little (p − 1 and
        0 are neighbours); the functional R² reads ``answer`` in its Fourier basis
        (``answer_modulus``; docs/classes.md)."""
        labels, tokens = batch["labels"], batch["tokens"]
        last = labels != IGNORE_INDEX

        def at_last(values: Tensor) -> Tensor:
            return torch.where(last, values[:, None].expand_as(labels), IGNORE_INDEX)

        return {"answer": labels, "a": at_last(tokens[:, 0]), "b": at_last(tokens[:, 2])}

    def val_dataloader(self) -> list[DataLoader]:
        return [
            fixed_batch_loader([self._batch(self.test_rows)]),
            fixed_batch_loader([self._batch(self.train_rows)]),
        ]
