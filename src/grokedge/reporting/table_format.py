"""A titled table of formatted cells, and the number formatting every table uses.

A :class:`Table` renders as markdown in ``report.md`` / ``claims.md`` and is logged as a
``wandb.Table``; :func:`fmt` and :func:`mean_sd_text` turn numbers into its cells.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for a table: fixed ``digits``, scientific when tiny or huge, "–" if none."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if x != 0 and (abs(x) < 10**-digits or abs(x) >= 1e4):
        return f"{x:.2e}"
    return f"{x:.{digits}f}"


def ratio_cell(
    ratio: float | None,
    edge: float | None,
    control: float | None,
    resolved: bool | None = None,
    digits: int = 1,
) -> str:
    """A ratio |Δ_edge| / |Δ_control| for a table, or, when the control's effect is below
    resolution (``resolved`` False; rows without the flag: a control Δ of exactly 0, or no
    finite ratio), ``unresolved (edge Δ e, control Δ c below resolution)``: the two numbers
    instead of a division by a floor."""
    if resolved is None:
        finite = ratio is not None and math.isfinite(ratio)
        resolved = finite and control != 0
    if not resolved and edge is not None and control is not None:
        return f"unresolved (edge Δ {fmt(edge, 4)}, control Δ {fmt(control, 4)} below resolution)"
    return fmt(ratio if resolved else None, digits)


def finite_mean(values: Iterable[float | None]) -> float | None:
    """The mean of the finite values (None and NaN/inf left out); None if there are none."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return statistics.fmean(xs) if xs else None


def mean_sd_text(values: Iterable[float | None], digits: int = 3) -> str:
    """``mean ± sd`` of the finite values (sample sd; the mean alone for one), "–" if none."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return "–"
    if len(xs) == 1:
        return fmt(xs[0], digits)
    return f"{fmt(statistics.fmean(xs), digits)} ± {fmt(statistics.stdev(xs), digits)}"


def omega_text(omega: float | None) -> str:
    """ω as a table cell ("?" when the run did not record it)."""
    return "?" if omega is None else f"{omega:g}"


def escape_pipes(text: str) -> str:
    """``text`` safe inside a markdown table cell (``|`` escaped)."""
    return text.replace("|", "\\|")


@dataclass
class Table:
    """A titled table of formatted cells.

    ``heading`` is the markdown prefix of the title (``"###"``; ``""``: a plain paragraph).
    """

    title: str
    columns: list[str]
    rows: list[list[str]]
    heading: str = "###"
    note: str = ""

    def markdown(self) -> str:
        title = f"{self.heading} {self.title}" if self.heading else self.title
        lines = [title, ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "---|" * len(self.columns))
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines)

    @property
    def key(self) -> str:
        """A short identifier (W&B table key): the title up to its first parenthesis."""
        head = self.title.split("(")[0].strip().lower()
        return "".join(c if c.isalnum() else "_" for c in head).strip("_")
