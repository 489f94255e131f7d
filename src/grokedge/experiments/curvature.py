"""Loss curvature along parameter directions (docs/theory.md §3, experiment 4; gap flow h_j).

Exact Hessian-vector products come from ``torch.func`` forward-over-reverse
(``jvp(grad(f))``): one forward-mode pass through the backward graph, about the cost of
two or three gradients and no p×p matrix. grokedge's attention is written as plain
matmul + softmax, so these transforms work (fused SDPA kernels lack forward-mode AD).

The paper instead takes a central second difference, vᵀHv ≈ (L(θ+εv) + L(θ−εv) −
2L(θ))/ε² with ε = 0.001‖θ_sel‖; :func:`finite_difference_curvature` reproduces it, to
compare with the exact value.

Loss functions map the selected parameters to a scalar loss: either the flat vector
θ_sel [p] directly, or, with ``unflatten`` (e.g. ``ParameterSelector.unflatten``), the
dict of selected tensors. :func:`flat_loss` builds the flat form from
``GrokModule.evaluate``. Curvatures are in loss units per squared parameter unit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jvp

from grokedge.batch import Batch
from grokedge.edge.selection import ParameterSelector
from grokedge.experiments.perturbation import flat_evaluator

LossFn = Callable[[Any], Tensor]
"""Selected parameters (flat [p] or a dict of tensors) -> scalar loss tensor."""

PAPER_EPS_FRACTION = 1e-3
"""The paper's finite-difference step: ε = 0.001 · ‖θ_sel‖."""


def flat_loss(
    evaluate_params: Callable[[dict[str, Tensor], Batch], Any],
    selector: ParameterSelector,
    params: Mapping[str, Tensor] | nn.Module,
    batch: Batch,
    dtype: torch.dtype | None = None,
) -> Callable[[Tensor], Tensor]:
    """``θ_sel [p] -> loss`` on ``batch`` through ``evaluate_params`` (``GrokModule.evaluate``).

    The unselected parameters are held at ``params``; ``dtype=torch.float64`` evaluates
    the whole model in double precision (see ``flat_evaluator``). Differentiable in θ_sel
    under ``torch.func`` transforms.
    """
    evaluate = flat_evaluator(evaluate_params, selector, params, dtype)
    return lambda flat: evaluate(flat, batch)[0]


def hvp(
    loss_fn: Callable[[dict[str, Tensor]], Tensor],
    params: Mapping[str, Tensor],
    vector: Mapping[str, Tensor],
) -> dict[str, Tensor]:
    """Exact Hessian-vector product H v of ``loss_fn`` at ``params``.

    Args:
        loss_fn: dict of tensors -> scalar loss.
        params: the point, name -> tensor (detached here).
        vector: the direction, same names and shapes (cast to the params' dtypes).
    Returns:
        name -> (H v)[name], shaped like ``params``.
    """
    primal = {name: t.detach() for name, t in params.items()}
    tangent = {name: vector[name].detach().to(primal[name].dtype) for name in primal}
    _, out = jvp(grad(loss_fn), (primal,), (tangent,))
    return out


def _on_flat(loss_fn: LossFn, unflatten: Callable[[Tensor], Any] | None) -> LossFn:
    return loss_fn if unflatten is None else (lambda flat: loss_fn(unflatten(flat)))


def _unit(v: Tensor, dtype: torch.dtype) -> Tensor:
    # Rayleigh quotient: the curvature along the *direction* of v, whatever its length.
    v = v.detach().to(torch.float64)
    return (v / torch.linalg.vector_norm(v)).to(dtype)


def directional_curvature(
    loss_fn: LossFn,
    flat_theta: Tensor,
    v: Tensor,
    unflatten: Callable[[Tensor], Any] | None = None,
) -> float:
    """vᵀHv / ‖v‖² at θ (= vᵀHv for a unit v), exact, via one forward-over-reverse pass.

    Args:
        loss_fn: the loss of the selected parameters (flat, or a dict with ``unflatten``).
        flat_theta: [p] the point θ_sel.
        v: [p] the direction (normalised here; a zero v gives NaN).
        unflatten: flat [p] -> what ``loss_fn`` takes; None: ``loss_fn`` takes the flat
            vector.
    """
    f = _on_flat(loss_fn, unflatten)
    theta = flat_theta.detach()
    u = _unit(v, theta.dtype)
    _, hu = jvp(grad(f), (theta,), (u,))
    return float(torch.dot(u.to(torch.float64), hu.to(torch.float64)))


def directional_curvatures(
    loss_fn: LossFn,
    flat_theta: Tensor,
    directions: Tensor,
    unflatten: Callable[[Tensor], Any] | None = None,
) -> Tensor:
    """[k] float64: :func:`directional_curvature` along each row of ``directions`` [k, p]."""
    return torch.tensor(
        [directional_curvature(loss_fn, flat_theta, v, unflatten) for v in directions],
        dtype=torch.float64,
    )


def paper_epsilon(flat_theta: Tensor) -> float:
    """The paper's finite-difference step, ``PAPER_EPS_FRACTION · ‖θ_sel‖`` (parameter units)."""
    return PAPER_EPS_FRACTION * float(torch.linalg.vector_norm(flat_theta.to(torch.float64)))


def finite_difference_curvature(
    loss_fn: LossFn,
    theta: Tensor,
    v: Tensor,
    eps: float | None = None,
    unflatten: Callable[[Tensor], Any] | None = None,
    center: float | None = None,
) -> float:
    """(L(θ+εu) + L(θ−εu) − 2L(θ)) / ε² for the unit u = v/‖v‖: the paper's estimate.

    The truncation error is O(ε²) (ε²/12 · the fourth derivative along u); the round-off
    error grows like (machine ε · L)/ε², which is why the step must not be too small. The
    points θ ± εu are formed in float64 and cast to ``theta``'s dtype, and the losses are
    combined in float64; for a fully double-precision estimate pass a float64 ``theta``
    and a float64 loss (``flat_loss(..., dtype=torch.float64)``).

    Args:
        loss_fn: the loss of the selected parameters (flat, or a dict with ``unflatten``).
        theta: [p] the point θ_sel.
        v: [p] the direction (normalised here).
        eps: the step (parameter units); None: the paper's ``0.001 · ‖θ_sel‖``.
        unflatten: as in :func:`directional_curvature`.
        center: L(θ) when the caller has it already (one evaluation shared by the
            directions); None: evaluated here.
    """
    f = _on_flat(loss_fn, unflatten)
    step = paper_epsilon(theta) if eps is None else float(eps)
    if step <= 0:
        raise ValueError(f"eps must be > 0, got {step}")
    base = theta.detach().to(torch.float64)
    u = _unit(v, torch.float64)
    with torch.no_grad():
        plus = float(f((base + step * u).to(theta.dtype)))
        minus = float(f((base - step * u).to(theta.dtype)))
        if center is None:
            center = float(f(theta.detach()))
    return (plus + minus - 2.0 * center) / step**2
