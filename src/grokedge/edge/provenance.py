"""Window provenance: which deltas a window spans, and which of them owns its σ_1².

With X = [δ_1; …; δ_W'] and G = X Xᵀ = U Σ² Uᵀ, the projection of delta i on the edge is
δ_i · v_1 = σ_1 u_1[i], so σ_1² = Σ_i σ_1² u_1[i]²: delta i contributes σ_1² u_1[i]²
(squared parameter units) and its *share* of σ_1² is u_1[i]² (the shares sum to 1). A
window whose largest share is close to 1 has an edge that is one delta's direction; the
edge then jumps when that delta enters or leaves the window, whatever the model does.
:class:`DominanceTracker` records those entries and exits, so that an event of the edge
(a flip of the gradient share, an alignment step, a g_23 peak, a rotation spike) can be
checked against them (docs/edge_definitions.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from grokedge.edge.spectrum import WindowSpectrum

MIN_DOMINANCE_WINDOW = 3
"""Fewest deltas in a window for dominance to mean anything: of two, one always holds at
least half of σ_1²."""

ENTERED, LEFT = "entered", "left"
"""Kinds of a dominant-delta change: a newest delta owns σ_1²; the owner was evicted."""


@dataclass(frozen=True)
class WindowProvenance:
    """Provenance of one window (W' deltas, oldest first).

    Attributes:
        first_step: begin step of the oldest delta (−1 if unrecorded).
        last_step: end step of the newest delta.
        holds_burn_in: some delta begins before the burn-in step.
        delta_energy: [W'] σ_1² u_1[i]², squared parameter units (sum σ_1²).
        delta_share: [W'] u_1[i]², each delta's share of σ_1² (sum 1; all 0 if σ_1 = 0).
        dominant_index: i of the largest share (0 = oldest).
        dominant_share: that share.
        dominant_begin, dominant_end: that delta's span (steps).
    """

    first_step: int
    last_step: int
    holds_burn_in: bool
    delta_energy: list[float]
    delta_share: list[float]
    dominant_index: int
    dominant_share: float
    dominant_begin: int
    dominant_end: int

    def scalars(self, prefix: str = "gram/") -> dict[str, float]:
        """The logged scalars: ``window_first_step``, ``window_last_step``,
        ``window_holds_burn_in`` (0/1), ``dominant_delta_share``, ``dominant_delta_step``
        (begin step of the dominant delta)."""
        return {
            f"{prefix}window_first_step": float(self.first_step),
            f"{prefix}window_last_step": float(self.last_step),
            f"{prefix}window_holds_burn_in": float(self.holds_burn_in),
            f"{prefix}dominant_delta_share": self.dominant_share,
            f"{prefix}dominant_delta_step": float(self.dominant_begin),
        }

    def row(self) -> dict[str, Any]:
        """Plain values for ``analyses.jsonl``."""
        return asdict(self)


def sigma1_shares(spectrum: WindowSpectrum) -> list[float] | None:
    """[W'] u_1[i]², each delta's share of σ_1² (sum 1); ``None`` when σ_1 = 0 (no edge
    to share, including an empty window)."""
    if not spectrum.count or float(spectrum.sigma[0]) <= 0:
        return None
    return (spectrum.eigvecs[:, 0] ** 2).tolist()


def window_provenance(spectrum: WindowSpectrum, burn_in_step: int = 0) -> WindowProvenance:
    """The provenance of a window from its spectrum (W×W algebra; spans from the window).

    Args:
        spectrum: the window's :class:`WindowSpectrum` (``spans`` recorded).
        burn_in_step: a delta that begins before it lies in the burn-in (0: none does).
    """
    n = spectrum.count
    spans = spectrum.spans if len(spectrum.spans) == n else [(-1, -1)] * n
    sigma1 = float(spectrum.sigma[0]) if n else 0.0
    share = sigma1_shares(spectrum) or [0.0] * n
    energy = [sigma1**2 * s for s in share]
    dominant = max(range(n), key=lambda i: share[i]) if n else 0
    begin, end = spans[dominant] if n else (-1, -1)
    return WindowProvenance(
        first_step=int(spans[0][0]) if n else -1,
        last_step=int(spans[-1][1]) if n else -1,
        holds_burn_in=any(b < burn_in_step for b, _ in spans),
        delta_energy=energy,
        delta_share=share,
        dominant_index=int(dominant),
        dominant_share=float(share[dominant]) if n else 0.0,
        dominant_begin=int(begin),
        dominant_end=int(end),
    )


@dataclass(frozen=True)
class DominantChange:
    """A dominant delta entering or leaving the window.

    Attributes:
        step: step of the window where it happened (its newest delta's end).
        kind: ``entered`` (the newest delta owns >= threshold of σ_1²) or ``left`` (the
            delta that did in the window before was evicted).
        begin, end: the dominant delta's span.
        share: its share of σ_1² (in the window where it was dominant).
    """

    step: int
    kind: str
    begin: int
    end: int
    share: float


class DominanceTracker:
    """Follows the dominant delta from window to window and records its entries and exits.

    Args:
        threshold: a delta is dominant when its share of σ_1² is at least this (0.5: it
            owns more of the edge than all the others together).

    Example:
        >>> tracker = DominanceTracker(threshold=0.5)
        >>> changes = tracker.update(step, provenance, spectrum.spans)  # doctest: +SKIP
    """

    def __init__(self, threshold: float = 0.5) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.current: tuple[int, int] | None = None  # span of the dominant delta, if any
        self.current_share = 0.0  # its share of σ_1² in the last window (0: none)
        self.changes: list[DominantChange] = []

    def update(
        self, step: int, provenance: WindowProvenance, spans: list[tuple[int, int]]
    ) -> list[DominantChange]:
        """Take the next window; returns (and records) its changes."""
        new: list[DominantChange] = []
        if self.current is not None and tuple(self.current) not in {tuple(s) for s in spans}:
            b, e = self.current
            new.append(DominantChange(int(step), LEFT, b, e, self.current_share))
            self.current = None
        dominant = (provenance.dominant_begin, provenance.dominant_end)
        is_dominant = (
            len(spans) >= MIN_DOMINANCE_WINDOW and provenance.dominant_share >= self.threshold
        )
        newest = provenance.dominant_index == len(spans) - 1
        if is_dominant and newest and dominant != self.current:
            new.append(
                DominantChange(int(step), ENTERED, *dominant, float(provenance.dominant_share))
            )
        self.current = dominant if is_dominant else None
        self.current_share = float(provenance.dominant_share) if is_dominant else 0.0
        self.changes.extend(new)
        return new

    def state_dict(self) -> dict[str, Any]:
        """Primitives only."""
        return {
            "threshold": self.threshold,
            "current": None if self.current is None else list(self.current),
            "current_share": self.current_share,
            "changes": [asdict(c) for c in self.changes],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.current = None if state["current"] is None else tuple(state["current"])
        self.current_share = float(state["current_share"])
        self.changes = [DominantChange(**c) for c in state["changes"]]


def coinciding(step: int, changes: list[DominantChange], tolerance: int) -> list[DominantChange]:
    """The changes within ``tolerance`` steps of ``step`` (|change.step − step| <= it)."""
    return [c for c in changes if abs(c.step - step) <= tolerance]
