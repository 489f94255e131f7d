"""SCAN: grammar, interpretation, official split sizes, file format, CLI and DataModule.

Expected values are derived by hand from the grammar and the official data, never from
the code under test:

- commands: V = 4 U + 10 D + 5 heads x {opposite, around} x {left, right} = 34,
  S = 3 V = 102, C = S + 2 S^2 = 20,910;
- split sizes: the official files' line counts (``brendenlake/SCAN``; the template sizes
  as TensorFlow Datasets and the Hugging Face dataset card list them);
- action sequences: the interpretation rules applied by hand.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from grokedge.batch import IGNORE_INDEX
from grokedge.tasks import scan_grammar as G
from grokedge.tasks.scan import ScanDataModule, decode_actions, main

LT, RT = "I_TURN_LEFT", "I_TURN_RIGHT"
WALK, LOOK, RUN, JUMP = "I_WALK", "I_LOOK", "I_RUN", "I_JUMP"

N_COMMANDS = 102 + 2 * 102 * 102
ALL_WORDS = {
    "walk", "look", "run", "jump", "turn", "left", "right",
    "opposite", "around", "twice", "thrice", "and", "after",
}  # fmt: skip
ALL_ACTIONS = {WALK, LOOK, RUN, JUMP, LT, RT}
PRIMS = ("walk", "look", "run", "jump")

# (train, test) line counts of the official files.
OFFICIAL_SIZES = {
    "simple": (16_728, 4_182),
    "length": (16_990, 3_920),
    "addprim_jump": (14_670, 7_706),
    "addprim_turn_left": (21_890, 1_208),
    "jump_around_right": (18_528, 1_173),
    "around_right": (15_225, 4_476),
    "opposite_right": (15_225, 4_476),
    "right": (15_225, 4_476),
}
LINE_RE = re.compile(r"^IN: ([a-z ]+) OUT: ([A-Z_ ]+)$")


def _commands(pairs: list[G.Pair]) -> list[str]:
    return [c for c, _ in pairs]


def _has(command: str, phrase: str) -> bool:
    return re.search(rf"(^| ){phrase}( |$)", command) is not None


# ------------------------------------------------------------------------ the dataset
def test_all_commands_distinct_and_complete() -> None:
    pairs = G.all_pairs()
    assert len(pairs) == N_COMMANDS == 20_910
    assert len(set(_commands(pairs))) == N_COMMANDS


def test_vocabulary_and_lengths() -> None:
    pairs = G.all_pairs()
    words = {w for c, _ in pairs for w in c.split()}
    actions = {a for _, a in pairs for a in a.split()}
    assert words == ALL_WORDS
    assert actions == ALL_ACTIONS
    # Longest: "u around left thrice and u around left thrice".
    assert max(len(c.split()) for c, _ in pairs) == 9
    n_actions = [len(a.split()) for _, a in pairs]
    assert min(n_actions) == 1
    assert max(n_actions) == 48  # (8 actions x 3) twice
    assert "turn" not in _commands(pairs)
    assert not any(c.split()[-1] == "turn" or "turn twice" in c for c in _commands(pairs))


@pytest.mark.parametrize(
    ("command", "actions"),
    [
        ("jump", [JUMP]),
        ("turn left", [LT]),
        ("look right", [RT, LOOK]),
        ("turn opposite left", [LT, LT]),
        ("run opposite right", [RT, RT, RUN]),
        ("turn around right", [RT] * 4),
        ("jump around left twice", [LT, JUMP] * 8),
        ("walk opposite right thrice after run left", [LT, RUN] + [RT, RT, WALK] * 3),
        ("turn around right and look", [RT, RT, RT, RT, LOOK]),
        ("turn left twice", [LT, LT]),
        # README examples of the official repository.
        ("jump opposite left and walk thrice", [LT, LT, JUMP, WALK, WALK, WALK]),
        ("jump opposite left after walk around left", [LT, WALK] * 4 + [LT, LT, JUMP]),
        ("look thrice after jump opposite right thrice", [RT, RT, JUMP] * 3 + [LOOK] * 3),
    ],
)
def test_interpretation(command: str, actions: list[str]) -> None:
    assert G.interpret(command) == " ".join(actions)
    assert dict(G.all_pairs())[command] == " ".join(actions)


@pytest.mark.parametrize("bad", ["turn", "turn twice", "walk walk", "jump around", "left"])
def test_non_commands_rejected(bad: str) -> None:
    with pytest.raises(G.ScanParseError):
        G.interpret(bad)


def test_official_lines_reproduced() -> None:
    # Lines copied from the official tasks_test_template_opposite_right.txt.
    official = [
        "IN: turn left thrice and look opposite right OUT: I_TURN_LEFT I_TURN_LEFT "
        "I_TURN_LEFT I_TURN_RIGHT I_TURN_RIGHT I_LOOK",
        "IN: run opposite right after turn right OUT: I_TURN_RIGHT I_TURN_RIGHT I_TURN_RIGHT I_RUN",
        "IN: look opposite right and jump twice OUT: I_TURN_RIGHT I_TURN_RIGHT I_LOOK "
        "I_JUMP I_JUMP",
    ]
    table = dict(G.all_pairs())
    for line in official:
        command, actions = G.parse_line(line)
        assert table[command] == actions
        assert G.format_line(command, actions) == line


# ----------------------------------------------------------------------------- splits
@pytest.mark.parametrize("name", list(OFFICIAL_SIZES))
def test_split_sizes_and_disjointness(name: str) -> None:
    train, test = G.make_split(name)
    assert (len(train), len(test)) == OFFICIAL_SIZES[name]
    assert not set(_commands(train)) & set(_commands(test))


def test_simple_split_is_a_seeded_partition() -> None:
    train, test = G.simple_split(0.2, seed=0)
    assert sorted(train + test) == sorted(G.all_pairs())
    assert G.simple_split(0.2, seed=0) == (train, test)
    assert set(G.simple_split(0.2, seed=1)[1]) != set(test)
    assert len(G.simple_split(0.5, seed=0)[1]) == N_COMMANDS // 2


def test_length_split_threshold() -> None:
    train, test = G.length_split()
    assert max(len(a.split()) for _, a in train) == 22
    # S phrases have 1, 2, 3, 4, 6, 8, 9, 12, 16 or 24 actions; no two of them sum to 23.
    assert min(len(a.split()) for _, a in test) == 24


@pytest.mark.parametrize(
    ("name", "primitive", "n_repeats"),
    # Bare primitive = 10 % of training lines: n = (train - n) / 9.
    [("addprim_jump", "jump", 1_467), ("addprim_turn_left", "turn left", 2_189)],
)
def test_addprim_split(name: str, primitive: str, n_repeats: int) -> None:
    train, test = G.make_split(name)
    bare = [p for p in train if p[0] == primitive]
    assert len(bare) == n_repeats
    assert n_repeats * 10 == len(train)
    assert set(bare) == {(primitive, G.interpret(primitive))}
    assert all(_has(c, primitive) and c != primitive for c in _commands(test))
    assert not any(_has(c, primitive) for c in _commands(train) if c != primitive)
    # Every command but the bare primitive is in exactly one part.
    assert len(set(_commands(train)) | set(_commands(test))) == N_COMMANDS


def test_around_right_template() -> None:
    train, test = G.make_split("around_right")
    assert all(any(_has(c, f"{u} around right") for u in PRIMS) for c in _commands(test))
    assert not any(_has(c, "turn around right") for c in _commands(test))
    assert not any("around right" in c for c in _commands(train))
    assert any("around left" in c for c in _commands(train))


def test_right_template_keeps_other_right_modifiers_in_train() -> None:
    train, test = G.make_split("right")
    assert all(any(_has(c, f"{u} right") for u in PRIMS) for c in _commands(test))
    train_commands = set(_commands(train))
    assert not any(_has(c, f"{u} right") for c in train_commands for u in (*PRIMS, "turn"))
    assert "walk opposite right" in train_commands
    assert "jump around right twice" in train_commands


def test_jump_around_right_template() -> None:
    train, test = G.make_split("jump_around_right")
    assert all(_has(c, "jump around right") for c in _commands(test))
    assert "walk around right" in set(_commands(train))
    # 1,209 commands contain "jump around right"; the 36 that also contain "turn around
    # right" (3 x 3 S forms x 2 conjunctions x 2 orders) are in neither part.
    assert "jump around right and turn around right" not in set(_commands(train + test))


# ---------------------------------------------------------------------------- files
def test_read_split_file_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_text("IN: jump OUT: I_JUMP\n\nIN: walk left OUT: I_TURN_LEFT I_WALK\n")
    assert G.read_split_file(path) == [("jump", JUMP), ("walk left", f"{LT} {WALK}")]
    assert G.format_line("jump", JUMP) == "IN: jump OUT: I_JUMP"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        G.read_split_file(tmp_path / "missing.txt")


# ------------------------------------------------------------------------ DataModule
# Ids by hand: source 0 pad, then sorted words; target 0 pad, 1 bos, 2 eos, sorted actions.
SRC_ID = {"after": 1, "and": 2, "around": 3, "jump": 4, "left": 5, "look": 6, "opposite": 7,
          "right": 8, "run": 9, "thrice": 10, "turn": 11, "twice": 12, "walk": 13}  # fmt: skip
TGT_ID = {JUMP: 3, LOOK: 4, RUN: 5, LT: 6, RT: 7, WALK: 8}
EXPECTED_DIMS = dict(
    src_vocab_size=14, tgt_vocab_size=9, max_src_len=9, max_tgt_len=49, pad_id=0, bos_id=1,
    eos_id=2,
)  # fmt: skip


def test_model_dims_without_setup() -> None:
    assert ScanDataModule(split="length").model_dims() == EXPECTED_DIMS


def test_unknown_split_raises() -> None:
    with pytest.raises(ValueError, match=r"task\.datamodule\.split.*'bogus'.*around_right"):
        ScanDataModule(split="bogus")


def test_too_many_pairs_raises() -> None:
    dm = ScanDataModule(split="addprim_turn_left", n_test=1_209)
    with pytest.raises(ValueError, match=r"task\.datamodule\.n_test"):
        dm.setup()


def _write_split(root: Path, lines: dict[str, list[str]]) -> None:
    (root / "length_split").mkdir()
    for part, rows in lines.items():
        (root / "length_split" / f"tasks_{part}_length.txt").write_text("\n".join(rows) + "\n")


def test_data_dir_batches_by_hand(tmp_path: Path) -> None:
    _write_split(
        tmp_path,
        {
            "train": ["IN: jump twice OUT: I_JUMP I_JUMP", "IN: walk left OUT: I_TURN_LEFT I_WALK"],
            "test": ["IN: look around right OUT: " + " ".join([RT, LOOK] * 4)],
        },
    )
    dm = ScanDataModule(split="length", data_dir=str(tmp_path), n_train=None, n_test=None)
    dm.setup()
    assert dm.train_pairs == [("jump twice", f"{JUMP} {JUMP}"), ("walk left", f"{LT} {WALK}")]
    test_loader, train_loader = dm.val_dataloader()
    (train_batch,) = list(train_loader)
    assert train_batch["src"].tolist() == [
        [SRC_ID["jump"], SRC_ID["twice"]],
        [SRC_ID["walk"], SRC_ID["left"]],
    ]
    assert train_batch["tgt_in"].tolist() == [[1, 3, 3], [1, 6, 8]]
    assert train_batch["labels"].tolist() == [[3, 3, 2], [6, 8, 2]]
    assert train_batch["weight"].tolist() == [1.0, 1.0]
    assert train_batch["unseen"].tolist() == [False, False]
    (test_batch,) = list(test_loader)
    assert test_batch["src"].tolist() == [[SRC_ID["look"], SRC_ID["around"], SRC_ID["right"]]]
    assert test_batch["tgt_in"].tolist() == [[1] + [TGT_ID[RT], TGT_ID[LOOK]] * 4]
    assert test_batch["labels"].tolist() == [[TGT_ID[RT], TGT_ID[LOOK]] * 4 + [2]]
    assert test_batch["unseen"].tolist() == [True]


def test_data_dir_missing_file_names_path(tmp_path: Path) -> None:
    dm = ScanDataModule(split="around_right", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tasks_train_template_around_right.txt"):
        dm.setup()


def test_data_dir_padding_within_batch(tmp_path: Path) -> None:
    _write_split(
        tmp_path,
        {
            "train": [
                "IN: jump OUT: I_JUMP",
                "IN: turn right twice OUT: I_TURN_RIGHT I_TURN_RIGHT",
            ],
            "test": ["IN: run OUT: I_RUN"],
        },
    )
    dm = ScanDataModule(split="length", data_dir=str(tmp_path), n_train=None, n_test=None)
    (batch,) = list(dm.val_dataloader()[1])
    assert batch["src"].tolist() == [[4, 0, 0], [11, 8, 12]]
    assert batch["tgt_in"].tolist() == [[1, 3, 0], [1, 7, 7]]
    assert batch["labels"].tolist() == [[3, 2, IGNORE_INDEX], [7, 7, 2]]


def _check_row_contract(batch: dict[str, torch.Tensor]) -> None:
    src, tgt_in, labels = batch["src"], batch["tgt_in"], batch["labels"]
    assert src.dtype == tgt_in.dtype == labels.dtype == torch.long
    assert batch["weight"].dtype == torch.float32
    assert tgt_in.shape == labels.shape and src.shape[0] == labels.shape[0]
    assert (tgt_in[:, 0] == 1).all()
    valid = labels != IGNORE_INDEX
    assert ((labels == 2).sum(dim=1) == 1).all()  # one EOS per row
    # Teacher forcing: tgt_in is labels shifted right by one (BOS in front).
    assert (tgt_in[:, 1:][valid[:, 1:]] == labels[:, :-1][valid[:, 1:]]).all()
    assert (tgt_in[~valid] == 0).all()
    assert valid[:, -1].any()  # padded only to the batch's own longest row
    assert (src[:, -1] != 0).any()


def test_datamodule_paper_setup() -> None:
    dm = ScanDataModule(batch_size=64, eval_batch_size=300)
    assert dm.eval_names == ("test", "train")
    dm.setup()
    dm.setup()  # idempotent
    assert len(dm.train_pairs) == 2048 and len(dm.test_pairs) == 500
    assert not set(_commands(dm.train_pairs)) & set(_commands(dm.test_pairs))
    table = dict(G.all_pairs())
    assert all(table[c] == a for c, a in dm.train_pairs + dm.test_pairs)

    batch = next(iter(dm.train_dataloader()))
    assert batch["src"].shape[0] == 64 and batch["weight"].tolist() == [1.0] * 64
    _check_row_contract(batch)
    train_set = set(dm.train_pairs)
    for src_row, label_row in zip(batch["src"], batch["labels"], strict=True):
        words = [G.COMMAND_WORDS[i - 1] for i in src_row.tolist() if i != 0]
        assert (" ".join(words), " ".join(decode_actions(label_row))) in train_set

    # Batches are a function of (seed, index).
    a, b = dm.sample_train_batch(7), dm.sample_train_batch(7)
    assert torch.equal(a["src"], b["src"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(dm.sample_train_batch(8)["src"], a["src"])

    test_loader, train_loader = dm.val_dataloader()
    test_batches, train_batches = list(test_loader), list(train_loader)
    assert [len(x["weight"]) for x in test_batches] == [300, 200]
    assert [len(x["weight"]) for x in train_batches] == [300] * 6 + [248]
    for x in test_batches + train_batches:
        _check_row_contract(x)
    assert all(x["unseen"].all() for x in test_batches)
    assert not any(x["unseen"].any() for x in train_batches)


def test_subsample_is_seeded() -> None:
    first = ScanDataModule(split="around_right", n_train=100, n_test=50, sample_seed=3)
    again = ScanDataModule(split="around_right", n_train=100, n_test=50, sample_seed=3)
    other = ScanDataModule(split="around_right", n_train=100, n_test=50, sample_seed=4)
    for dm in (first, again, other):
        dm.setup()
    assert first.train_pairs == again.train_pairs and first.test_pairs == again.test_pairs
    assert first.train_pairs != other.train_pairs


def test_decode_actions() -> None:
    ids = [1, TGT_ID[LT], TGT_ID[JUMP], 2, TGT_ID[WALK], 0]
    assert decode_actions(ids) == [LT, JUMP]
    assert decode_actions(torch.tensor([TGT_ID[RUN], 2, IGNORE_INDEX])) == [RUN]


# ------------------------------------------------------------------------------- CLI
CLI = [sys.executable, "-m", "grokedge.tasks.scan"]
CLI_ARGS = {
    "format": ["--split", "jump_around_right", "--part", "test"],
    "unknown": ["--split", "bogus", "--part", "test"],
}
CLI_TIMEOUT_S = 120


@pytest.fixture(scope="module", autouse=True)
def cli_runs() -> Iterator[dict[str, subprocess.Popen[str]]]:
    """Both CLI processes, started with the module's first test so that their interpreter
    start-up (torch and Lightning imports) overlaps the in-process tests."""
    procs = {
        name: subprocess.Popen(
            CLI + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, args in CLI_ARGS.items()
    }
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_cli_prints_official_format(cli_runs: dict[str, subprocess.Popen[str]]) -> None:
    proc = cli_runs["format"]
    out, err = proc.communicate(timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 1_173
    table = dict(G.all_pairs())
    for line in lines:
        m = LINE_RE.match(line)
        assert m is not None, line
        assert "jump around right" in m.group(1)
        assert table[m.group(1)] == m.group(2)


def test_cli_unknown_split_exit_code(cli_runs: dict[str, subprocess.Popen[str]]) -> None:
    proc = cli_runs["unknown"]
    out, err = proc.communicate(timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 2
    assert out == ""
    err_lines = err.strip().splitlines()
    assert len(err_lines) == 1 and "bogus" in err_lines[0] and "around_right" in err_lines[0]


def test_cli_subsampling_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--split", "simple", "--part", "train", "--n-train", "2048"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2048 and all(LINE_RE.match(x) for x in lines)
    assert main(["--split", "addprim_jump", "--part", "train", "--all", "--n-train", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 14_670
    assert lines.count("IN: jump OUT: I_JUMP") == 1_467
