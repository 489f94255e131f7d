"""Every number of a real run's ``claims.md`` traced back to the run's files.

One short Dyck run (seed 42, ``callbacks=gram``, 1,200 steps, one thread), then
``python -m grokedge.report``: the test parses ``claims.md`` and recomputes each number
itself from ``analyses.jsonl`` / ``summary.json`` under the edge definition its row names,
the paper's numbers from ``conf/report/paper.yaml`` and the thresholds from
``conf/report/verdicts.yaml`` (read as text, not through the report's code).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from grokedge.report import main as report_main
from tests.real_runs import train
from tests.test_report_claims import _claim_rows

REPO = Path(__file__).resolve().parents[1]
DEFINITIONS = ("paper", "burn_in", "normalized")
NO_EDGE = "none (reads no edge)"
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[+-]?\d+)?")
LABELS = re.compile(
    r"[vgσu]_?\d+|R²|2-D|\(W ?\+ ?1\)|θ\(N\)|ω = 0|ω ≠ 0|callbacks\.\S+|weight_decay=\S+"
)
"""Symbols whose digits are names, not measurements (v_1, g_23, (W + 1)·N, ω = 0 ...)."""


def _numbers(text: str) -> list[str]:
    return NUMBER.findall(LABELS.sub(" ", text))


def _close(printed: str, value: float) -> bool:
    """``printed`` is ``value`` at the precision it is printed with."""
    mantissa = printed.split("e")[0]
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    scale = 10 ** int(printed.split("e")[1]) if "e" in printed else 1
    return abs(float(printed) - value) <= 0.5 * 10**-decimals * scale * (1 + 1e-9)


def _yaml_numbers(path: Path) -> list[float]:
    return [float(x) for x in NUMBER.findall(path.read_text())]


def _compression(rows: list[dict[str, Any]], definition: str, grok: int) -> float | None:
    """max g_23 over the last g_23 of the windows at step <= grok, g_23 = σ_2² − σ_3² of
    ``definition``'s σ (brute force over the rows)."""
    g = []
    for row in rows:
        entry = (row.get("definitions") or {}).get(definition)
        if row["step"] <= grok and entry and len(entry["sigma"]) >= 3:
            g.append((row["step"], entry["sigma"][1] ** 2 - entry["sigma"][2] ** 2))
    if not g:
        return None
    g.sort()
    return max(v for _, v in g) / g[-1][1]


def _peak_on_change(rows: list[dict[str, Any]], summary: dict[str, Any], grok: int) -> bool:
    g = [
        (
            r["step"],
            r["definitions"]["paper"]["sigma"][1] ** 2 - r["definitions"]["paper"]["sigma"][2] ** 2,
        )
        for r in rows
        if r["step"] <= grok and len(r["definitions"]["paper"]["sigma"]) >= 3
    ]
    best = max(v for _, v in g)
    peak = min(s for s, v in g if v == best)
    tol = summary["coincidence_windows"] * summary["interval"]
    return any(abs(c["step"] - peak) <= tol for c in summary["dominant_changes"])


def _ints(tree: Any) -> set[int]:
    if isinstance(tree, dict):
        return {i for v in tree.values() for i in _ints(v)} | {
            int(k) for k in tree if str(k).isdigit()
        }
    if isinstance(tree, list):
        return {i for v in tree for i in _ints(v)}
    if isinstance(tree, int | float) and not isinstance(tree, bool) and float(tree).is_integer():
        return {int(tree)}
    return set()


@pytest.mark.slow
def test_every_number_of_claims_md_traces_to_the_run_files(tmp_path: Path) -> None:
    run = train(
        tmp_path / "run",
        ["task=dyck", "seed=42", "callbacks=gram", "trainer.max_steps=1200"],
    )
    assert report_main([str(run), "--no-wandb"]) == 0
    rows = _claim_rows((run / "report" / "claims.md").read_text())
    analyses = [json.loads(line) for line in (run / "analyses.jsonl").read_text().splitlines()]
    summary_json = json.loads((run / "summary.json").read_text())
    edge = [r for r in analyses if r["analysis"] == "edge_directions"]
    edge_summary = [r for r in analyses if r["analysis"] == "edge_summary"][-1]
    analysed = edge_summary["edge_definition"]
    grok = summary_json["grok_step"]
    assert grok is not None, "the seed-42 run groks within 1,200 steps"
    paper_numbers = _yaml_numbers(REPO / "conf" / "report" / "paper.yaml")
    claims_conf = yaml.safe_load((REPO / "conf" / "report" / "verdicts.yaml").read_text())
    thresholds = [float(v) for v in claims_conf["claims"].values()]

    for n, row in rows.items():
        assert row["definition"] in (*DEFINITIONS, NO_EDGE), row
        for x in _numbers(row["paper"]):  # the paper's own numbers: from paper.yaml
            assert any(_close(x, v) for v in paper_numbers), (n, x)

    # 3: judged under the paper's definition, the others beside, each recomputed.
    g23 = rows[3]
    assert g23["definition"] == "paper"
    quoted = re.findall(r"(paper|burn_in|normalized) (\d+\.\d+)× \((\d+) runs?\)", g23["grokedge"])
    assert quoted[0][0] == "paper" and {d for d, _, _ in quoted} == set(DEFINITIONS)
    for definition, value, count in quoted:
        expected = _compression(edge, definition, grok)
        assert expected is not None and _close(value, expected), (definition, value, expected)
        assert count == "1"
        if definition == analysed:  # the analysed edge's is the one summary.json holds
            assert _close(value, summary_json["gram/g23_compression"])
    printed = set(_numbers(g23["grokedge"]))
    flagged = int(_peak_on_change(edge, edge_summary, grok))
    for x in _numbers(g23["verdict"]):
        ok = x in printed or any(_close(x, t) for t in thresholds) or x == "1"
        assert ok or x in (str(flagged),), (x, g23["verdict"])
    assert f"{flagged}/1 runs" in g23["verdict"]
    assert _numbers(g23["control"]) == []  # no ω = 0 run: nothing measured

    # 4-11: callbacks=gram measures none of them; the row names the edge they would read.
    for n in range(4, 12):
        expected = NO_EDGE if n in (9, 10) else analysed
        assert rows[n]["definition"] == expected, rows[n]
        assert rows[n]["grokedge"] == "–" and rows[n]["control"] == "–", rows[n]
        for x in _numbers(rows[n]["verdict"]):
            assert any(_close(x, t) for t in thresholds), (n, x)

    # 1, 2 (the event claims): every number is a step or count of the run's edge_summary,
    # a threshold, or a phase mean of v_1's read-out under the row's definition.
    steps = _ints(edge_summary) | {grok, (edge_summary["window"] + 1) * edge_summary["interval"]}
    for n, field in ((1, "grad_frac"), (2, "align")):
        d = rows[n]["definition"]
        assert d in DEFINITIONS
        means = []
        for phase in ("pre", "at", "post", "late"):
            vals = [
                r["definitions"][d][field][0]
                for r in edge
                if r["phase"] == phase and (r["definitions"].get(d) or {}).get(field)
            ]
            if vals:
                means.append(sum(vals) / len(vals))
        for cell in ("grokedge", "control", "verdict"):
            for x in _numbers(rows[n][cell]):
                ok = (
                    ("." not in x and int(float(x)) in steps)
                    or any(_close(x, m) for m in means)
                    or any(_close(x, t) for t in thresholds)
                )
                assert ok, (n, cell, x, rows[n][cell])
