"""The gap flow equation of the spectral edge thesis, measured.

docs/theory.md §1 states the equation; docs/gap_flow.md says how each symbol is estimated.

The equation for the gap g = d_k − d_{k+1} between the signal strengths of modes k and
k+1 (k = k*, the edge):

    dg/dt ≈ −η (h_k − h_{k+1}) d̄                          Term 1: curvature asymmetry
            −η (h̄ + ω) g                                 Term 2: weight-decay damping
            +η W (G_k²/d_k − G_{k+1}²/d_{k+1})            Term 3: gradient driving

with h̄ = (h_k + h_{k+1})/2 and d̄ = (d_k + d_{k+1})/2. Every symbol is estimated from
what one window measures (docs/gap_flow.md says exactly how, and why):

- d_j = σ_j², the j-th eigenvalue of the window's Gram G = X Xᵀ (squared parameter units;
  the same units as the paper's gap g_23 = σ_2² − σ_3²);
- h_j = v_jᵀ H v_j, H the Hessian of the *training* loss with respect to θ_sel at the
  current weights (loss per squared parameter unit), exact (forward-over-reverse HVP);
- G_j, the gradient projected on v_j, two ways: *raw*, G_j = ∇L(θ) · v_j, the full-batch
  training-loss gradient on the unit v_j (loss per parameter unit; the equation as
  written, exact for plain gradient descent); *effective*, G_j^eff = −(δ_grad · v_j)/(η N),
  the gradient part of the window's newest delta (N optimizer steps) along v_j expressed
  as the gradient plain gradient descent would have needed to make it: what Adam(W)'s
  preconditioned update actually applied along v_j. Term 3 (and the balance, the
  prediction) are reported with both; under AdamW they differ by orders of magnitude;
- η the current learning rate, ω the decoupled weight decay of the selected parameters'
  optimizer group, W = W' the number of deltas in the window;
- t counts optimizer steps: dg/dt is per optimizer step.

The equation is a heuristic for plain gradient flow; for Adam(W) its terms are not even
dimensionally homogeneous, so only the *sign and relative size* of the terms and the
correlation of the prediction with the observed change of g carry meaning, not its
absolute scale. grokedge measures exactly that.

Everything here is pure torch (no Lightning): the callback ``GapFlowCallback`` feeds it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import grad

from grokedge.edge.geometry import kstar_ratio
from grokedge.experiments.curvature import directional_curvature

LossFn = Callable[[Tensor], Tensor]
"""Flat θ_sel [p] -> scalar training loss (differentiable under ``torch.func``)."""


@dataclass(frozen=True)
class GapFlowTerms:
    """The measured terms of the gap flow equation at one window (floats; NaN: undefined).

    Attributes:
        k: the mode k (1-based; the gap is between modes k and k+1).
        d_k, d_k1: signal strengths σ_k², σ_{k+1}² (squared parameter units).
        gap: g = d_k − d_{k+1}.
        h_k, h_k1: curvatures v_jᵀHv_j of the training loss (loss / parameter unit²).
        grad_k, grad_k1: gradient projections G_j = ∇L·v_j (loss / parameter unit).
        lr, weight_decay: η and ω of the selected parameters' optimizer group.
        window: W, deltas in the window.
        term1, term2, term3: the three terms (their sum is ``predicted``), per step.
        predicted: the equation's dg/dt.
        balance: Term 3 / |Term 2| (gradient driving over weight-decay damping;
            ±inf if Term 2 is 0 and Term 3 is not, NaN if both are).
        grad_eff_k, grad_eff_k1: the effective gradient projections G_j^eff (NaN if not
            given); ``term3_eff``, ``predicted_eff``, ``balance_eff``: Term 3, the
            prediction and the balance with them in place of G_j.
    """

    k: int
    d_k: float
    d_k1: float
    gap: float
    h_k: float
    h_k1: float
    grad_k: float
    grad_k1: float
    lr: float
    weight_decay: float
    window: int
    term1: float
    term2: float
    term3: float
    predicted: float
    balance: float
    grad_eff_k: float = math.nan
    grad_eff_k1: float = math.nan
    term3_eff: float = math.nan
    predicted_eff: float = math.nan
    balance_eff: float = math.nan

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def signal_strengths(sigma: Tensor) -> Tensor:
    """[W'] float64: d_j = σ_j² (the eigenvalues of G = X Xᵀ), from σ [W'] descending."""
    return sigma.to(torch.float64) ** 2


def mode_gap(sigma: Tensor | Sequence[float], k: int) -> float:
    """g = σ_k² − σ_{k+1}² (1-based k); NaN when the window has no mode k+1."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    if not 1 <= k < s.numel():
        return math.nan
    return float(s[k - 1] ** 2 - s[k] ** 2)


