"""Gradient / weight-decay split of the edge's energy (docs/theory.md §1).

Inputs are the per-delta projections of ``EdgeState``: ``grad_proj``, ``wd_proj`` [W', k]
(δ_grad,i · v_k and δ_wd,i · v_k, parameter units). All read-outs are invariant to the
sign of v_k.
"""

from __future__ import annotations

from torch import Tensor


def energy_fractions(grad_proj: Tensor, wd_proj: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Energy shares and alignment on each edge direction over the window's deltas.

    gE_k = mean_i (δ_grad,i·v_k)², wE_k = mean_i (δ_wd,i·v_k)²,
    grad_frac = gE/(gE + wE), wd_frac = wE/(gE + wE),
    alignment_k = mean_i (δ_grad,i·v_k)(δ_wd,i·v_k)  (squared parameter units; > 0: the
    two parts push the same way along v_k, < 0: they oppose).

    Args:
        grad_proj, wd_proj: [W', k].
    Returns:
        (grad_frac [k], wd_frac [k], alignment [k]); the fractions are NaN where both
        energies are zero (e.g. v_k = 0 because σ_k = 0).
    """
    if grad_proj.shape != wd_proj.shape or grad_proj.ndim != 2:
        raise ValueError(
            f"grad_proj and wd_proj must both be [W', k], got {list(grad_proj.shape)} "
            f"and {list(wd_proj.shape)}"
        )
    g_energy = (grad_proj**2).mean(dim=0)
    w_energy = (wd_proj**2).mean(dim=0)
    total = g_energy + w_energy
    # 0/0 -> NaN is intended: no energy, no share.
    return g_energy / total, w_energy / total, (grad_proj * wd_proj).mean(dim=0)


def latest_energy_fractions(grad_proj: Tensor, wd_proj: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``energy_fractions`` of the newest delta alone (last row of the projections)."""
    return energy_fractions(grad_proj[-1:], wd_proj[-1:])


def trapezoid_wd(
    theta_prev: Tensor, theta_curr: Tensor, lr: float, weight_decay: float, n_steps: int
) -> Tensor:
    """The paper's approximation of an interval's weight-decay part, −η ω N (θ_prev + θ_curr)/2.

    For comparison against the exact per-step accumulation of ``weight_decay``; assumes a
    constant lr over the N steps. Same shape, dtype and device as the inputs.
    """
    return -(lr * weight_decay * n_steps / 2) * (theta_prev + theta_curr)
