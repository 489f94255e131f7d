"""Universality classes of the spectral edge (docs/theory.md §3; docs/classes.md).

The paper names three classes by their late-training edge and gives no numeric criterion:

| class | task (paper) | late grad share of v_1 | v_1 rotation / window | functional R² |
|---|---|---|---|---|
| functional | modular arithmetic | high | moderate | high |
| mixed | Dyck | 0.87 | 18° | 0.80 |
| compression | SCAN | 0.02 | 8° | 0.04 |

grokedge makes the criterion explicit and configurable (:class:`ClassThresholds`):

- **observed** class, from what the late windows measure:
  *functional* if grad share >= ``functional_grad_share`` and functional R² >=
  ``functional_r2`` (the gradient still drives the edge and moving along it changes the
  representation of the task variable); *compression* if grad share <=
  ``compression_grad_share``, functional R² <= ``compression_r2`` and (unless disabled)
  the rotation <= ``compression_rotation_deg`` (weight decay drives a nearly frozen edge
  that carries no task information); *mixed* otherwise. Defaults 0.90 / 0.90 and
  0.50 / 0.30 / 12°: Dyck's 0.87 / 0.80 is then mixed, SCAN's 0.02 / 0.04 / 8°
  compression. A missing functional R² (NaN) leaves that criterion out (the decision
  records which criteria were used);
- **predicted** class, from the late balance B = Term 3 / |Term 2| of the gap flow
  equation alone (:mod:`grokedge.experiments.gap_flow`): *functional* if B >=
  ``functional_balance`` (gradient driving dominates), *compression* if B <=
  ``compression_balance`` (weight-decay damping dominates), *mixed* in between.
  Defaults 2 and 0.5: a factor of two either way of balance.

"Late" windows are those in the ``late`` phase of the run (after grok step + post); a
run with fewer than ``min_late`` of them (not grokked, or too short) falls back to its
last ``tail`` windows, and the decision says so (``basis``).

The functional R² (the linear probe's R² of the task variable on the change of the final
hidden state when θ_sel moves by ε = 0.005‖θ_sel‖ along v_1) is
:func:`grokedge.experiments.probes.functional_r2`; :func:`functional_epsilon` gives ε.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

FUNCTIONAL, MIXED, COMPRESSION = "functional", "mixed", "compression"
UNDETERMINED = "undetermined"
CLASSES = (FUNCTIONAL, MIXED, COMPRESSION)
CLASS_CODES = {FUNCTIONAL: 0, MIXED: 1, COMPRESSION: 2}
"""Numeric codes of the classes for scalar logging (``class/observed`` etc.): from
gradient-driven (0) to weight-decay-driven (2). ``undetermined`` has none (not logged)."""

PAPER_EPS_FRACTION = 0.005
"""The paper's functional-R² step: ε = 0.005 · ‖θ_sel‖ along v_1."""

LATE, PHASE, TAIL = "late", "phase", "tail"


@dataclass(frozen=True)
class ClassThresholds:
    """Thresholds of the class decisions (see the module docstring).

    Shares and R² are dimensionless in [0, 1]; rotation in degrees; balances are ratios.
    ``compression_rotation_deg=None`` drops the rotation criterion.
    """

    functional_grad_share: float = 0.90
    functional_r2: float = 0.90
    compression_grad_share: float = 0.50
    compression_r2: float = 0.30
    compression_rotation_deg: float | None = 12.0
    functional_balance: float = 2.0
    compression_balance: float = 0.5

    def __post_init__(self) -> None:
        if not self.compression_grad_share <= self.functional_grad_share:
            raise ValueError(
                f"compression_grad_share={self.compression_grad_share} must be <= "
                f"functional_grad_share={self.functional_grad_share}"
            )
        if not self.compression_r2 <= self.functional_r2:
            raise ValueError(
                f"compression_r2={self.compression_r2} must be <= functional_r2="
                f"{self.functional_r2}"
            )
        if not 0 < self.compression_balance <= self.functional_balance:
            raise ValueError(
                f"need 0 < compression_balance ({self.compression_balance}) <= "
                f"functional_balance ({self.functional_balance})"
            )


THRESHOLD_BOUNDS = {  # (minimum, maximum, minimum excluded, None allowed) of each threshold
    "functional_grad_share": (0.0, 1.0, False, False),
    "functional_r2": (None, 1.0, False, False),
    "compression_grad_share": (0.0, 1.0, False, False),
    "compression_r2": (None, 1.0, False, False),
    "compression_rotation_deg": (0.0, 90.0, False, True),  # None: criterion not used
    "functional_balance": (None, None, False, False),
    "compression_balance": (0.0, None, True, False),
}
"""What each :class:`ClassThresholds` field may be (checked by the callbacks)."""


