"""SCAN (Lake & Baroni, 2018) generated from its grammar, with the official train/test splits.

Pure Python, no torch. Everything is rebuilt in memory, so no download is needed; the
generator can be checked line for line against the official files of
``github.com/brendenlake/SCAN`` with :func:`read_split_file`.

Grammar (``D[1] opposite D[2]`` and ``D[1] around D[2]`` share D's direction word)::

    C -> S and S | S after S | S
    S -> V twice | V thrice | V
    V -> D[1] opposite D[2] | D[1] around D[2] | D | U
    D -> U left | U right | turn left | turn right
    U -> walk | look | run | jump

"turn" alone is not a command: it only occurs in ``turn left|right``,
``turn opposite left|right`` and ``turn around left|right``.

Interpretation::

    walk -> I_WALK, look -> I_LOOK, run -> I_RUN, jump -> I_JUMP
    turn left -> LT                     turn right -> RT
    u left -> LT u                      u right -> RT u
    turn opposite left -> LT LT         u opposite left -> LT LT u
    turn around left -> LT LT LT LT     u around left -> LT u LT u LT u LT u
    (and likewise with right/RT)
    x twice -> x x      x thrice -> x x x
    x1 and x2 -> x1 x2  x1 after x2 -> x2 x1

with ``LT = I_TURN_LEFT`` and ``RT = I_TURN_RIGHT``.

A *pair* is ``(command, actions)``: two strings of space-separated words, exactly as a line
``IN: <command> OUT: <actions>`` of the official files carries them. Every split function
returns ``(train, test)``, two ordered lists of pairs.

Splits (names are the ``task.datamodule.split`` values)

``simple``
    Random ``1 - f`` / ``f`` split of all 20,910 commands (``f = 0.2``: 16,728 / 4,182,
    the official sizes). The official random split was drawn with an unpublished random
    state, so its exact membership cannot be regenerated; ours is seeded (``seed``).
``length``
    Train: action sequences of at most 22 actions; test: longer ones (16,990 / 3,920).
``addprim_jump``, ``addprim_turn_left``
    Test: every command that contains the primitive (as a whole-word phrase) except the
    bare primitive itself. Train: every command without the primitive, plus the bare
    primitive line repeated ``n`` times so that it makes up exactly 10 % of the training
    lines: ``n / (n + m) = 0.1``, i.e. ``n = m / 9`` for ``m`` commands without the
    primitive. ``jump``: m = 13,203, n = 1,467, 14,670 / 7,706. ``turn left``: m = 19,701,
    n = 2,189, 21,890 / 1,208. Both ``m`` are multiples of 9, so the rule is exact (the
    official README: "over-represented to consist of 10% of the samples"). The repeated
    lines are appended after the other training commands. Checked against the official
    data: ``tasks_{train,test}_addprim_turn_left.txt`` have exactly the length in
    characters of our parts, and the ``jump`` test part the size the official one has.
``jump_around_right``, ``around_right``, ``opposite_right``, ``right``
    Loula, Baroni & Lake (2018) template splits for a modifier ``T`` (``around right``,
    ``opposite right``, ``right``). Test: commands containing ``<u> T`` for a primitive
    ``u`` (only ``jump`` for ``jump_around_right``); train: commands containing no
    ``<u> T``; commands containing ``turn T`` are in *neither* part. Sizes: 18,528 / 1,173
    for ``jump_around_right``, 15,225 / 4,476 for the other three. The official README
    does not state the rule; it was inferred from these sizes and confirmed by the exact
    character counts of the official files (see :data:`TEMPLATE_SPLITS`).

Order: the generated parts follow the grammar order of :func:`all_pairs` (``simple`` is
shuffled by its seed); the official files are shuffled and their order is not reproduced.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

Pair = tuple[str, str]
"""``(command, actions)``: space-separated command words and action names."""

# ---------------------------------------------------------------- vocabulary and semantics
PRIMITIVES: tuple[str, ...] = ("walk", "look", "run", "jump")
"""The U non-terminal: primitives that denote an action."""
TURN = "turn"
DIRECTIONS: tuple[str, ...] = ("left", "right")
OPPOSITE = "opposite"
AROUND = "around"
AND = "and"
AFTER = "after"
REPEATS: dict[str, int] = {"twice": 2, "thrice": 3}
"""S -> V twice | V thrice: number of times the V's action sequence is repeated."""

