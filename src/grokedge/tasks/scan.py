"""SCAN as a sequence-to-sequence DataModule, and a CLI that prints the splits.

The data is generated in memory from the grammar (:mod:`grokedge.tasks.scan_grammar`), or
read from the official split files when ``data_dir`` is given. Batches follow the seq2seq
contract of :mod:`grokedge.tasks.base`::

    src     LongTensor  [B, S]  command word ids, right-padded with PAD_ID (0)
    tgt_in  LongTensor  [B, L]  BOS + action ids, right-padded with PAD_ID
    labels  LongTensor  [B, L]  action ids + EOS, IGNORE_INDEX at padding
    weight  FloatTensor [B]     ones
    unseen  BoolTensor  [B]     (evaluation batches only) command not among the training pairs

``S`` and ``L`` are each batch's own maxima (``L`` = actions + 1).

CLI::

    python -m grokedge.tasks.scan --split around_right --part test > test.txt
    python -m grokedge.tasks.scan --split simple --part train --n-train 2048
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from functools import cached_property

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from grokedge.batch import IGNORE_INDEX, Batch
from grokedge.tasks import scan_grammar as G
from grokedge.tasks.base import (
    GrokDataModule,
    batch_generator,
    endless_loader,
    fixed_batch_loader,
)

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
SRC_SPECIALS: tuple[str, ...] = ("<pad>",)
"""Source vocabulary prefix: only padding (commands need no BOS/EOS)."""
TGT_SPECIALS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>")
"""Target vocabulary prefix, in id order PAD_ID, BOS_ID, EOS_ID."""

SRC_VOCAB: tuple[str, ...] = SRC_SPECIALS + G.COMMAND_WORDS
"""id -> token of the source side: 0 padding, then the 13 command words sorted."""
TGT_VOCAB: tuple[str, ...] = TGT_SPECIALS + G.ACTIONS
"""id -> token of the target side: 0/1/2 specials, then the 6 actions sorted."""
SRC_IDS: dict[str, int] = {w: i for i, w in enumerate(SRC_VOCAB)}
TGT_IDS: dict[str, int] = {a: i for i, a in enumerate(TGT_VOCAB)}

_CONFIG_PREFIX = "task.datamodule"
# The train and test subsamples use different random streams from one sample_seed, so
# changing n_train does not change which test pairs are drawn.
_SAMPLE_STREAMS = {"train": 0, "test": 1}
_N_STREAMS = len(_SAMPLE_STREAMS)


def _sample_seed(sample_seed: int, part: str) -> int:
    return sample_seed * _N_STREAMS + _SAMPLE_STREAMS[part]


def _config_error(key: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"{_CONFIG_PREFIX}.{key}={value!r} is invalid; allowed: {allowed}")


def _max_lengths() -> tuple[int, int]:
    """(most command words, most actions) over the whole generated dataset: (9, 48)."""
    pairs = G.all_pairs()
    return (
        max(len(c.split()) for c, _ in pairs),
        max(len(a.split()) for _, a in pairs),
    )


def encode_pairs(pairs: Sequence[G.Pair]) -> Batch:
    """Encode pairs into one batch padded to its own longest command / action sequence.

    Returns ``src`` [B, S], ``tgt_in`` [B, L], ``labels`` [B, L] (L = most actions + 1)
    and ``weight`` [B]. Raises ValueError for a word or action outside the vocabulary.
    """
    if not pairs:
        raise ValueError("cannot encode an empty list of SCAN pairs")
    srcs: list[list[int]] = []
    tgts: list[list[int]] = []
    for command, actions in pairs:
        try:
            srcs.append([SRC_IDS[w] for w in command.split()])
            tgts.append([TGT_IDS[a] for a in actions.split()])
        except KeyError as err:
            raise ValueError(f"token {err.args[0]!r} is not SCAN ({command!r})") from None
    n = len(pairs)
    s_len = max(len(s) for s in srcs)
    l_len = max(len(t) for t in tgts) + 1  # + BOS on tgt_in, + EOS on labels
    src = torch.full((n, s_len), PAD_ID, dtype=torch.long)
    tgt_in = torch.full((n, l_len), PAD_ID, dtype=torch.long)
    labels = torch.full((n, l_len), IGNORE_INDEX, dtype=torch.long)
    for i, (s, t) in enumerate(zip(srcs, tgts, strict=True)):
        src[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        tgt_in[i, : len(t) + 1] = torch.tensor([BOS_ID, *t], dtype=torch.long)
        labels[i, : len(t) + 1] = torch.tensor([*t, EOS_ID], dtype=torch.long)
    return {"src": src, "tgt_in": tgt_in, "labels": labels, "weight": torch.ones(n)}


def decode_actions(ids: Sequence[int] | Tensor) -> list[str]:
    """Action names of a target id sequence [L]: stops at EOS, skips PAD and BOS.

    Works on ``labels`` rows, ``tgt_in`` rows and greedy decoder outputs alike.
    ``IGNORE_INDEX`` entries are skipped like padding.
    """
    seq = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    out: list[str] = []
    for i in seq:
        if i == EOS_ID:
            break
        if i in (PAD_ID, BOS_ID, IGNORE_INDEX):
            continue
        if not 0 <= i < len(TGT_VOCAB):
            raise ValueError(f"target id {i} is outside the SCAN vocabulary")
        out.append(TGT_VOCAB[i])
    return out


class ScanDataModule(GrokDataModule):
    """SCAN split -> seq2seq batches (see the module docstring for the batch layout).

    Training draws ``batch_size`` rows uniformly with replacement from the (subsampled)
    training pairs, endlessly; batch ``k`` uses the generator ``batch_generator(seed, k)``.
    Evaluation is ``[test, train]`` as pre-built batches of at most ``eval_batch_size``
    rows.

    Args:
        split: one of :data:`grokedge.tasks.scan_grammar.SPLITS`.
        simple_test_fraction: test share of the ``simple`` split.
        split_seed: seed of the ``simple`` split's shuffle.
        n_train: training pairs drawn (without replacement, ``sample_seed``) from the
            split's train part; None = all.
        n_test: likewise from the test part.
        sample_seed: seed of those two draws.
        batch_size: rows per training batch.
        eval_batch_size: most rows per evaluation batch.
        data_dir: read the official ``tasks_{train,test}_*.txt`` files from this folder
            (a clone of the official repository, or the files side by side) instead of
            generating the split; ``simple_test_fraction`` and ``split_seed`` are unused.
        seed: seed of the training-batch sampler.
    """

    task_name = "scan"
    probe_target_names = ("remaining", "emitted")

    def __init__(
        self,
        *,
        split: str = "simple",
        simple_test_fraction: float = G.DEFAULT_SIMPLE_TEST_FRACTION,
        split_seed: int = 0,
        n_train: int | None = 2048,
        n_test: int | None = 500,
        sample_seed: int = 0,
        batch_size: int = 256,
        eval_batch_size: int = 1024,
        data_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if split not in G.SPLITS:
            raise _config_error("split", split, ", ".join(G.SPLITS))
        if not 0.0 < simple_test_fraction < 1.0:
            raise _config_error("simple_test_fraction", simple_test_fraction, "0 < f < 1")
        for key, value in (("n_train", n_train), ("n_test", n_test)):
            if value is not None and value < 1:
                raise _config_error(key, value, "a positive integer or null (all)")
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise _config_error(key, value, "a positive integer")
        self.save_hyperparameters()
        self.split = split
        self.simple_test_fraction = simple_test_fraction
        self.split_seed = split_seed
        self.n_train = n_train
        self.n_test = n_test
        self.sample_seed = sample_seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.data_dir = data_dir
        self.seed = seed
        self.eval_names = ("test", "train")
        self.train_pairs: list[G.Pair] = []
        self.test_pairs: list[G.Pair] = []
        self._train_table: Batch | None = None
        self._eval_batches: dict[str, list[Batch]] = {}

    # ------------------------------------------------------------------ dimensions
    @cached_property
    def _max_lens(self) -> tuple[int, int]:
        return _max_lengths()

    def model_dims(self) -> dict[str, int]:
        """Vocabulary sizes, maximum lengths (``max_tgt_len`` counts BOS/EOS) and special ids.

        Computed from the grammar, so it needs no ``setup()``.
        """
        max_words, max_actions = self._max_lens
        return dict(
            src_vocab_size=len(SRC_VOCAB),
            tgt_vocab_size=len(TGT_VOCAB),
            max_src_len=max_words,
            max_tgt_len=max_actions + 1,
            pad_id=PAD_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
        )

    @staticmethod
    def decode_actions(ids: Sequence[int] | Tensor) -> list[str]:
        """See :func:`decode_actions`."""
        return decode_actions(ids)

    # ----------------------------------------------------------------------- data
    def _split_parts(self) -> tuple[list[G.Pair], list[G.Pair]]:
        if self.data_dir is None:
            return G.make_split(
                self.split,
                simple_test_fraction=self.simple_test_fraction,
                split_seed=self.split_seed,
            )
        train = G.read_split_file(G.find_official_file(self.data_dir, self.split, "train"))
        test = G.read_split_file(G.find_official_file(self.data_dir, self.split, "test"))
        return train, test

    def _draw(self, pairs: list[G.Pair], n: int | None, part: str) -> list[G.Pair]:
        key = "n_train" if part == "train" else "n_test"
        if n is not None and n > len(pairs):
            raise _config_error(
                key, n, f"at most {len(pairs)} (the {part} part of split {self.split!r}) or null"
            )
        return G.subsample(pairs, n, _sample_seed(self.sample_seed, part))

    def setup(self, stage: str | None = None) -> None:
        """Build the pairs, the training table and the evaluation batches (once)."""
        if self._train_table is not None:
            return
        train_all, test_all = self._split_parts()
        train = self._draw(train_all, self.n_train, "train")
        test = self._draw(test_all, self.n_test, "test")
        # Encoding validates the vocabulary of file-read data; the model's position tables
        # (model_dims) are sized from the grammar, so longer rows must fail here.
        table = encode_pairs(train)
        max_words, max_actions = self._max_lens
        for part, batch in (("train", table), ("test", encode_pairs(test))):
            if batch["src"].shape[1] > max_words or batch["labels"].shape[1] > max_actions + 1:
                raise ValueError(f"SCAN {part} pairs are longer than the grammar allows")
        self.train_pairs, self.test_pairs = train, test
        # Per-row lengths let each sampled batch be trimmed to its own longest row.
        table["src_len"] = (table["src"] != PAD_ID).sum(dim=1)
        table["tgt_len"] = (table["labels"] != IGNORE_INDEX).sum(dim=1)
        self._train_table = table
        train_commands = {c for c, _ in train}
        self._eval_batches = {
            "test": self._eval_set(test, train_commands),
            "train": self._eval_set(train, train_commands),
        }

    def _eval_set(self, pairs: list[G.Pair], train_commands: set[str]) -> list[Batch]:
        """Pre-built batches of at most ``eval_batch_size`` rows, each padded to its own max."""
        batches = []
        for start in range(0, len(pairs), self.eval_batch_size):
            chunk = pairs[start : start + self.eval_batch_size]
            batch = encode_pairs(chunk)
            batch["unseen"] = torch.tensor([c not in train_commands for c, _ in chunk])
            batches.append(batch)
        return batches

    def sample_train_batch(self, index: int) -> Batch:
        """Training batch number ``index``: ``batch_size`` rows drawn uniformly with replacement.

        A pure function of (``seed``, ``index``) via :func:`batch_generator`, so a resumed
        run draws the same batches as an uninterrupted one. ``src`` [B, S] and ``tgt_in`` /
        ``labels`` [B, L] are trimmed to the batch's own longest row.
        """
        self.setup()
        table = self._train_table
        assert table is not None
        n_rows = table["src"].shape[0]
        idx = torch.randint(n_rows, (self.batch_size,), generator=batch_generator(self.seed, index))
        s_len = int(table["src_len"][idx].max())
        l_len = int(table["tgt_len"][idx].max())
        return {
            "src": table["src"][idx, :s_len],
            "tgt_in": table["tgt_in"][idx, :l_len],
            "labels": table["labels"][idx, :l_len],
            "weight": torch.ones(self.batch_size),
        }

    def train_dataloader(self) -> DataLoader:
        """Endless batches ``sample_train_batch(k)`` from ``k`` = the steps already done."""
        self.setup()
        return endless_loader(self.sample_train_batch, self.steps_done)

    def probe_targets(self, batch: Batch) -> dict[str, Tensor]:
        """Task variables for the hidden-state probes: name -> [B, L] over the decoder
        positions, ``IGNORE_INDEX`` at padding.

        ``remaining``: the number of actions still to be emitted from each decoder position
        on (the first position of a row with n actions: n; the EOS position: 0). The
        action at a position is a category, not a quantity a regression probe can score
        (R² of class ids means nothing); the count the decoder must carry to stop at the
        right length is SCAN's analogue of Dyck's depth: a counter over the output that a
        correct model must represent.

        ``emitted``: the actions already emitted before the position (0 at the first). A
        control rather than a task variable: the decoder's positional encoding carries it
        whatever the network learned, so a functional R² on it says how much moving θ
        along the edge moves a position code (docs/classes.md).
        """
        labels = batch["labels"]
        valid = labels != IGNORE_INDEX
        length = valid.sum(dim=1, keepdim=True)  # actions + EOS
        position = torch.arange(labels.shape[1], device=labels.device)[None, :]
        return {
            "remaining": torch.where(valid, length - 1 - position, IGNORE_INDEX),
            "emitted": torch.where(valid, position.expand_as(labels), IGNORE_INDEX),
        }

    def val_dataloader(self) -> list[DataLoader]:
        """``[test_loader, train_loader]`` (the order of ``eval_names``)."""
        self.setup()
        return [fixed_batch_loader(self._eval_batches[name]) for name in self.eval_names]


# ------------------------------------------------------------------------------ CLI
EXIT_USAGE = 2
"""Exit status for a bad command line (argparse's convention)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m grokedge.tasks.scan",
        description="Print a SCAN split part in the official format, one "
        "'IN: <command> OUT: <actions>' line per pair, in split order.",
    )
    p.add_argument("--split", required=True, help=f"one of: {', '.join(G.SPLITS)}")
    p.add_argument(
        "--part",
        required=True,
        choices=("train", "test", "all"),
        help="train or test part of the split; 'all' prints every SCAN command "
        "(the content of the official tasks.txt, in grammar order)",
    )
    p.add_argument(
        "--all",
        action="store_true",
        help="print the whole part, ignoring --n-train/--n-test (the default without them)",
    )
    p.add_argument("--n-train", type=int, default=None, help="subsample the train part")
    p.add_argument("--n-test", type=int, default=None, help="subsample the test part")
    p.add_argument("--sample-seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=0, help="seed of the simple split")
    p.add_argument("--simple-test-fraction", type=float, default=G.DEFAULT_SIMPLE_TEST_FRACTION)
    p.add_argument("--data-dir", default=None, help="read the official files from here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.split not in G.SPLITS:
        print(
            f"error: unknown SCAN split {args.split!r}; allowed: {', '.join(G.SPLITS)}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.part == "all":
        pairs = G.all_pairs()
    else:
        n = None if args.all else (args.n_train if args.part == "train" else args.n_test)
        try:
            dm = ScanDataModule(
                split=args.split,
                simple_test_fraction=args.simple_test_fraction,
                split_seed=args.split_seed,
                n_train=n if args.part == "train" else None,
                n_test=n if args.part == "test" else None,
                sample_seed=args.sample_seed,
                data_dir=args.data_dir,
            )
            train_all, test_all = dm._split_parts()
            pairs = dm._draw(train_all if args.part == "train" else test_all, n, args.part)
        except (ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_USAGE
    try:
        sys.stdout.write("".join(line + "\n" for line in G.format_lines(pairs)))
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader (e.g. `head`) went away: not an error of ours. Point stdout at devnull
        # so that the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