@dataclass(frozen=True)
class ClassDecision:
    """A class and what it was decided from.

    Attributes:
        name: ``functional``, ``mixed``, ``compression`` or ``undetermined``.
        criteria: names of the measurements the decision used.
        measurements: the values it used (NaN where missing).
    """

    name: str
    criteria: tuple[str, ...] = ()
    measurements: dict[str, float] = field(default_factory=dict)

    @property
    def code(self) -> float:
        """The numeric code (``CLASS_CODES``), NaN for ``undetermined``."""
        return float(CLASS_CODES[self.name]) if self.name in CLASS_CODES else math.nan

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"code": self.code}


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def observed_class(
    grad_share: float,
    rotation_deg: float,
    functional_r2: float,
    thresholds: ClassThresholds = ClassThresholds(),
) -> ClassDecision:
    """The observed class from the late gradient share of v_1, its rotation per window
    (degrees) and the functional R² (each NaN if not measured).

    Without a finite gradient share the class is ``undetermined``; a NaN R² or rotation
    leaves its criterion out.
    """
    t = thresholds
    m = {"grad_share": grad_share, "rotation_deg": rotation_deg, "functional_r2": functional_r2}
    if not _finite(grad_share):
        return ClassDecision(UNDETERMINED, (), m)
    criteria = ["grad_share"]
    has_r2 = _finite(functional_r2)
    use_rotation = t.compression_rotation_deg is not None and _finite(rotation_deg)
    if has_r2:
        criteria.append("functional_r2")
    if use_rotation:
        criteria.append("rotation_deg")
    functional = grad_share >= t.functional_grad_share and (
        not has_r2 or functional_r2 >= t.functional_r2
    )
    compression = (
        grad_share <= t.compression_grad_share
        and (not has_r2 or functional_r2 <= t.compression_r2)
        and (not use_rotation or rotation_deg <= t.compression_rotation_deg)
    )
    name = FUNCTIONAL if functional else COMPRESSION if compression else MIXED
    return ClassDecision(name, tuple(criteria), m)


def predicted_class(
    late_balance: float, thresholds: ClassThresholds = ClassThresholds()
) -> ClassDecision:
    """The class the gap flow equation predicts from the late balance Term 3 / |Term 2|."""
    m = {"balance": late_balance}
    if math.isnan(late_balance):
        return ClassDecision(UNDETERMINED, (), m)
    if late_balance >= thresholds.functional_balance:
        name = FUNCTIONAL
    elif late_balance <= thresholds.compression_balance:
        name = COMPRESSION
    else:
        name = MIXED
    return ClassDecision(name, ("balance",), m)


def late_indices(phases: Sequence[str], min_late: int = 3, tail: int = 10) -> tuple[list[int], str]:
    """Which windows count as late: those labelled ``late`` if there are >= ``min_late``,
    else the last ``tail`` windows (any phase).

    Args:
        phases: the phase of each window, chronological.
    Returns:
        (indices into ``phases``, ``"phase"`` or ``"tail"``).
    """
    late = [i for i, p in enumerate(phases) if p == LATE]
    if len(late) >= min_late:
        return late, PHASE
    n = len(phases)
    return list(range(max(0, n - tail), n)), TAIL


def late_mean(values: Sequence[float], indices: Sequence[int]) -> float:
    """Mean of the finite ``values`` at ``indices`` (NaN if none)."""
    picked = [values[i] for i in indices if _finite(values[i])]
    return sum(picked) / len(picked) if picked else math.nan


def late_median(values: Sequence[float], indices: Sequence[int]) -> float:
    """Median of the non-NaN ``values`` at ``indices`` (±inf kept: they are ordered)."""
    picked = sorted(values[i] for i in indices if not math.isnan(values[i]))
    if not picked:
        return math.nan
    mid = len(picked) // 2
    return picked[mid] if len(picked) % 2 else (picked[mid - 1] + picked[mid]) / 2


def functional_epsilon(theta: Tensor, fraction: float = PAPER_EPS_FRACTION) -> float:
    """ε = fraction · ‖θ_sel‖ (parameter units): the step along v_1 of the functional R²."""
    return fraction * float(torch.linalg.vector_norm(theta.detach().to(torch.float64)))


def threshold_margins(
    grad_share: float,
    rotation_deg: float,
    functional_r2: float,
    balance: float,
    thresholds: ClassThresholds = ClassThresholds(),
) -> dict[str, float]:
    """How far each measurement is from its threshold, signed so that a positive margin
    meets the criterion: ``functional_grad_share`` = share − threshold,
    ``compression_grad_share`` = threshold − share, and alike for the R², the rotation
    (degrees) and the balance. A threshold moved by less than a criterion's |margin|
    does not change whether that criterion holds; NaN where the measurement is missing
    (or the rotation criterion is off). Units: those of each measurement.
    """
    t, nan = thresholds, math.nan
    rot = t.compression_rotation_deg
    return {
        "functional_grad_share": grad_share - t.functional_grad_share,
        "functional_r2": functional_r2 - t.functional_r2,
        "compression_grad_share": t.compression_grad_share - grad_share,
        "compression_r2": t.compression_r2 - functional_r2,
        "compression_rotation_deg": nan if rot is None else rot - rotation_deg,
        "functional_balance": balance - t.functional_balance,
        "compression_balance": t.compression_balance - balance,
    }