PRIMITIVE_ACTION: dict[str, str] = {
    "walk": "I_WALK",
    "look": "I_LOOK",
    "run": "I_RUN",
    "jump": "I_JUMP",
}
TURN_ACTION: dict[str, str] = {"left": "I_TURN_LEFT", "right": "I_TURN_RIGHT"}

OPPOSITE_TURNS = 2
"""``x opposite d``: turn twice towards d (half a turn) before x."""
AROUND_STEPS = 4
"""``x around d``: four times (turn towards d, then x): a full circle."""

COMMAND_WORDS: tuple[str, ...] = tuple(
    sorted({*PRIMITIVES, TURN, *DIRECTIONS, OPPOSITE, AROUND, AND, AFTER, *REPEATS})
)
"""The 13 distinct command words, sorted."""
ACTIONS: tuple[str, ...] = tuple(sorted({*PRIMITIVE_ACTION.values(), *TURN_ACTION.values()}))
"""The 6 distinct actions, sorted."""

N_COMMANDS = 20_910
"""Number of distinct SCAN commands the grammar generates."""
LENGTH_SPLIT_MAX_TRAIN_ACTIONS = 22
"""Length split: training action sequences have at most this many actions."""
ADDPRIM_FRACTION = 0.1
"""Add-primitive splits: share of the training lines that are the bare primitive."""
DEFAULT_SIMPLE_TEST_FRACTION = 0.2

# Official line format: "IN: <command> OUT: <actions>".
IN_MARK = "IN:"
OUT_MARK = "OUT:"


class ScanParseError(ValueError):
    """A command that the SCAN grammar does not generate."""


def _interpret_v(words: Sequence[str]) -> list[str]:
    """Actions of a V phrase (1 to 3 words)."""
    if len(words) == 1 and words[0] in PRIMITIVE_ACTION:
        return [PRIMITIVE_ACTION[words[0]]]
    if len(words) == 2 and words[1] in TURN_ACTION:
        head, turn = words[0], TURN_ACTION[words[1]]
        if head == TURN:
            return [turn]
        if head in PRIMITIVE_ACTION:
            return [turn, PRIMITIVE_ACTION[head]]
    if len(words) == 3 and words[1] in (OPPOSITE, AROUND) and words[2] in TURN_ACTION:
        head, turn = words[0], TURN_ACTION[words[2]]
        # "turn" contributes no action of its own, a primitive contributes one.
        if head == TURN:
            act: list[str] = []
        elif head in PRIMITIVE_ACTION:
            act = [PRIMITIVE_ACTION[head]]
        else:
            raise ScanParseError(f"not a SCAN V phrase: {' '.join(words)!r}")
        if words[1] == OPPOSITE:
            return [turn] * OPPOSITE_TURNS + act
        return ([turn] + act) * AROUND_STEPS
    raise ScanParseError(f"not a SCAN V phrase: {' '.join(words)!r}")


def _interpret_s(words: Sequence[str]) -> list[str]:
    """Actions of an S phrase: V, V twice or V thrice."""
    if words and words[-1] in REPEATS:
        return _interpret_v(words[:-1]) * REPEATS[words[-1]]
    return _interpret_v(words)


def interpret(command: str) -> str:
    """The action sequence of a SCAN command, as space-separated action names.

    Parses the command itself (independent of :func:`all_pairs`' enumeration).
    Raises :class:`ScanParseError` for strings the grammar does not generate.
    """
    words = command.split()
    for conj in (AND, AFTER):
        if conj in words:
            i = words.index(conj)
            first, second = _interpret_s(words[:i]), _interpret_s(words[i + 1 :])
            # "x1 after x2" executes x2 first.
            return " ".join(first + second if conj == AND else second + first)
    return " ".join(_interpret_s(words))


