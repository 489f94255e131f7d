"""The few plain lines every run ends with: did it grok, when did the edge flip and align
under each definition (with window-artifact flags and the derived N), where the run
directory is and how to make its report (docs/run_files.md). Printed by
:class:`grokedge.run_files.RunFiles` for CLI and own-module runs alike."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from grokedge.edge.definitions import EDGE_DEFINITIONS


def _step_text(value: Any) -> str:
    return "-" if value is None else str(int(value))


def closing_lines(
    run_dir: str | Path,
    grok_step: int | None,
    steps: int,
    last: Mapping[str, float],
    edge_summary: Mapping[str, Any] | None = None,
    error: str | None = None,
) -> list[str]:
    """The few plain lines every run ends with.

    Args:
        run_dir: the run directory.
        grok_step: the run's grok step (None: did not grok).
        steps: optimizer steps trained.
        last: the last value of every logged scalar (``edge/flip_step_{d}``,
            ``edge/align_step_{d}``, ``edge/flip_step_{d}_n{N}``: read where the
            ``edge_summary`` row does not say).
        edge_summary: the run's ``edge_summary`` row (EdgeAlignmentCallback; None: none):
            its ``definitions`` ({d: {event: step}}), ``events`` (``event``,
            ``definition``, ``window_artifact``), ``interval`` and ``intervals``
            ({str(N): {"definitions": {d: {event: step}}}}, the derived N).
        error: the failure of a run that stopped on an exception (None: it finished).

    Lines: ``grokedge: grokked at step G``, ``grokedge: did not grok in S steps`` or
    ``grokedge: failed at step S: <error>``; one
    ``grokedge: edge <d>: flip <step|-> [(window artifact)], align <step|->
    [(window artifact)][; flip at N=<N>: <step|->, ...]`` per edge definition;
    ``grokedge: run directory <dir>``; ``grokedge: report: python -m grokedge.report <dir>``.
    """
    row = dict(edge_summary or {})
    if error is not None:
        lines = [f"grokedge: failed at step {steps}: {error.splitlines()[0] if error else ''}"]
    elif grok_step is not None:
        lines = [f"grokedge: grokked at step {grok_step}"]
    else:
        lines = [f"grokedge: did not grok in {steps} steps"]
    artifact = {
        (e.get("event"), e.get("definition")): bool(e.get("window_artifact"))
        for e in row.get("events") or []
    }
    table: dict[str, dict[str, Any]] = {
        d: dict(v) for d, v in (row.get("definitions") or {}).items()
    }
    derived: dict[str, dict[int, Any]] = {}
    for n, entry in (row.get("intervals") or {}).items():
        if str(n).isdigit() and int(n) != row.get("interval"):
            for d, events in (entry.get("definitions") or {}).items():
                derived.setdefault(d, {})[int(n)] = events.get("flip")
    # Scalars fill in what the row does not hold (no edge_summary row: a failed run).
    for key, value in last.items():
        for event in ("flip", "align"):
            head = f"edge/{event}_step_"
            if not key.startswith(head):
                continue
            rest = key[len(head) :]
            d, _, n = rest.rpartition("_n") if "_n" in rest else (rest, "", "")
            if n.isdigit() and event == "flip":
                derived.setdefault(d, {}).setdefault(int(n), value)
            elif not n:
                table.setdefault(d, {}).setdefault(event, value)
    order = [d for d in EDGE_DEFINITIONS if d in table] + sorted(set(table) - set(EDGE_DEFINITIONS))
    for d in order:
        parts = []
        for event in ("flip", "align"):
            text = f"{event} {_step_text(table[d].get(event))}"
            if artifact.get((event, d)):
                text += " (window artifact)"
            parts.append(text)
        line = f"grokedge: edge {d}: " + ", ".join(parts)
        if derived.get(d):
            pairs = sorted(derived[d].items())
            line += "; flip at " + ", ".join(f"N={n}: {_step_text(v)}" for n, v in pairs)
        lines.append(line)
    if not order and error is None:
        lines.append("grokedge: edge: no flip or alignment measured (no EdgeAlignmentCallback)")
    run_dir = Path(run_dir).resolve()
    lines.append(f"grokedge: run directory {run_dir}")
    lines.append(f"grokedge: report: python -m grokedge.report {run_dir}")
    return lines
