"""The gap flow's running record: predicted against observed dg/dt, window by window.

Lightning-free bookkeeping behind ``GapFlowCallback``. Each Gram window's spectrum is
noted (:meth:`GapFlowRecord.on_window`); each analysed window's terms
(:class:`~grokedge.experiments.gap_flow.GapFlowTerms`) are recorded with the gap's change
over the interval *before* the window (a backward pair, known at once) and, when the
weights are the window's own, held until the next window gives the change *after* it
(a forward pair: a genuine prediction). Agreement of predicted and observed is
:func:`~grokedge.experiments.gap_flow.prediction_agreement` over the pairs so far, for the
raw and the effective gradient projections.

State is primitives only (lists of numbers), so checkpoints load under
``torch.load(weights_only=True)``; rows keep their field order in ``analyses.jsonl``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from torch import Tensor

from grokedge.experiments.gap_flow import (
    GapFlowTerms,
    mode_gap,
    observed_rate,
    prediction_agreement,
)

RAW, EFFECTIVE = "raw", "effective"
DRIVINGS = (RAW, EFFECTIVE)
"""Which gradient projection drives the prediction: ∇L·v_j as written, or the newest
delta's gradient part (see :func:`~grokedge.experiments.gap_flow.effective_gradients`)."""
BACKWARD, FORWARD = "backward", "forward"


class PredictionPair(NamedTuple):
    """One comparison: the analysed window's ``step``, its mode ``k``, the predicted dg/dt
    (``predicted`` raw, ``predicted_eff`` effective; per optimizer step) and the observed
    one (NaN when undefined)."""

    step: int
    k: int
    predicted: float
    predicted_eff: float
    observed: float


class WindowBalance(NamedTuple):
    """Term 3 / |Term 2| of an analysed window, raw and effective."""

    step: int
    balance: float
    balance_eff: float


class PendingWindow(NamedTuple):
    """An analysed window awaiting its forward observation (the next window's gap)."""

    step: int
    k: int
    gap: float
    predicted: float
    predicted_eff: float


class Spectrum(NamedTuple):
    """A Gram window's ``step`` and its singular values σ (descending)."""

    step: int
    sigma: list[float]


class GapFlowRecord:
    """Predicted and observed dg/dt of every analysed window, and their agreement.

    Example:
        >>> record = GapFlowRecord()
        >>> record.on_window(100, [3.0, 2.0, 1.0])
        False
        >>> record.agreement(BACKWARD)["n"]
        0.0
    """

    def __init__(self) -> None:
        self.spectra: list[Spectrum] = []  # the latest two windows
        self.pending: PendingWindow | None = None
        self.backward: list[PredictionPair] = []
        self.forward: list[PredictionPair] = []
        self.balances: list[WindowBalance] = []

    def on_window(self, step: int, sigma: Tensor | list[float]) -> bool:
        """Note a new Gram window's spectrum σ [W']; True when it completed a forward pair."""
        pending, completed = self.pending, False
        if pending is not None and self.spectra and self.spectra[-1].step == pending.step:
            observed = observed_rate(pending.gap, mode_gap(sigma, pending.k), step - pending.step)
            self.forward.append(
                PredictionPair(
                    pending.step, pending.k, pending.predicted, pending.predicted_eff, observed
                )
            )
            completed = True
        self.pending = None
        values = sigma.tolist() if isinstance(sigma, Tensor) else list(sigma)
        self.spectra = [*self.spectra[-1:], Spectrum(int(step), values)]
        return completed

    def record(self, window_step: int, terms: GapFlowTerms, weights_step: int) -> float:
        """Record an analysed window's terms (the weights of ``weights_step``); returns the
        observed dg/dt over the interval before the window (NaN when unknown)."""
        observed = math.nan
        before = self.spectra[-2] if len(self.spectra) >= 2 else None
        if before is not None and self.spectra[-1].step == window_step:
            observed = observed_rate(
                mode_gap(before.sigma, terms.k), terms.gap, window_step - before.step
            )
        self.backward.append(
            PredictionPair(window_step, terms.k, terms.predicted, terms.predicted_eff, observed)
        )
        self.balances.append(WindowBalance(window_step, terms.balance, terms.balance_eff))
        if window_step == weights_step:  # weights and window agree: the next window completes
            self.pending = PendingWindow(
                window_step, terms.k, terms.gap, terms.predicted, terms.predicted_eff
            )
        return observed

    def agreement(self, which: str, driving: str = RAW) -> dict[str, float]:
        """``prediction_agreement`` of the ``backward`` or ``forward`` pairs so far, for the
        ``raw`` or ``effective`` prediction."""
        pairs = self.backward if which == BACKWARD else self.forward
        predicted = [p.predicted if driving == RAW else p.predicted_eff for p in pairs]
        return prediction_agreement(predicted, [p.observed for p in pairs])

    def agreement_scalars(self, which: str) -> dict[str, float]:
        """``gapflow/{corr,spearman,sign_agreement}[_eff]_{which}`` and ``pairs_{which}``."""
        out = {}
        for driving, tag in ((RAW, ""), (EFFECTIVE, "_eff")):
            a = self.agreement(which, driving)
            out[f"gapflow/corr{tag}_{which}"] = a["pearson"]
            out[f"gapflow/spearman{tag}_{which}"] = a["spearman"]
            out[f"gapflow/sign_agreement{tag}_{which}"] = a["sign_agreement"]
        out[f"gapflow/pairs_{which}"] = self.agreement(which)["n"]
        return out

    def summary_fields(self, driving: str) -> dict[str, Any]:
        """Fields for ``summary.json``: the agreement of each kind of pair and prediction."""
        out: dict[str, Any] = {}
        for which in (FORWARD, BACKWARD):
            for kind, tag in ((RAW, ""), (EFFECTIVE, "_eff")):
                a = self.agreement(which, kind)
                out[f"gapflow{tag}_{which}_pearson"] = a["pearson"]
                out[f"gapflow{tag}_{which}_spearman"] = a["spearman"]
                out[f"gapflow{tag}_{which}_sign_agreement"] = a["sign_agreement"]
            out[f"gapflow_{which}_pairs"] = int(self.agreement(which)["n"])
        out["gapflow_driving"] = driving
        out["gapflow_windows"] = len(self.balances)
        return out

    def balances_of(self, driving: str) -> list[tuple[int, float]]:
        """(window step, balance) of every analysed window under the ``driving`` estimator."""
        return [(b.step, b.balance if driving == RAW else b.balance_eff) for b in self.balances]

    def state_dict(self) -> dict[str, Any]:
        return {
            "spectra": [list(s) for s in self.spectra],
            "pending": None if self.pending is None else self.pending._asdict(),
            "backward": [list(p) for p in self.backward],
            "forward": [list(p) for p in self.forward],
            "balances": [list(b) for b in self.balances],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.spectra = [Spectrum(int(s[0]), list(s[1])) for s in state.get("spectra", [])]
        pending = state.get("pending")
        self.pending = None if pending is None else PendingWindow(**pending)
        self.backward = [PredictionPair(*p) for p in state.get("backward", [])]
        self.forward = [PredictionPair(*p) for p in state.get("forward", [])]
        self.balances = [WindowBalance(*b) for b in state.get("balances", [])]