# ------------------------------------------------------------------------- enumeration
def _v_phrases() -> list[str]:
    """All 34 V phrases: U, D, and the opposite/around forms over U and turn."""
    heads = (*PRIMITIVES, TURN)
    phrases: list[str] = list(PRIMITIVES)
    phrases += [f"{h} {d}" for h in heads for d in DIRECTIONS]
    phrases += [f"{h} {m} {d}" for m in (OPPOSITE, AROUND) for h in heads for d in DIRECTIONS]
    return phrases


def _s_phrases() -> list[str]:
    """All 102 S phrases: each V bare, twice and thrice."""
    return [f"{v} {r}".rstrip() for v in _v_phrases() for r in ("", *REPEATS)]


_ALL_PAIRS: list[Pair] | None = None


def all_pairs() -> list[Pair]:
    """Every distinct SCAN command with its actions, in grammar order (20,910 pairs).

    Order: the 102 single S phrases, then ``S and S`` for all ordered pairs, then
    ``S after S`` (both S loops in :func:`_s_phrases` order). The official ``tasks.txt``
    is shuffled; its order is not reproduced.
    """
    global _ALL_PAIRS
    if _ALL_PAIRS is None:
        s = _s_phrases()
        commands = list(s)
        for conj in (AND, AFTER):
            commands += [f"{a} {conj} {b}" for a in s for b in s]
        if len(set(commands)) != len(commands):  # pragma: no cover - grammar invariant
            raise AssertionError("the SCAN enumeration produced a duplicate command")
        _ALL_PAIRS = [(c, interpret(c)) for c in commands]
    return list(_ALL_PAIRS)


def contains_phrase(command: str, phrase: str) -> bool:
    """Whether ``phrase`` occurs in ``command`` as a run of whole words."""
    return f" {phrase} " in f" {command} "


# ------------------------------------------------------------------------------ splits
def simple_split(
    test_fraction: float = DEFAULT_SIMPLE_TEST_FRACTION, seed: int = 0
) -> tuple[list[Pair], list[Pair]]:
    """Random split: ``round(test_fraction * 20,910)`` test commands, the rest train.

    Both parts are in the shuffled order of ``random.Random(seed)``. This is not the
    official file's membership (its random state is unpublished), only its sizes.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    pairs = all_pairs()
    random.Random(seed).shuffle(pairs)
    n_test = round(test_fraction * len(pairs))
    return pairs[n_test:], pairs[:n_test]


def length_split() -> tuple[list[Pair], list[Pair]]:
    """Train: at most 22 actions (16,990 pairs); test: 23 to 48 actions (3,920)."""
    train: list[Pair] = []
    test: list[Pair] = []
    for pair in all_pairs():
        short = len(pair[1].split()) <= LENGTH_SPLIT_MAX_TRAIN_ACTIONS
        (train if short else test).append(pair)
    return train, test


def addprim_split(primitive: str) -> tuple[list[Pair], list[Pair]]:
    """Add-primitive split for ``primitive`` (``"jump"`` or ``"turn left"``).

    Test: commands containing ``primitive`` other than the bare command. Train: the ``m``
    commands without it, then the bare primitive line repeated ``n = m * 0.1 / 0.9``
    times (10 % of the training lines); ``m`` must make ``n`` whole.
    """
    bare = (primitive, interpret(primitive))
    train: list[Pair] = []
    test: list[Pair] = []
    for pair in all_pairs():
        if pair[0] == primitive:
            continue
        (test if contains_phrase(pair[0], primitive) else train).append(pair)
    n_repeat_exact = len(train) * ADDPRIM_FRACTION / (1.0 - ADDPRIM_FRACTION)
    n_repeat = round(n_repeat_exact)
    if abs(n_repeat - n_repeat_exact) > 1e-6:  # pragma: no cover - holds for SCAN
        raise AssertionError(f"{primitive!r}: {len(train)} lines give no whole 10 % share")
    return train + [bare] * n_repeat, test


@dataclass(frozen=True)
class TemplateSplit:
    """A template split (Loula, Baroni & Lake, 2018) as phrase rules.

    ``held_out``: the templates the split is about, instantiated with real primitives
    (e.g. ``walk around right`` ... ``jump around right``).
    ``dropped``: the same template with ``turn`` in the primitive slot (``turn around
    right``). ``turn`` is no action of its own, so the official files keep these commands
    out of training *and* out of test.

    A command is in test iff it contains a ``held_out`` phrase and no ``dropped`` phrase;
    in train iff it contains neither; every command containing a ``dropped`` phrase is in
    neither part.
    """

    held_out: tuple[str, ...]
    dropped: tuple[str, ...]


def _template(modifier: str, primitives: Sequence[str] = PRIMITIVES) -> TemplateSplit:
    """``<u> <modifier>`` held out for each ``u`` in ``primitives``; ``turn <modifier>`` dropped."""
    return TemplateSplit(
        held_out=tuple(f"{u} {modifier}" for u in primitives),
        dropped=(f"{TURN} {modifier}",),
    )


TEMPLATE_SPLITS: dict[str, TemplateSplit] = {
    # Official sizes (train / test): 18,528 / 1,173.
    "jump_around_right": _template(f"{AROUND} right", primitives=("jump",)),
    # Each: 15,225 / 4,476.
    "around_right": _template(f"{AROUND} right"),
    "opposite_right": _template(f"{OPPOSITE} right"),
    "right": _template("right"),
}
"""The four template splits.

