"""A run's edge as series per edge definition, read from its run files.

Every window's σ under every definition is in the ``edge_directions`` rows of
``analyses.jsonl`` (``definitions[d]["sigma"]``), so the report can compute a quantity
under the definition a claim names, whatever edge the run analysed
(docs/edge_definitions.md). Pure functions over :class:`RunData`; no plotting.
"""

from __future__ import annotations

import math
from typing import Any

from grokedge.edge.definitions import PAPER
from grokedge.reporting.discover import RunData

SUMMARY = "edge_summary"
"""The row that names the analysed definition (written at the end of training)."""

UNRECORDED = "unrecorded"
"""The definition of a run that records none (rows from before the definitions)."""


def analysed_definition(run: RunData) -> str:
    """The edge definition the run analysed (its ablation, ε-sweep, curvature and class
    read that edge's vectors): the ``edge_summary`` row's ``edge_definition``, else the
    last ``gram_spectrum`` row's, else ``callbacks.gram.edge_definition`` of its config,
    else :data:`UNRECORDED`."""
    for analysis in (SUMMARY, "gram_spectrum"):
        rows = run.rows(analysis)
        if rows and rows[-1].get("edge_definition"):
            return str(rows[-1]["edge_definition"])
    value = ((run.config.get("callbacks") or {}).get("gram") or {}).get("edge_definition")
    return UNRECORDED if value is None else str(value)


def g23_compression(rows: list[dict[str, Any]], reference: int) -> float | None:
    """max g_23 over the windows at step ≤ ``reference`` over g_23 of the last of them
    (rows ``{"step", "g23"}``, e.g. :func:`definition_g23`; the definition of
    ``gram/g23_compression``); None without such a window, inf when the last one's g_23
    is 0."""
    upto = sorted(
        (int(r["step"]), float(r["g23"]))
        for r in rows
        if r["step"] <= reference and r.get("g23") is not None and math.isfinite(r["g23"])
    )
    if not upto:
        return None
    last = upto[-1][1]
    peak = max(v for _, v in upto)
    return peak / last if last > 0 else math.inf


def definition_sigma(run: RunData, definition: str) -> list[tuple[int, list[float]]]:
    """(step, [σ_1..σ_W']) of every window under ``definition``, in order: the
    ``edge_directions`` rows' ``definitions[definition]["sigma"]`` (every definition at
    every window; parameter units, dimensionless for ``normalized``). A run whose rows
    predate the definitions: its ``gram_spectrum`` σ, when ``definition`` is the one it
    analysed (unrecorded: the paper's)."""
    rows = run.rows("edge_directions")
    if any(r.get("definitions") for r in rows):
        out = []
        for row in rows:
            entry = (row.get("definitions") or {}).get(definition)
            if entry and entry.get("sigma") is not None:
                out.append((int(row["step"]), [float(s) for s in entry["sigma"]]))
        return out
    recorded = analysed_definition(run)
    if (PAPER if recorded == UNRECORDED else recorded) != definition:
        return []
    spectra = [r for r in run.rows("gram_spectrum") if r.get("sigma") is not None]
    return [(int(r["step"]), [float(s) for s in r["sigma"]]) for r in spectra]


def definition_g23(run: RunData, definition: str) -> list[dict[str, Any]]:
    """``{"step", "g23"}`` per window under ``definition``: g_23 = σ_2² − σ_3² (squared σ
    units), for the windows with at least three singular values."""
    return [
        {"step": step, "g23": sigma[1] ** 2 - sigma[2] ** 2}
        for step, sigma in definition_sigma(run, definition)
        if len(sigma) >= 3
    ]


def definition_compression(run: RunData, definition: str) -> float | None:
    """The run's g_23 compression under ``definition`` at its grok step (None: not
    grokked, or no window at or before it)."""
    if run.grok_step is None:
        return None
    return g23_compression(definition_g23(run, definition), int(run.grok_step))


def g23_peak_step(rows: list[dict[str, Any]], reference: int) -> int | None:
    """The step of the largest g_23 at step ≤ ``reference`` (the first on ties)."""
    upto = sorted(
        (int(r["step"]), float(r["g23"]))
        for r in rows
        if r["step"] <= reference and math.isfinite(r["g23"])
    )
    return max(upto, key=lambda r: r[1])[0] if upto else None
