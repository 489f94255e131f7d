"""Modular arithmetic data against Python integer arithmetic."""

from __future__ import annotations

import pytest
import torch

from grokedge.batch import IGNORE_INDEX
from grokedge.tasks.modular import ModularDataModule

EXPECTED = {
    "add": lambda a, b, p: (a + b) % p,
    "sub": lambda a, b, p: (a - b) % p,
    "mul": lambda a, b, p: (a * b) % p,
    "div": lambda a, b, p: next(c for c in range(p) if (c * b) % p == a),
    "x2_xy_y2": lambda a, b, p: (a * a + a * b + b * b) % p,
}


@pytest.mark.parametrize("operation", sorted(EXPECTED))
def test_labels_and_split(operation: str) -> None:
    p = 23
    d = ModularDataModule(operation=operation, modulus=p)
    d.setup()
    pairs = p * (p - 1) if operation == "div" else p * p
    assert len(d.train_rows) + len(d.test_rows) == pairs
    assert abs(len(d.train_rows) - pairs / 2) <= 1
    assert not set(d.train_rows.tolist()) & set(d.test_rows.tolist())
    assert (d.labels[:, :-1] == IGNORE_INDEX).all()
    for row in range(0, pairs, 7):
        a, _, b, _ = d.tokens[row].tolist()
        assert int(d.labels[row, -1]) == EXPECTED[operation](a, b, p)


def test_epochs_visit_each_training_pair_once() -> None:
    d = ModularDataModule(modulus=11, batch_size=10)
    d.setup()
    per_epoch = len(d.train_rows) // 10
    seen = torch.cat([d.sample_train_batch(i)["tokens"] for i in range(per_epoch)])
    assert len({tuple(r) for r in seen.tolist()}) == per_epoch * 10


def test_bad_arguments_name_the_key() -> None:
    with pytest.raises(ValueError, match="task.datamodule.operation='pow'"):
        ModularDataModule(operation="pow")
    with pytest.raises(ValueError, match="modulus=96"):
        ModularDataModule(modulus=96)