The rule was inferred from the official sizes and checked against the official data's
sizes in characters: the files ``tasks_{train,test}_template_{opposite_right,right}.txt``
have exactly the length of our parts written with :func:`format_line`, and the summed
command + action lengths of all four test parts equal those implied by the byte sizes
the Hugging Face ``scan`` dataset card lists for the official files. Phrases match whole words, so
``walk right`` does not match ``walk opposite right``: in the ``right`` split, commands
with ``walk opposite right`` but no ``<u> right`` stay in train. The held-out ``jump
around right`` commands that also contain ``turn around right`` (36 of 1,209) are in
neither part, which is why that test part has 1,173 commands, not 1,209.
"""


def template_split(name: str) -> tuple[list[Pair], list[Pair]]:
    """Template split ``name`` (a key of :data:`TEMPLATE_SPLITS`), in grammar order."""
    spec = TEMPLATE_SPLITS[name]
    train: list[Pair] = []
    test: list[Pair] = []
    for pair in all_pairs():
        if any(contains_phrase(pair[0], p) for p in spec.dropped):
            continue
        if any(contains_phrase(pair[0], p) for p in spec.held_out):
            test.append(pair)
        else:
            train.append(pair)
    return train, test


# ---------------------------------------------------------------------- split registry
ADDPRIM_SPLITS: dict[str, str] = {"addprim_jump": "jump", "addprim_turn_left": "turn left"}
"""Add-primitive split name -> the primitive command it adds."""

SPLITS: tuple[str, ...] = ("simple", "length", *ADDPRIM_SPLITS, *TEMPLATE_SPLITS)
"""Every split name (the allowed values of ``task.datamodule.split``)."""


def make_split(
    name: str,
    *,
    simple_test_fraction: float = DEFAULT_SIMPLE_TEST_FRACTION,
    split_seed: int = 0,
) -> tuple[list[Pair], list[Pair]]:
    """``(train, test)`` of split ``name`` (one of :data:`SPLITS`).

    ``simple_test_fraction`` and ``split_seed`` only affect ``simple``.
    """
    if name == "simple":
        return simple_split(simple_test_fraction, split_seed)
    if name == "length":
        return length_split()
    if name in ADDPRIM_SPLITS:
        return addprim_split(ADDPRIM_SPLITS[name])
    if name in TEMPLATE_SPLITS:
        return template_split(name)
    raise ValueError(f"unknown SCAN split {name!r}; allowed: {', '.join(SPLITS)}")


def subsample(pairs: Sequence[Pair], n: int | None, seed: int) -> list[Pair]:
    """``n`` pairs drawn without replacement by ``random.Random(seed)``, in their order.

    ``n=None`` keeps all pairs. Duplicated lines (the add-primitive repeats) are separate
    lines and may each be drawn. Raises ValueError when ``n`` exceeds ``len(pairs)``.
    """
    if n is None:
        return list(pairs)
    if not 0 <= n <= len(pairs):
        raise ValueError(f"cannot draw {n} pairs from {len(pairs)}")
    keep = sorted(random.Random(seed).sample(range(len(pairs)), n))
    return [pairs[i] for i in keep]


_SPLIT_DIRS: dict[str, str] = {
    "simple": "simple_split",
    "length": "length_split",
    **{name: "add_prim_split" for name in ADDPRIM_SPLITS},
    **{name: "template_split" for name in TEMPLATE_SPLITS},
}
_FILE_STEMS: dict[str, str] = {
    "simple": "simple",
    "length": "length",
    **{name: name for name in ADDPRIM_SPLITS},
    **{name: f"template_{name}" for name in TEMPLATE_SPLITS},
}


def official_file(split: str, part: str) -> tuple[str, str]:
    """Where the official repository keeps ``part`` (``train``/``test``) of ``split``.

    Returns ``(folder, file name)``, e.g. ``("add_prim_split",
    "tasks_train_addprim_jump.txt")`` or ``("template_split",
    "tasks_test_template_around_right.txt")``.
    """
    if split not in _SPLIT_DIRS:
        raise ValueError(f"unknown SCAN split {split!r}; allowed: {', '.join(SPLITS)}")
    if part not in ("train", "test"):
        raise ValueError(f"part must be 'train' or 'test', got {part!r}")
    return _SPLIT_DIRS[split], f"tasks_{part}_{_FILE_STEMS[split]}.txt"


def find_official_file(data_dir: str | Path, split: str, part: str) -> Path:
    """The official file of ``split``/``part`` under ``data_dir``.

    Looks in ``data_dir/<folder>/<file>`` (a clone of the official repository) and then in
    ``data_dir/<file>`` (the files copied into one folder). Raises FileNotFoundError naming
    both paths when neither exists.
    """
    folder, name = official_file(split, part)
    candidates = (Path(data_dir) / folder / name, Path(data_dir) / name)
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"SCAN split file not found: tried {candidates[0]} and {candidates[1]}")


# ------------------------------------------------------------------------------- files
def format_line(command: str, actions: str) -> str:
    """One line of the official format, without newline: ``IN: <command> OUT: <actions>``."""
    return f"{IN_MARK} {command} {OUT_MARK} {actions}"


def parse_line(line: str) -> Pair:
    """Inverse of :func:`format_line` (surrounding whitespace ignored)."""
    text = line.strip()
    if not text.startswith(IN_MARK + " ") or f" {OUT_MARK} " not in text:
        raise ValueError(f"not a SCAN line ('IN: <command> OUT: <actions>'): {line!r}")
    command, actions = text[len(IN_MARK) :].split(f" {OUT_MARK} ", 1)
    return " ".join(command.split()), " ".join(actions.split())


def read_split_file(path: str | Path) -> list[Pair]:
    """Pairs of an official SCAN file (one ``IN: ... OUT: ...`` line each, blanks skipped).

    Raises FileNotFoundError naming the path when it does not exist.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"SCAN split file not found: {p}")
    with p.open(encoding="utf-8") as f:
        return [parse_line(line) for line in f if line.strip()]


def format_lines(pairs: Iterable[Pair]) -> list[str]:
    """:func:`format_line` of every pair."""
    return [format_line(c, a) for c, a in pairs]