def balance(term3: float, term2: float) -> float:
    """Term 3 / |Term 2|: > 1 gradient driving dominates, < 1 weight-decay damping does."""
    if term2 != 0:
        return term3 / abs(term2)
    if term3 == 0 or math.isnan(term3):
        return math.nan
    return math.copysign(math.inf, term3)


def _driving(grad_j: float, d_j: float) -> float:
    # G²/d with d = 0 (a rank-deficient window) has no value: NaN, never inf.
    return grad_j**2 / d_j if d_j > 0 else math.nan


def gap_flow_terms(
    k: int,
    d_k: float,
    d_k1: float,
    h_k: float,
    h_k1: float,
    grad_k: float,
    grad_k1: float,
    lr: float,
    weight_decay: float,
    window: int,
    grad_eff_k: float = math.nan,
    grad_eff_k1: float = math.nan,
) -> GapFlowTerms:
    """The three terms from the measured symbols (pure arithmetic, float64).

    Term 1 = −η (h_k − h_{k+1}) (d_k + d_{k+1})/2, Term 2 = −η ((h_k + h_{k+1})/2 + ω) g,
    Term 3 = η W (G_k²/d_k − G_{k+1}²/d_{k+1}); predicted dg/dt = their sum. The ``_eff``
    fields repeat Term 3, the sum and the balance with ``grad_eff_*`` as G.
    """
    gap = d_k - d_k1
    h_bar = (h_k + h_k1) / 2
    d_bar = (d_k + d_k1) / 2
    term1 = -lr * (h_k - h_k1) * d_bar
    term2 = -lr * (h_bar + weight_decay) * gap
    term3 = lr * window * (_driving(grad_k, d_k) - _driving(grad_k1, d_k1))
    term3_eff = lr * window * (_driving(grad_eff_k, d_k) - _driving(grad_eff_k1, d_k1))
    return GapFlowTerms(
        k=int(k),
        d_k=float(d_k),
        d_k1=float(d_k1),
        gap=float(gap),
        h_k=float(h_k),
        h_k1=float(h_k1),
        grad_k=float(grad_k),
        grad_k1=float(grad_k1),
        lr=float(lr),
        weight_decay=float(weight_decay),
        window=int(window),
        term1=float(term1),
        term2=float(term2),
        term3=float(term3),
        predicted=float(term1 + term2 + term3),
        balance=balance(float(term3), float(term2)),
        grad_eff_k=float(grad_eff_k),
        grad_eff_k1=float(grad_eff_k1),
        term3_eff=float(term3_eff),
        predicted_eff=float(term1 + term2 + term3_eff),
        balance_eff=balance(float(term3_eff), float(term2)),
    )