OBSERVED_RULES = {
    FUNCTIONAL: ("functional_grad_share", "functional_r2"),
    COMPRESSION: ("compression_grad_share", "compression_r2", "compression_rotation_deg"),
}
PREDICTED_RULES = {FUNCTIONAL: ("functional_balance",), COMPRESSION: ("compression_balance",)}
"""Which margins (:func:`threshold_margins`) each class needs all non-negative; functional
is tried first, mixed is neither (as :func:`observed_class` / :func:`predicted_class`)."""


def class_from_margins(margins: dict[str, float], rules: dict[str, tuple[str, ...]]) -> str:
    """The class the margins give under ``rules`` (a NaN margin: criterion not used)."""
    for name in (FUNCTIONAL, COMPRESSION):
        if all(not _finite(margins.get(c)) or margins[c] >= 0 for c in rules[name]):
            return name
    return MIXED


def decisive_thresholds(
    margins: dict[str, float], rules: dict[str, tuple[str, ...]]
) -> list[tuple[str, float]]:
    """The thresholds each of which changes the class on its own: the criteria whose
    outcome, flipped alone, changes :func:`class_from_margins`, with their margins (in
    each criterion's own units, so not ranked against each other). Empty when no single
    threshold can change the class (e.g. a mixed run failing two criteria of each class).
    """
    current = class_from_margins(margins, rules)
    out = []
    for name in dict.fromkeys(c for crit in rules.values() for c in crit):
        m = margins.get(name)
        if _finite(m):
            flipped = dict(margins, **{name: -m if m != 0 else -1.0})
            if class_from_margins(flipped, rules) != current:
                out.append((name, m))
    return out


class ClassWindow(NamedTuple):
    """What the class reads of one Gram window: its ``step``, v_1's gradient energy
    share (in [0, 1]) and v_1's rotation from the previous window (degrees; NaN: none)."""

    step: int
    grad_share: float
    rotation_deg: float


def classify_run(
    windows: Sequence[ClassWindow],
    window_phases: Sequence[str],
    functional_r2: float,
    thresholds: ClassThresholds,
    balances: Sequence[float] | None = None,
    balance_phases: Sequence[str] = (),
    min_late: int = 3,
    tail: int = 10,
) -> dict[str, Any]:
    """The run's observed and predicted class from its windows so far.

    Args:
        windows, window_phases: every Gram window and its phase, chronological.
        functional_r2: the functional R² on the current weights (NaN: not measured).
        balances, balance_phases: Term 3 / |Term 2| of each analysed gap-flow window and
            its phase (None: the run has no gap flow; the prediction is undetermined).
        min_late, tail: which windows are late (:func:`late_indices`).
    Returns:
        names and codes of both classes, the observed criteria used, the late means
        (``late_grad_share``, ``late_rotation_deg``), ``functional_r2``, the late median
        ``late_balance``, and which windows were late (``late_basis``, ``late_windows``,
        ``late_first_step``, ``balance_basis``, ``balance_windows``), and each
        criterion's ``margins`` (:func:`threshold_margins`).
    """
    idx, basis = late_indices(window_phases, min_late, tail)
    share = late_mean([w.grad_share for w in windows], idx)
    rotation = late_mean([w.rotation_deg for w in windows], idx)
    observed = observed_class(share, rotation, functional_r2, thresholds)
    balance, balance_basis, balance_n = math.nan, None, 0
    if balances is not None:
        b_idx, balance_basis = late_indices(balance_phases, min_late, tail)
        balance = late_median(balances, b_idx)
        balance_n = len(b_idx)
    predicted = predicted_class(balance, thresholds)
    margins = threshold_margins(share, rotation, functional_r2, balance, thresholds)
    return {
        "observed": observed.name,
        "predicted": predicted.name,
        "observed_code": observed.code,
        "predicted_code": predicted.code,
        "observed_criteria": list(observed.criteria),
        "late_grad_share": share,
        "late_rotation_deg": rotation,
        "functional_r2": functional_r2,
        "late_balance": balance,
        "late_basis": basis,
        "late_windows": len(idx),
        "late_first_step": int(windows[idx[0]].step) if idx else None,
        "balance_basis": balance_basis,
        "balance_windows": balance_n,
        "margins": margins,
    }
