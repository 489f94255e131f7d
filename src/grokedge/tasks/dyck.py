"""Dyck-1 depth prediction, the paper's first task (docs/theory.md §2).

Each sequence is a balanced string of ``(`` and ``)``; the label at every position is the
nesting depth *after* that token. The default configuration reproduces the paper's data
bit for bit: 5,050 sequences from ``random.Random(0)``, shuffled by ``torch.randperm`` with
a generator seeded 0, the first 50 for training and the other 5,000 for testing.

Two savings keep the numbers identical while doing less work:

- the 5,000 test sequences hold only ~2,200 distinct strings, so evaluation runs each
  distinct string once, weighted by its multiplicity;
- a training batch of 50 drawn with replacement from 36 distinct training strings holds
  ~27 distinct ones, so the step runs each once with its count as weight (the weighted
  mean over tokens is the same loss as the mean over the 50 rows).

Rows are right-padded; the model is causal, so trailing padding never changes a real
position and every batch is trimmed to its own longest row.

Run ``python -m grokedge.tasks.dyck --part train|test`` to print a split.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass

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

OPEN, CLOSE, PAD = 0, 1, 2
VOCAB_SIZE = 3
SYMBOLS = {OPEN: "(", CLOSE: ")"}


def generate_sequence(max_pairs: int, p_open: float, rng: random.Random) -> list[int]:
    """One balanced string of ``n ~ U{1..max_pairs}`` pairs, as token ids.

    While both moves are legal the next token opens with probability ``p_open``. The
    draws (``randint`` for n, one ``random()`` per free choice) follow the paper's code
    so that ``random.Random(0)`` yields its sequences exactly.
    """
    n_pairs = rng.randint(1, max_pairs)
    seq: list[int] = []
    opened = depth = 0
    for _ in range(2 * n_pairs):
        can_open, can_close = opened < n_pairs, depth > 0
        if can_open and (not can_close or rng.random() < p_open):
            seq.append(OPEN)
            opened += 1
            depth += 1
        else:
            seq.append(CLOSE)
            depth -= 1
    return seq


def depths(seq: Sequence[int]) -> list[int]:
    """Depth after each token: the per-position labels."""
    out, depth = [], 0
    for tok in seq:
        depth += 1 if tok == OPEN else -1
        out.append(depth)
    return out


def generate_corpus(n: int, max_pairs: int, p_open: float, seed: int) -> list[tuple[int, ...]]:
    """``n`` sequences from one ``random.Random(seed)`` stream, in generation order."""
    rng = random.Random(seed)
    return [tuple(generate_sequence(max_pairs, p_open, rng)) for _ in range(n)]


def paper_split(
    corpus: list[tuple[int, ...]], n_train: int, split_seed: int
) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Shuffle with ``torch.randperm`` (generator seeded ``split_seed``) and cut."""
    perm = torch.randperm(len(corpus), generator=torch.Generator().manual_seed(split_seed))
    shuffled = [corpus[i] for i in perm.tolist()]
    return shuffled[:n_train], shuffled[n_train:]


def to_text(seq: Sequence[int]) -> str:
    return "".join(SYMBOLS[t] for t in seq)


@dataclass(frozen=True)
class DistinctStrings:
    """The distinct strings of a split with their multiplicities.

    ``tokens``/``labels``: [U, T] (T = the longest string); ``counts``: [U] float;
    ``index``: [N] position in the distinct list of each original sequence;
    ``lengths``: [U] number of real tokens.
    """

    strings: list[tuple[int, ...]]
    tokens: Tensor
    labels: Tensor
    counts: Tensor
    index: Tensor
    lengths: Tensor

    @classmethod
    def of(cls, seqs: Sequence[tuple[int, ...]]) -> DistinctStrings:
        first: dict[tuple[int, ...], int] = {}
        index = [first.setdefault(s, len(first)) for s in seqs]
        strings = list(first)
        width = max(len(s) for s in strings)
        tokens = torch.full((len(strings), width), PAD, dtype=torch.long)
        labels = torch.full((len(strings), width), IGNORE_INDEX, dtype=torch.long)
        for i, s in enumerate(strings):
            tokens[i, : len(s)] = torch.tensor(s)
            labels[i, : len(s)] = torch.tensor(depths(s))
        idx = torch.tensor(index)
        counts = torch.bincount(idx, minlength=len(strings)).to(torch.float32)
        lengths = torch.tensor([len(s) for s in strings])
        return cls(strings, tokens, labels, counts, idx, lengths)


def make_batch(
    tokens: Tensor, labels: Tensor, weight: Tensor, lengths: Tensor, **masks: Tensor
) -> Batch:
    """A batch trimmed to its longest row (causal model + right padding: exact)."""
    width = int(lengths.max())
    batch = {"tokens": tokens[:, :width], "labels": labels[:, :width], "weight": weight}
    batch.update(masks)
    return batch


