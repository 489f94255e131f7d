"""The Dyck data against the paper's figures and an independent re-implementation."""

from __future__ import annotations

import random
import subprocess
import sys

import torch

from grokedge.batch import IGNORE_INDEX
from grokedge.tasks.dyck import CLOSE, OPEN, DyckDataModule


def literal_paper_generator(n: int, seed: int) -> list[str]:
    """docs/theory.md §2 written out independently: pairs ~ U{1..12}, open w.p. 0.55 if free."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        pairs = rng.randint(1, 12)
        s, opened, depth = "", 0, 0
        while len(s) < 2 * pairs:
            may_open, may_close = opened < pairs, depth > 0
            go_open = may_open and (rng.random() < 0.55 if may_close else True)
            s += "(" if go_open else ")"
            opened += go_open
            depth += 1 if go_open else -1
        out.append(s)
    return out


def dm(**kw) -> DyckDataModule:
    d = DyckDataModule(**kw)
    d.setup()
    return d


def text(seq) -> str:
    return "".join("(" if t == OPEN else ")" for t in seq)


def test_paper_counts() -> None:
    d = dm()
    assert len(d.train_sequences) + len(d.test_sequences) == 5050
    assert (len(d.train_sequences), len(d.test_sequences)) == (50, 5000)
    assert len(set(d.train_sequences)) == 36
    train = set(d.train_sequences)
    assert sum(s in train for s in d.test_sequences) == 1221
    assert len(train | set(d.test_sequences)) == 2249


def test_corpus_matches_independent_generator_and_torch_split() -> None:
    d = dm()
    expected = literal_paper_generator(5050, seed=0)
    perm = torch.randperm(5050, generator=torch.Generator().manual_seed(0)).tolist()
    assert [text(s) for s in d.train_sequences] == [expected[i] for i in perm[:50]]
    assert [text(s) for s in d.test_sequences] == [expected[i] for i in perm[50:]]


def test_labels_are_depth_after_each_token() -> None:
    d = dm(ood_sequences=0)
    for tokens, labels, n in zip(
        d.test_distinct.tokens, d.test_distinct.labels, d.test_distinct.lengths, strict=True
    ):
        depth = 0
        for t in range(int(n)):
            depth += 1 if int(tokens[t]) == OPEN else -1
            assert int(labels[t]) == depth >= 0
        assert depth == 0
        assert (labels[int(n) :] == IGNORE_INDEX).all()


def test_deduplicated_training_batch_has_the_same_loss_and_gradient() -> None:
    torch.manual_seed(0)
    plain, dedup = dm(deduplicate=False), dm(deduplicate=True)
    table = torch.randn(3, 21, dtype=torch.float64, requires_grad=True)

    def loss(batch):
        logits = table[batch["tokens"]]  # a stand-in model: per-token logits
        ce = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1),
            batch["labels"].flatten(),
            reduction="none",
            ignore_index=IGNORE_INDEX,
        ).view_as(batch["labels"])
        w = batch["weight"][:, None].double() * (batch["labels"] != IGNORE_INDEX)
        return (ce * w).sum() / w.sum()

    for index in (0, 1, 17):
        a, b = plain.sample_train_batch(index), dedup.sample_train_batch(index)
        assert a["tokens"].shape[0] == 50 and b["weight"].sum() == 50
        assert b["tokens"].shape[0] < 50
        ga = torch.autograd.grad(loss(a), table)[0]
        gb = torch.autograd.grad(loss(b), table)[0]
        torch.testing.assert_close(loss(a), loss(b))
        torch.testing.assert_close(ga, gb)


def test_batches_depend_only_on_seed_and_index() -> None:
    a, b = dm(seed=3), dm(seed=3)
    for i in (5, 0, 5):
        torch.testing.assert_close(a.sample_train_batch(i), b.sample_train_batch(i))
    assert not torch.equal(
        a.sample_train_batch(1)["weight"], a.sample_train_batch(2)["weight"]
    ) or not torch.equal(a.sample_train_batch(1)["tokens"], a.sample_train_batch(2)["tokens"])


def test_deduplicated_eval_covers_every_test_token_once() -> None:
    d = dm()
    test_loader = d.val_dataloader()[0]
    tokens = sum(
        float((b["weight"][:, None] * (b["labels"] != IGNORE_INDEX)).sum()) for b in test_loader
    )
    expected = sum(len(s) for s in d.test_sequences)
    assert tokens == expected
    unseen_rows = sum(float(b["weight"][b["unseen"]].sum()) for b in test_loader)
    assert unseen_rows == 5000 - 1221


def test_ood_set_is_deeper_and_longer_than_the_head_by_default() -> None:
    d = dm()
    dims = d.model_dims()
    assert dims == {"vocab_size": 3, "num_classes": 13, "max_len": 48}
    ood = d.val_dataloader()[2]
    assert 12 < max(int(b["labels"].max()) for b in ood) <= 20
    assert max(b["tokens"].shape[1] for b in ood) <= 48
    assert dm(head_covers_ood=True).model_dims()["num_classes"] == 21
    assert dm(ood_sequences=0).model_dims() == {"vocab_size": 3, "num_classes": 13, "max_len": 24}


def test_labels_beyond_the_head_count_as_wrong_and_carry_no_loss() -> None:
    from grokedge.module import token_stats

    logits = torch.zeros(1, 3, 13)
    logits[0, :, 12] = 5.0  # predicts depth 12 everywhere
    labels = torch.tensor([[12, 13, IGNORE_INDEX]])
    s = token_stats(logits, labels, torch.ones(1))
    assert s.correct.tolist() == [[True, False, False]]
    assert s.reachable.tolist() == [[True, False, False]]
    assert float(s.accuracy()) == 0.5
    assert torch.isfinite(s.mean_loss())


def test_cli_prints_the_split() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "grokedge.tasks.dyck", "--part", "train"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    d = dm(ood_sequences=0)
    assert out == [text(s) for s in d.train_sequences]
    assert all(set(line) <= {"(", ")"} for line in out)
    assert CLOSE == 1