def curvatures_and_gradients(
    loss_fn: LossFn, theta: Tensor, directions: Tensor
) -> tuple[Tensor, Tensor]:
    """h_j = v_jᵀHv_j (exact HVP) and G_j = ∇L·v_j for each row of ``directions``.

    Args:
        loss_fn: flat θ_sel [p] -> scalar loss (the training loss).
        theta: [p] the point.
        directions: [m, p] directions (normalised here: h and G are per unit direction).
    Returns:
        (h [m], G [m]), float64 CPU. One gradient for all G_j, one HVP per direction.
    """
    if directions.ndim != 2 or directions.shape[1] != theta.shape[0]:
        raise ValueError(f"directions must be [m, {theta.shape[0]}], got {list(directions.shape)}")
    point = theta.detach()
    gradient = grad(loss_fn)(point).detach().to(torch.float64)
    h, g = [], []
    for v in directions:
        unit = v.detach().to(torch.float64)
        unit = unit / torch.linalg.vector_norm(unit)
        h.append(directional_curvature(loss_fn, point, v))
        g.append(float(gradient @ unit))
    return torch.tensor(h, dtype=torch.float64), torch.tensor(g, dtype=torch.float64)


def effective_gradients(grad_proj_newest: Tensor, lr: float, steps_per_delta: int) -> Tensor:
    """G_j^eff = −(δ_grad · v_j) / (η N) for the newest delta's gradient part.

    Args:
        grad_proj_newest: [m] δ_grad · v_j of the newest delta (``EdgeState.grad_proj[-1]``,
            parameter units).
        lr: η (per step; taken as constant over the delta's N steps).
        steps_per_delta: N, optimizer steps per delta (the Gram interval).
    Returns:
        [m] float64, loss per parameter unit (the gradient plain descent would need);
        NaN if η <= 0.
    """
    g = grad_proj_newest.to(torch.float64)
    if lr <= 0 or steps_per_delta < 1:
        return torch.full_like(g, math.nan)
    return -g / (lr * steps_per_delta)


def mode_coefficients(sigma: Tensor, eigvecs: Tensor, modes: Sequence[int]) -> Tensor:
    """[m, W'] float64: the chronological coefficients c with v_j = c_j · X = Xᵀu_j/σ_j.

    For modes beyond the materialised edge vectors (``EdgeState.top_k``): combine them with
    the window's deltas (``UpdateWindow.combine``) to get v_j. Rows of modes with σ_j = 0
    are zero. ``modes`` are 1-based.
    """
    s = sigma.to(torch.float64)
    u = eigvecs.to(torch.float64)
    rows = []
    for j in modes:
        sj = float(s[j - 1])
        rows.append(u[:, j - 1] / sj if sj > 0 else torch.zeros_like(u[:, j - 1]))
    return torch.stack(rows)


def newest_grad_projections(
    sigma: Tensor, eigvecs: Tensor, cross_gram: Tensor, modes: Sequence[int]
) -> Tensor:
    """[m] float64: δ_grad · v_j of the window's newest delta, from W×W algebra alone.

    δ · v_j = σ_j u_j[i] and δ_wd · v_j = (C u_j)[i]/σ_j with C = X_wd Xᵀ
    (``EdgeState.cross_gram``), i the newest (last) delta; 0 where σ_j = 0.
    """
    s = sigma.to(torch.float64)
    u = eigvecs.to(torch.float64)
    c = cross_gram.to(torch.float64)
    out = []
    for j in modes:
        sj = float(s[j - 1])
        if sj <= 0:
            out.append(0.0)
            continue
        uj = u[:, j - 1]
        out.append(float(sj * uj[-1] - (c @ uj)[-1] / sj))
    return torch.tensor(out, dtype=torch.float64)