def eval_batches(
    distinct: DistinctStrings, batch_tokens: int, unseen: Tensor | None = None
) -> list[Batch]:
    """Distinct strings grouped by length into batches of at most ``batch_tokens`` tokens.

    Sorting by length first means each batch is padded only to its own longest row.
    """
    order = torch.argsort(distinct.lengths, stable=True)
    batches, start = [], 0
    while start < len(order):
        width = int(distinct.lengths[order[start]])
        stop = start
        # Grow the batch while its padded size (rows x longest row) fits the budget.
        while stop < len(order) and (stop - start + 1) * int(distinct.lengths[order[stop]]) <= max(
            batch_tokens, width
        ):
            stop += 1
        rows = order[start:stop]
        masks = {} if unseen is None else {"unseen": unseen[rows]}
        batches.append(
            make_batch(
                distinct.tokens[rows],
                distinct.labels[rows],
                distinct.counts[rows],
                distinct.lengths[rows],
                **masks,
            )
        )
        start = stop
    return batches


class DyckDataModule(GrokDataModule):
    """The paper's Dyck-1 depth task.

    Args:
        n_sequences: sequences generated in total (train + test).
        n_train: of those, the first ``n_train`` after the shuffle train.
        max_pairs: pairs per sequence are drawn from U{1..max_pairs}.
        context: context length (tokens); must hold ``2 * max_pairs``.
        p_open: probability of opening when both moves are legal.
        data_seed: seed of the ``random.Random`` that generates the corpus.
        split_seed: seed of the ``torch.randperm`` that shuffles it.
        batch_size: training rows per step, drawn with replacement.
        seed: seed of the training-batch generator.
        deduplicate: run each distinct string once, weighted by its count (same numbers,
            less work); ``False`` reproduces the plain row-by-row computation.
        eval_batch_tokens: padded-token budget of one evaluation batch.
        ood_sequences: size of the out-of-distribution set (0: none).
        ood_max_pairs / ood_context: its longer sequences (depth up to ``ood_max_pairs``).
        ood_seed: seed of its generator.
        head_covers_ood: one head class per depth of the OOD data too (see above).
        paper_protocol: initialise the model as the paper's code does and draw training
            batches from the paper's ``torch.randint`` stream that follows its
            initialisation (:mod:`grokedge.models.paper_init`), so that a run with seed s
            retraces the paper code's run with seed s. ``False``: the model's own
            initialisation and batches drawn from ``(seed, batch index)``.

    The head has a class per depth the training data can reach (13 for the paper's
    data), as in the paper's code; the OOD set's deeper labels are counted as errors (the
    model cannot emit them) and carry no loss, rather than crashing the evaluation as the
    paper's code does. ``head_covers_ood=True`` sizes the head to the OOD data instead
    (21 classes by default), at the price of the paper's trajectory.

    Example:
        >>> dm = DyckDataModule(ood_sequences=0)
        >>> dm.setup()
        >>> len(dm.train_sequences), len(dm.test_sequences)
        (50, 5000)
    """

    task_name = "dyck"
    probe_target_names = ("depth",)

    def __init__(
        self,
        n_sequences: int = 5050,
        n_train: int = 50,
        max_pairs: int = 12,
        context: int = 24,
        p_open: float = 0.55,
        data_seed: int = 0,
        split_seed: int = 0,
        batch_size: int = 50,
        seed: int = 0,
        deduplicate: bool = True,
        eval_batch_tokens: int = 16384,
        ood_sequences: int = 2560,
        ood_max_pairs: int = 20,
        ood_context: int = 48,
        ood_seed: int = 777,
        paper_protocol: bool = True,
        head_covers_ood: bool = False,
    ) -> None:
        super().__init__()
        if 2 * max_pairs > context:
            raise ValueError(
                f"task.datamodule.context={context} cannot hold max_pairs={max_pairs} "
                f"(needs >= {2 * max_pairs})"
            )
        if not 0 < n_train < n_sequences:
            raise ValueError(
                f"task.datamodule.n_train={n_train}: must be in 1..n_sequences-1 "
                f"(n_sequences={n_sequences})"
            )
        if ood_sequences and 2 * ood_max_pairs > ood_context:
            raise ValueError(
                f"task.datamodule.ood_context={ood_context} cannot hold "
                f"ood_max_pairs={ood_max_pairs}"
            )
        self.save_hyperparameters()
        self.eval_names = ("test", "train") + (("ood",) if ood_sequences else ())
        self._ready = False
        self._stream_start: Tensor | None = None

    # -- data -------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        h = self.hparams
        corpus = generate_corpus(h.n_sequences, h.max_pairs, h.p_open, h.data_seed)
        self.train_sequences, self.test_sequences = paper_split(corpus, h.n_train, h.split_seed)
        self.train_distinct = DistinctStrings.of(self.train_sequences)
        self.test_distinct = DistinctStrings.of(self.test_sequences)
        seen = set(self.train_distinct.strings)
        self.test_unseen = torch.tensor([s not in seen for s in self.test_distinct.strings])
        self.ood_distinct = (
            DistinctStrings.of(
                generate_corpus(h.ood_sequences, h.ood_max_pairs, h.p_open, h.ood_seed)
            )
            if h.ood_sequences
            else None
        )
        self._ready = True

    def model_dims(self) -> dict[str, int]:
        h = self.hparams
        covers_ood = h.head_covers_ood and h.ood_sequences
        deepest = max(h.max_pairs, h.ood_max_pairs if covers_ood else 0)
        longest = max(h.context, h.ood_context if h.ood_sequences else 0)
        return {"vocab_size": VOCAB_SIZE, "num_classes": deepest + 1, "max_len": longest}

    # -- batches ----------------------------------------------------------------------
    def init_model_(self, net: torch.nn.Module, seed: int) -> None:
        if not self.hparams.paper_protocol:
            return
        from grokedge.models.paper_init import init_like_paper_

        torch.manual_seed(seed)
        # The paper's head has a class per depth its data reaches: 0..max_pairs.
        self._stream_start = init_like_paper_(net, self.hparams.max_pairs + 1, extra_seed=seed)
        self._stream, self._stream_next = None, 0

    def _draw_rows(self, index: int) -> Tensor:
        """Row indices of training batch ``index`` (drawn with replacement)."""
        shape = (self.hparams.batch_size,)
        n = len(self.train_sequences)
        if self._stream_start is None:
            return torch.randint(0, n, shape, generator=batch_generator(self.hparams.seed, index))
        # The paper's stream is sequential: replay it from its start to reach ``index``
        # (cheap: one small draw per step), so batches stay a function of the index.
        if self._stream is None or self._stream_next > index:
            self._stream = torch.Generator()
            self._stream.set_state(self._stream_start)
            self._stream_next = 0
        while self._stream_next < index:
            torch.randint(0, n, shape, generator=self._stream)
            self._stream_next += 1
        self._stream_next += 1
        return torch.randint(0, n, shape, generator=self._stream)

    def sample_train_batch(self, index: int) -> Batch:
        """Training batch number ``index``: ``batch_size`` sequences drawn with replacement."""
        d = self.train_distinct
        rows = self._draw_rows(index)
        if not self.hparams.deduplicate:
            idx = d.index[rows]
            return make_batch(d.tokens[idx], d.labels[idx], torch.ones(len(idx)), d.lengths[idx])
        counts = torch.bincount(d.index[rows], minlength=len(d.strings))
        present = counts.nonzero().squeeze(1)
        return make_batch(
            d.tokens[present], d.labels[present], counts[present].float(), d.lengths[present]
        )

    def _eval_set(self, distinct: DistinctStrings, unseen: Tensor | None = None) -> list[Batch]:
        if self.hparams.deduplicate:
            return eval_batches(distinct, self.hparams.eval_batch_tokens, unseen)
        # One row per original sequence, in split order, each of weight 1.
        rows = distinct.index
        expanded = DistinctStrings(
            [distinct.strings[i] for i in rows.tolist()],
            distinct.tokens[rows],
            distinct.labels[rows],
            torch.ones(len(rows)),
            torch.arange(len(rows)),
            distinct.lengths[rows],
        )
        return eval_batches(
            expanded, self.hparams.eval_batch_tokens, None if unseen is None else unseen[rows]
        )

    def train_dataloader(self) -> DataLoader:
        return endless_loader(self.sample_train_batch, self.steps_done)

    def probe_targets(self, batch: Batch) -> dict[str, Tensor]:
        """Task variables for the hidden-state probes: name -> [B, T], ``IGNORE_INDEX``
        where not probed. Dyck: ``depth``, the nesting depth after each token (the labels,
        the paper's probe target)."""
        return {"depth": batch["labels"]}

    def val_dataloader(self) -> list[DataLoader]:
        sets = [
            self._eval_set(self.test_distinct, self.test_unseen),
            self._eval_set(self.train_distinct),
        ]
        if self.ood_distinct is not None:
            sets.append(self._eval_set(self.ood_distinct))
        return [fixed_batch_loader(s) for s in sets]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m grokedge.tasks.dyck",
        description="Print a split of the Dyck-1 data, one sequence a line, in split order.",
    )
    parser.add_argument("--part", choices=("train", "test"), required=True)
    parser.add_argument("--n-sequences", type=int, default=5050)
    parser.add_argument("--n-train", type=int, default=50)
    parser.add_argument("--max-pairs", type=int, default=12)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--split-seed", type=int, default=0)
    args = parser.parse_args(argv)
    corpus = generate_corpus(args.n_sequences, args.max_pairs, 0.55, args.data_seed)
    train, test = paper_split(corpus, args.n_train, args.split_seed)
    sys.stdout.write("".join(to_text(s) + "\n" for s in (train if args.part == "train" else test)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
