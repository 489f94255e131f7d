"""The row of ``claims.md`` (:class:`Claim`), its verdicts, and the selections of runs
every claim rule shares.

Verdicts: ``holds``, ``window artifact`` (the effect follows the window arithmetic or
appears as much without weight decay), ``not reproduced``, ``inconclusive`` (measured,
but no sound rule or too little to decide) and ``not tested`` (no rows for it; the row
says what is missing). "Treated" runs are the grokked runs with ω ≠ 0; "controls" the
ω = 0 runs. A row's numbers are computed under one edge definition
(:func:`one_definition`), named in its ``definition`` cell.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from grokedge.edge.definitions import EDGE_DEFINITIONS, PAPER
from grokedge.reporting.discover import Collection, RunData
from grokedge.reporting.edge_series import UNRECORDED, analysed_definition
from grokedge.reporting.event_runs import SUMMARY
from grokedge.reporting.run_measures import phase_mean
from grokedge.reporting.table_format import finite_mean

HOLDS = "holds"
WINDOW_ARTIFACT = "window artifact"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive"
NOT_TESTED = "not tested"
VERDICTS = (HOLDS, WINDOW_ARTIFACT, NOT_REPRODUCED, INCONCLUSIVE, NOT_TESTED)

NO_TREATED = "no run with ω ≠ 0 grokked"
NO_EDGE = (
    "no edge_summary rows: run with callbacks=gram (the default; in Python: GramCallback "
    "and EdgeAlignmentCallback)"
)


NO_EDGE_DEFINITION = "none (reads no edge)"
"""The definition cell of a claim whose numbers read no edge (probes, ``wd/*``)."""


@dataclass(frozen=True)
class Claim:
    """One row of ``claims.md``.

    Attributes:
        claim: what the paper says (short, numbered).
        paper, grokedge, control: the three numbers, as text.
        verdict: one of :data:`VERDICTS`.
        why: the rule's outcome, or what is missing (one line).
        support: files of ``report/`` that show it, relative to ``report/``; the first
            that exists is linked.
        definition: the edge definition every number of the row is computed under
            (``paper``, ``burn_in``, ``normalized``; :data:`NO_EDGE_DEFINITION` for a
            claim that reads no edge); numbers of other definitions set beside are
            labelled with theirs.
    """

    claim: str
    paper: str
    grokedge: str
    control: str
    verdict: str
    why: str
    support: tuple[str, ...] = ()
    definition: str = PAPER


def treated(collection: Collection) -> list[RunData]:
    """The finished runs that grokked with weight decay (ω ≠ 0 or unrecorded)."""
    return [r for r in collection.ok if r.grok_step is not None and r.weight_decay != 0]


def controls(collection: Collection) -> list[RunData]:
    """The finished ω = 0 runs."""
    return [r for r in collection.ok if r.weight_decay == 0]


def interval(run: RunData) -> int | None:
    """N of the run: its ``edge_summary`` row's, else ``task.gram_interval`` of its config."""
    rows = run.rows(SUMMARY)
    if rows and rows[-1].get("interval") is not None:
        return int(rows[-1]["interval"])
    value = (run.config.get("task") or {}).get("gram_interval")
    return None if value is None else int(value)


def control_pairs(collection: Collection) -> list[tuple[RunData, RunData]]:
    """(treated run, ω = 0 run of the same task, seed and N) for every treated run that has
    one."""
    pairs = []
    for run in treated(collection):
        key = (run.task, run.seed, interval(run))
        match = [c for c in controls(collection) if (c.task, c.seed, interval(c)) == key]
        if match:
            pairs.append((run, match[0]))
    return pairs


def one_definition(runs: list[RunData]) -> tuple[str, list[RunData], int]:
    """(definition, the runs that analysed it, how many analysed another): the paper's
    when some run analysed it, else the most frequent (ties in the order of
    ``EDGE_DEFINITIONS``), so that no row mixes the numbers of two edges; ``("–", [], 0)``
    without runs."""
    by: dict[str, list[RunData]] = {}
    for run in runs:
        by.setdefault(analysed_definition(run), []).append(run)
    if not by:
        return "–", [], 0
    order = [PAPER, *sorted(by, key=lambda d: (-len(by[d]), _definition_rank(d)))]
    chosen = next(d for d in order if d in by)
    return chosen, by[chosen], len(runs) - len(by[chosen])


def fixed_definition(edge: str) -> str:
    """The ``definition`` cell of a claim whose ``edge`` (``claims.yaml``) fixes it:
    ``paper`` -> the paper's definition, ``none`` -> :data:`NO_EDGE_DEFINITION`."""
    fixed = {"paper": PAPER, "none": NO_EDGE_DEFINITION}
    if edge not in fixed:
        raise ValueError(f"edge={edge!r} does not fix a definition: one of {sorted(fixed)}")
    return fixed[edge]


def _definition_rank(definition: str) -> int:
    names = list(EDGE_DEFINITIONS)
    return names.index(definition) if definition in names else len(names)


def under(definition: str, why: str, left_out: int = 0) -> str:
    """The why of a claim judged on the analysed edge: when that edge is not the paper's,
    it says the verdict is ``definition``'s, not the paper's; and how many runs analysed
    another definition (left out of the row)."""
    if left_out:
        why += f"; {left_out} runs analysed another definition (left out)"
    if definition == PAPER:
        return why
    if definition == UNRECORDED:
        return f"the runs record no edge definition (rows from before the definitions): {why}"
    return (
        f"judged under {definition}, not the paper's definition (the analysed edge; "
        f"callbacks.gram.edge_definition=paper tests the paper's): {why}"
    )


def mean_over(runs: Iterable[RunData], get: Callable[[RunData], float | None]) -> float | None:
    """The finite mean over ``runs`` of ``get(run)`` (None without a value)."""
    return finite_mean(get(r) for r in runs)


def phase_mean_over(runs: list[RunData], analysis: str, phase: str, get: Callable) -> float | None:
    """Mean over runs of each run's mean of ``get`` over its rows in ``phase``."""
    return mean_over(runs, lambda r: phase_mean(r, analysis, phase, get))


def not_tested(
    claim: str,
    paper: str,
    missing: str,
    support: tuple[str, ...] = (),
    definition: str = PAPER,
) -> Claim:
    """A ``not tested`` row: nothing measured, ``missing`` says what is needed."""
    return Claim(claim, paper, "–", "–", NOT_TESTED, missing, support, definition)


def edge_runs(
    collection: Collection, analysis: str
) -> tuple[str, list[RunData], list[RunData], int]:
    """(definition, treated runs with ``analysis`` rows that analysed it, ω = 0 runs that
    analysed it, treated runs with rows left out for analysing another): the rows of
    claims 4-8 and 11 read the analysed edge's vectors, one definition a row
    (:func:`one_definition`); without rows, the definition the runs analysed."""
    with_rows = [r for r in treated(collection) if r.rows(analysis)]
    definition, runs, left_out = one_definition(with_rows)
    if not with_rows:
        definition = one_definition(collection.ok)[0]
    ctrl = [c for c in controls(collection) if analysed_definition(c) == definition]
    return definition, runs, ctrl, left_out