def gap_flow_at(
    sigma: Tensor,
    vectors: Tensor,
    count: int,
    loss_fn: LossFn,
    theta: Tensor,
    lr: float,
    weight_decay: float,
    k: int | None = None,
    grad_proj_newest: Tensor | None = None,
    steps_per_delta: int = 1,
) -> GapFlowTerms | None:
    """The gap flow terms of one window (``EdgeState`` fields in, terms out).

    Args:
        sigma: [W'] singular values of the window (``EdgeState.sigma``).
        vectors: [top_k, p] edge vectors v_1..v_top_k (``EdgeState.vectors``).
        count: W', deltas in the window (``EdgeState.count``), used as W.
        loss_fn: flat θ_sel -> training loss.
        theta: [p] the current θ_sel.
        lr, weight_decay: η and ω.
        k: the mode; None: k* = argmax_j σ_j/σ_{j+1} of this window.
        grad_proj_newest: [top_k] δ_grad · v_j of the newest delta
            (``EdgeState.grad_proj[-1]``) for the effective gradients; None: NaN.
        steps_per_delta: N, optimizer steps per delta.
    Returns:
        The terms, or None when modes k and k+1 are not both available (k+1 beyond W' or
        ``top_k``, or σ_{k+1} = 0: no vector).
    """
    kk = kstar_ratio(sigma) if k is None else int(k)
    if kk < 1 or kk + 1 > min(sigma.numel(), vectors.shape[0]) or float(sigma[kk]) <= 0:
        return None
    d = signal_strengths(sigma)
    h, g = curvatures_and_gradients(loss_fn, theta, vectors[kk - 1 : kk + 1].to(theta.dtype))
    g_eff = [math.nan, math.nan]
    if grad_proj_newest is not None:
        eff = effective_gradients(grad_proj_newest[kk - 1 : kk + 1], lr, steps_per_delta)
        g_eff = [float(x) for x in eff]
    return gap_flow_terms(
        kk,
        float(d[kk - 1]),
        float(d[kk]),
        float(h[0]),
        float(h[1]),
        float(g[0]),
        float(g[1]),
        lr,
        weight_decay,
        count,
        g_eff[0],
        g_eff[1],
    )


def observed_rate(gap_before: float, gap_after: float, steps: int) -> float:
    """(g_after − g_before) / steps: the observed dg/dt per optimizer step; NaN if undefined."""
    if steps <= 0 or not (math.isfinite(gap_before) and math.isfinite(gap_after)):
        return math.nan
    return (gap_after - gap_before) / steps


def _rank(x: Tensor) -> Tensor:
    # Average ranks (ties share their mean rank), for Spearman's ρ.
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(x.numel(), dtype=x.dtype)
    for value in torch.unique(x):
        tied = x == value
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = float(torch.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / den if den > 0 else math.nan


def prediction_agreement(predicted: Sequence[float], observed: Sequence[float]) -> dict[str, float]:
    """How well predicted dg/dt tracks observed dg/dt over pairs (non-finite pairs dropped).

    Returns ``n`` (pairs used), ``pearson`` (r), ``spearman`` (ρ, rank correlation: robust
    to the equation's unknown scale and to outliers), ``sign_agreement`` (fraction of
    pairs whose signs agree, zeros counting as disagreement) and ``scale`` (least-squares
    slope of observed on predicted through the origin: how far off the equation's
    absolute scale is). NaN where fewer than 2 pairs (or no variance).
    """
    p = torch.as_tensor(list(predicted), dtype=torch.float64)
    o = torch.as_tensor(list(observed), dtype=torch.float64)
    if p.shape != o.shape:
        raise ValueError(f"predicted and observed differ in length: {p.numel()} vs {o.numel()}")
    keep = torch.isfinite(p) & torch.isfinite(o)
    p, o = p[keep], o[keep]
    n = int(p.numel())
    out = {"n": float(n), "pearson": math.nan, "spearman": math.nan}
    out["sign_agreement"] = (
        float((torch.sign(p) * torch.sign(o) > 0).double().mean()) if n else math.nan
    )
    pp = float((p * p).sum())
    out["scale"] = float((p * o).sum()) / pp if pp > 0 else math.nan
    if n >= 2:
        out["pearson"] = _pearson(p, o)
        out["spearman"] = _pearson(_rank(p), _rank(o))
    return out
