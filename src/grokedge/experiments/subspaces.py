"""Where the ablation moves θ_sel: removal of a subspace and the shrinks toward 0, whole or sharded.

The edge removal θ' = θ − Σ_k (θ·v_k) v_k and the two shrink controls θ·c of the ablation
(:mod:`grokedge.experiments.ablation`, docs/theory.md §3, experiment 2). All vectors live in
the flat layout of :class:`~grokedge.edge.selection.ParameterSelector` (θ_sel ∈ R^p,
parameter units); the ``sharded_*`` forms take this rank's slice and sum the dot products
over ranks (:class:`~grokedge.edge.sharding.Shard`), and are the plain forms on one rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from grokedge.edge.selection import ParameterSelector
from grokedge.edge.sharding import Shard, to_comm_device

RANK_RTOL = 1e-10
"""A QR column whose |R_jj| is below this fraction of the largest one is dependent."""


# ---------------------------------------------------------------------------- projection


def orthonormalize(basis: Tensor) -> Tensor:
    """Orthonormal rows spanning the same space as the rows of ``basis``.

    Reduced QR of ``basis``ᵀ in float64; columns whose |R_jj| falls below
    ``RANK_RTOL · max |R_ii|`` are linearly dependent (or zero rows, as ``EdgeState``
    holds where σ_k = 0) and dropped, so the result may have fewer rows.

    Args:
        basis: [k, p], any rows.
    Returns:
        [k', p], k' = rank <= k, rows orthonormal, in ``basis``'s dtype and device.
    """
    q, r = torch.linalg.qr(basis.to(torch.float64).T)
    diag = r.diagonal().abs()
    if diag.numel() == 0 or float(diag.max()) == 0.0:
        return basis.new_zeros((0, basis.shape[1]))
    keep = diag > RANK_RTOL * diag.max()
    return q[:, keep].T.to(basis.dtype)


def subspace_coefficients(theta: Tensor, basis: Tensor) -> Tensor:
    """Coefficients θ·v_k [k], float64, on ``theta``'s device.

    Linear in the parameters, so under slicing (docs/design.md, Scale) each rank computes them
    on its slice and the sum over ranks is the whole vector's coefficients.
    """
    return basis.to(torch.float64) @ theta.to(torch.float64)


def remove_subspace(
    theta: Tensor,
    basis: Tensor,
    *,
    orthonormal: bool = True,
    coefficients: Tensor | None = None,
) -> Tensor:
    """θ' = θ − Σ_k (θ·v_k) v_k: θ without its component in span{v_k}.

    Args:
        theta: [p] flat selected parameters.
        basis: [k, p] rows v_k. With ``orthonormal=True`` (default; edge vectors and
            :func:`random_orthonormal_subspace` are) they are used as given: a zero row
            removes nothing. With ``orthonormal=False`` the rows may be any spanning set
            and are first orthonormalised by :func:`orthonormalize` (QR), so the result
            is the orthogonal projection onto the complement of their span.
        coefficients: [k] the summed θ·v_k when ``theta`` and ``basis`` are slices of
            the whole vectors (see :func:`subspace_coefficients`); computed here if None.
            Only with ``orthonormal=True``.
    Returns:
        [p] θ', same dtype and device as ``theta``. The displacement ‖θ − θ'‖ equals
        ‖coefficients‖ for an orthonormal basis.
    """
    if basis.ndim != 2 or basis.shape[1] != theta.shape[0]:
        raise ValueError(f"basis must be [k, {theta.shape[0]}], got {list(basis.shape)}")
    if not orthonormal:
        if coefficients is not None:
            raise ValueError("coefficients can only be given for an orthonormal basis")
        basis = orthonormalize(basis)
    coeffs = subspace_coefficients(theta, basis) if coefficients is None else coefficients
    removed = coeffs.to(theta.device, torch.float64) @ basis.to(torch.float64)
    return (theta.to(torch.float64) - removed).to(theta.dtype)


# ---------------------------------------------------------------------------- shrink


def shrink_factor(distance: float, theta_norm: float) -> tuple[float, bool]:
    """The factor c = 1 − d/‖θ‖ with ‖θ − c·θ‖ = d: θ moved straight toward 0 by d.

    Args:
        distance: d >= 0, parameter units (the edge removal's displacement ‖θ − θ_edge‖).
        theta_norm: ‖θ‖ >= 0 of the whole vector, parameter units.
    Returns:
        (c in [0, 1], clamped). ``clamped`` is True when d > ‖θ‖: θ cannot move further
        toward 0 than 0 itself, so c = 0 and the displacement is ‖θ‖ < d. d = 0 gives
        c = 1 (nothing moves, even for θ = 0).
    """
    if distance < 0 or theta_norm < 0:
        raise ValueError(f"need distance, theta_norm >= 0, got {distance}, {theta_norm}")
    if distance == 0:
        return 1.0, False
    if distance > theta_norm:
        return 0.0, True
    return 1.0 - distance / theta_norm, False


def shrink_toward_zero(
    theta: Tensor, distance: float, *, theta_norm: float | None = None
) -> Tensor:
    """θ' = θ·max(0, 1 − d/‖θ‖): the shrink control (see :func:`shrink_factor`).

    Args:
        theta: [p] flat selected parameters (or this rank's slice of them).
        distance: d, parameter units.
        theta_norm: ‖θ‖ of the whole vector when ``theta`` is a slice (summed over ranks,
            as ``sharded_shrink_toward_zero`` does); computed here if None. The
            factor is a function of the whole vector's norm, so every slice is scaled
            alike and the slices together are the whole vector's shrink.
    Returns:
        [p] θ', same dtype and device as ``theta`` (scaled in float64). ‖θ − θ'‖ =
        min(d, ‖θ‖) up to ``theta``'s rounding.
    """
    if theta_norm is None:
        theta_norm = float64_norm(theta)
    factor, _ = shrink_factor(distance, theta_norm)
    return scale_theta(theta, factor)


def norm_equal_factor(kept_norm: float, theta_norm: float) -> float:
    """The factor c = ‖θ_edge‖/‖θ‖ with ‖c·θ‖ = ‖θ_edge‖: θ shortened to the edge removal's norm.

    θ_edge = θ − Σ_k (θ·v_k) v_k is an orthogonal projection, so ‖θ_edge‖² = ‖θ‖² − d²
    and c = sqrt(1 − r²) with r = d/‖θ‖: θ·c deletes the share r² of ‖θ‖² the edge
    removal deletes, where the shrink (:func:`shrink_factor`, c = 1 − r) deletes
    1 − (1 − r)².

    Args:
        kept_norm: ‖θ_edge‖ >= 0 of the whole vector, parameter units.
        theta_norm: ‖θ‖ >= 0 of the whole vector, parameter units.
    Returns:
        c >= 0, the ratio of the two measured norms (so ‖θ·c‖ = ‖θ_edge‖ up to rounding,
        and no cancellation in sqrt(1 − r²) as r → 1); at most 1 but for rounding.
        θ = 0 gives c = 1 (nothing to scale).
    """
    if kept_norm < 0 or theta_norm < 0:
        raise ValueError(f"need kept_norm, theta_norm >= 0, got {kept_norm}, {theta_norm}")
    if theta_norm == 0:
        return 1.0
    return kept_norm / theta_norm


def scale_theta(theta: Tensor, factor: float) -> Tensor:
    """θ·c, scaled in float64 and returned in ``theta``'s dtype and device: the one scaling
    both shrink controls apply. ``theta`` [p] or one rank's slice of it: c is a single
    number, so the scaled slices together are the scaled whole vector."""
    return (theta.to(torch.float64) * factor).to(theta.dtype)


def theta_sq_removed_fraction(theta_norm: float, moved_norm: float) -> float:
    """Share of ‖θ‖² a change θ → θ' deletes: 1 − ‖θ'‖²/‖θ‖² (NaN for θ = 0).

    Negative when θ' is longer than θ (a norm-matched displacement nearly orthogonal to θ
    lengthens it slightly). Both norms are of whole vectors, parameter units.
    """
    if theta_norm == 0:
        return math.nan
    return 1.0 - (moved_norm / theta_norm) ** 2


# ---------------------------------------------------------------------------- sharded


def sharded_shrink_toward_zero(theta: Tensor, distance: float, shard: Shard) -> Tensor:
    """This rank's slice of θ·max(0, 1 − d/‖θ‖) (collective: ‖θ‖² is summed over ranks).
    ``theta`` [n_local], ``distance`` d in parameter units; on one rank
    ``shrink_toward_zero`` itself."""
    if not shard.sharded:
        return shrink_toward_zero(theta, distance)
    return shrink_toward_zero(theta, distance, theta_norm=shard.norm(theta.to(torch.float64)))


def sharded_remove_subspace(theta: Tensor, basis: Tensor, shard: Shard) -> Tensor:
    """This rank's slice of θ − Σ_k (θ·v_k) v_k for orthonormal rows v_k (collective: the
    coefficients θ·v_k are summed over ranks). ``theta`` [n_local], ``basis`` [k, n_local];
    on one rank ``remove_subspace`` itself."""
    if not shard.sharded:
        return remove_subspace(theta, basis)
    coefficients = shard.sum(to_comm_device(shard, subspace_coefficients(theta, basis)))
    return remove_subspace(theta, basis, coefficients=coefficients.to(theta.device))


# ---------------------------------------------------------------------------- norms


def float64_norm(v: Tensor) -> float:
    """‖v‖ of a whole vector, in float64."""
    return float(torch.linalg.vector_norm(v.to(torch.float64)))


def params_norm(params: Iterable[Tensor]) -> float:
    """‖θ‖ over a sequence of tensors (float64 sum of their squares), parameter units."""
    total = 0.0
    for p in params:
        total += float(p.detach().to(torch.float64).pow(2).sum())
    return math.sqrt(total)


def theta_norms(net: nn.Module, selector: ParameterSelector) -> dict[str, float]:
    """``theta_norm`` (‖θ‖ over every parameter of ``net``) and ``theta_norm_selected``
    (over the ``selector``'s), in parameter units, float64 sums."""
    return {
        "theta_norm": params_norm(net.parameters()),
        "theta_norm_selected": params_norm(t for _, t in selector.named(net)),
    }


def edge_basis(vectors: Tensor, sigma: Tensor, indices: Sequence[int]) -> Tensor:
    """Rows ``indices`` of the edge ``vectors`` [k, p] whose σ [k] is positive
    ([k', p]; k' may be 0)."""
    keep = [i for i in indices if i < vectors.shape[0] and i < sigma.numel() and sigma[i] > 0]
    return vectors[keep]
