"""The paper's numbers, from ``conf/report/paper.yaml`` (one declarative table).

Every table of the report that compares with the paper reads its values from here, with
the docs/theory.md section each block cites (``source``).
"""

from __future__ import annotations

from typing import Any

from grokedge.reporting.report_conf import report_yaml


def paper_values() -> dict[str, Any]:
    """The parsed ``paper.yaml`` shipped with the package's configs."""
    return report_yaml("paper.yaml")


def mean_sd(entry: Any) -> str:
    """A paper value as text: ``-0.58 ± 0.09`` for {mean, sd}, else the value itself."""
    if isinstance(entry, dict) and "mean" in entry:
        return f"{entry['mean']} ± {entry['sd']}" if "sd" in entry else str(entry["mean"])
    return "–" if entry is None else str(entry)
