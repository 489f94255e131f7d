"""Edge ablation and its random controls (docs/theory.md §3, experiment 2, and §5).

The paper removes the edge subspace from the selected parameters,
θ' = θ − Σ_k (θ·v_k) v_k, and compares the change of a metric (token accuracy, loss)
with the same removal along random orthonormal subspaces of the same dimension. A
random k-dimensional subspace of R^p holds only about k/p of ‖θ‖², so that control
moves θ by almost nothing and the paper's ratio |Δ_edge| / |mean Δ_random| divides by
nearly zero (§5). The *norm-matched* control fixes this: random directions scaled so
that ‖Δθ‖ equals the edge removal's displacement d = ‖θ − θ'‖.

The edge, however, can lie largely along θ: removing it then deletes a large share of
‖θ‖², while a random direction of R^p is nearly orthogonal to θ, so the
norm-matched displacement leaves ‖θ‖ almost unchanged. The *shrink* control moves θ the
same distance d straight toward 0, θ' = θ·(1 − d/‖θ‖): if the edge's effect were only
that of a smaller weight norm, the shrink would show it too. It is deterministic (no
draws). Both removals record the share of ‖θ‖² they delete
(:func:`theta_sq_removed_fraction`): at equal distance d = r‖θ‖ the edge removes r², the
shrink 1 − (1 − r)² ≈ 2r (more: it is the displacement of length d that shortens θ most).
The *norm-equal shrink* therefore scales θ to the norm the edge removal leaves,
θ' = θ·‖θ_edge‖/‖θ‖ = θ·sqrt(1 − r²) (θ_edge = θ − Σ_k (θ·v_k) v_k, an orthogonal
projection): it deletes the same share r² of ‖θ‖² as the edge, by a displacement
(1 − sqrt(1 − r²))‖θ‖ ≈ r²‖θ‖/2, shorter than d. Both shrinks are one scaling
(:func:`scale_theta`) with different factors (:func:`shrink_factor`,
:func:`norm_equal_factor`).

All vectors live in the flat layout of :class:`~grokedge.spectral.ParameterSelector`
(θ_sel ∈ R^p, parameter units). Random draws are made on the CPU from a seed derived
from ``(seed, index)``, so draw ``index`` is the same on every device, for every ``n``,
and can be produced one at a time (n·k·p memory is never needed at once).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from grokedge.batch import Batch
from grokedge.spectral.perturbation import FlatEvaluate

RATIO_FLOOR = 1e-8
"""Added to |mean Δ_random| in the paper's ratio so that it stays finite."""

RANK_RTOL = 1e-10
"""A QR column whose |R_jj| is below this fraction of the largest one is dependent."""

DEFAULT_N_RANDOM = 20
"""The paper's number of random subspaces per ablation."""


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
            as ``sharding.sharded_shrink_toward_zero`` does); computed here if None. The
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


# ---------------------------------------------------------------------------- random draws


def draw_generator(seed: int, index: int) -> torch.Generator:
    """CPU generator of random draw ``index`` of the stream ``seed``.

    ``SeedSequence`` mixes ``(seed, index)`` into independent streams, so draws do not
    depend on how many were made before (chunk-wise generation, resumption).
    """
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def random_orthonormal_subspace(
    k: int,
    p: int,
    seed: int,
    index: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Random subspace number ``index``: [k, p] orthonormal rows.

    QR of a k×p standard Gaussian (float64, CPU): uniformly distributed on the
    Grassmannian. The signs are fixed so that R has a positive diagonal, which makes the
    rows the Gram–Schmidt orthonormalisation of the Gaussian rows: a function of the
    draw alone, not of the QR routine.
    """
    if not 0 < k <= p:
        raise ValueError(f"need 0 < k <= p, got k={k}, p={p}")
    gauss = torch.randn(p, k, generator=draw_generator(seed, index), dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    q = q * torch.sign(r.diagonal())
    return q.T.contiguous().to(device=device, dtype=dtype)


def iter_random_orthonormal_subspaces(
    n: int,
    k: int,
    p: int,
    seed: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Iterator[Tensor]:
    """Yields the n subspaces [k, p] of :func:`random_orthonormal_subspaces` one at a time."""
    for index in range(n):
        yield random_orthonormal_subspace(k, p, seed, index, device, dtype)


def random_orthonormal_subspaces(
    n: int,
    k: int,
    p: int,
    seed: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """[n, k, p]: n random k-dimensional orthonormal subspaces of R^p (the paper's control).

    Needs n·k·p memory; :func:`iter_random_orthonormal_subspaces` yields the same
    subspaces one at a time.
    """
    return torch.stack(list(iter_random_orthonormal_subspaces(n, k, p, seed, device, dtype)))


def random_displacement(
    norm: float,
    p: int,
    seed: int,
    index: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Draw ``index``: [p] a uniformly random direction of R^p scaled to length ``norm``."""
    if norm < 0:
        raise ValueError(f"norm must be >= 0, got {norm}")
    gauss = torch.randn(p, generator=draw_generator(seed, index), dtype=torch.float64)
    return (gauss * (norm / torch.linalg.vector_norm(gauss))).to(device=device, dtype=dtype)


def iter_norm_matched_displacements(
    n: int,
    displacement_norm: float,
    p: int,
    seed: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Iterator[Tensor]:
    """Yields the n displacements [p] of :func:`norm_matched_displacements` one at a time."""
    for index in range(n):
        yield random_displacement(displacement_norm, p, seed, index, device, dtype)


def norm_matched_displacements(
    n: int,
    displacement_norm: float,
    p: int,
    seed: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """[n, p]: random displacements Δθ with ‖Δθ‖ = ``displacement_norm`` (parameter units).

    The control the paper lacks (docs/theory.md §5): pass the edge removal's displacement
    ‖θ − θ'‖ and evaluate θ + Δθ. Norms are exact in float64 (relative error ~1e-16; a
    float32 result carries its own rounding, ~1e-7).
    """
    return torch.stack(
        list(iter_norm_matched_displacements(n, displacement_norm, p, seed, device, dtype))
    )


# ---------------------------------------------------------------------------- summary


def ablation_summary(delta_edge: float, deltas_random: Sequence[float] | Tensor) -> dict:
    """The edge effect against a control distribution of random effects.

    Args:
        delta_edge: change of a metric when the edge is removed (metric units, e.g.
            accuracy after − before).
        deltas_random: the same change for each random control.
    Returns:
        dict with ``delta_edge``; ``n_random``; ``random_mean``, ``random_sd`` (sample
        sd, ddof = 1; NaN with fewer than two controls), ``random_max_abs``;
        ``ratio`` = |Δ_edge| / (|mean Δ_random| + 1e-8) (the paper's); ``z`` =
        (Δ_edge − mean) / sd, NaN where sd is 0 or undefined (e.g. every random Δacc
        exactly 0: the controls show no spread to measure against); ``frac_random_ge`` =
        share of controls with |Δ_random| >= |Δ_edge| (an empirical p-value, defined
        even when sd = 0).
    """
    randoms = [float(x) for x in deltas_random]
    n = len(randoms)
    if n == 0:
        raise ValueError("deltas_random is empty")
    mean = sum(randoms) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in randoms) / (n - 1)) if n > 1 else math.nan
    z = (delta_edge - mean) / sd if sd > 0 else math.nan
    return {
        "delta_edge": float(delta_edge),
        "n_random": n,
        "random_mean": mean,
        "random_sd": sd,
        "random_max_abs": max(abs(x) for x in randoms),
        "ratio": paper_ratio(delta_edge, mean),
        "z": z,
        "frac_random_ge": sum(abs(x) >= abs(delta_edge) for x in randoms) / n,
    }


def paper_ratio(delta_edge: float, delta_control: float) -> float:
    """The paper's ratio |Δ_edge| / (|Δ_control| + 1e-8) against a control's (mean) effect."""
    return abs(delta_edge) / (abs(delta_control) + RATIO_FLOOR)


# ---------------------------------------------------------------------------- experiment


@dataclass(frozen=True)
class ShrinkMeasure:
    """What a shrink control θ → θ·c measured (whole-vector quantities).

    Attributes:
        loss, acc: metrics at θ·c (loss in nats, accuracy in [0, 1]).
        displacement: ‖θ − θ·c‖, parameter units (the shrink: d unless clamped; the
            norm-equal shrink: (1 − c)‖θ‖).
        norm: ‖θ·c‖, parameter units.
        factor: c (:func:`shrink_factor` or :func:`norm_equal_factor`).
        clamped: the shrink's d > ‖θ‖, so c = 0 (never for the norm-equal shrink).
    """

    loss: float
    acc: float
    displacement: float
    norm: float
    factor: float
    clamped: bool


def measure_scaled(
    theta: Tensor,
    factor: float,
    evaluate: Callable[[Tensor], tuple[float, float]],
    norm: Callable[[Tensor], float],
    *,
    clamped: bool = False,
) -> ShrinkMeasure:
    """Evaluates and measures θ·c (:func:`scale_theta`): the step both shrink controls
    share, in the single-process and the sharded experiment.

    Args:
        theta: [p] θ_sel, or [n_local] this rank's slice of it.
        factor: c, from the whole vector's norms.
        evaluate: θ·c in ``theta``'s layout -> (loss, acc) (gathers the slices when
            sharded).
        norm: ‖·‖ of the whole vector a float64 tensor in ``theta``'s layout is (a slice
            of) (collective when sharded).
        clamped: recorded as given (:func:`shrink_factor`).
    """
    scaled = scale_theta(theta, factor)
    loss, acc = evaluate(scaled)
    # Measured on the vectors (not (1 − c)‖θ‖): θ·c carries θ's dtype rounding, as the
    # edge removal's displacement does.
    return ShrinkMeasure(
        loss=loss,
        acc=acc,
        displacement=norm((theta - scaled).to(torch.float64)),
        norm=norm(scaled.to(torch.float64)),
        factor=factor,
        clamped=clamped,
    )


def ablation_experiment(
    evaluate: FlatEvaluate,
    theta: Tensor,
    basis: Tensor,
    batch: Batch,
    n_random: int = DEFAULT_N_RANDOM,
    seed: int = 0,
) -> dict[str, Any]:
    """Edge removal with its four controls, on one evaluation batch.

    1. edge: θ' = :func:`remove_subspace` (θ, ``basis``);
    2. random: the same removal along ``n_random`` random orthonormal subspaces of the
       same dimension (the paper's control);
    3. norm-matched: θ + Δθ for ``n_random`` random Δθ with ‖Δθ‖ = d = ‖θ − θ'‖;
    4. shrink: θ·(1 − d/‖θ‖) (:func:`shrink_toward_zero`), the same distance d along −θ;
       norm-equal shrink: θ·‖θ'‖/‖θ‖ (:func:`norm_equal_factor`), the same ‖θ'‖.

    Args:
        evaluate: ``(flat θ [p], batch) -> (loss, acc, logits)`` (see
            :func:`~grokedge.spectral.perturbation.flat_evaluator`).
        theta: [p] the current selected parameters.
        basis: [k, p] orthonormal edge rows (e.g. ``EdgeState.vectors[:2]``).
        seed: seed of the random draws (subspaces use stream ``seed``, displacements
            ``seed + 1``).
    Returns:
        dict: ``base_loss``, ``base_acc``, ``edge_loss``, ``edge_acc``, ``displacement``
        (‖θ − θ'‖, parameter units), ``random_dacc``/``random_dloss`` and
        ``matched_dacc``/``matched_dloss`` (lists), and ``acc_random``, ``loss_random``,
        ``acc_matched``, ``loss_matched``: :func:`ablation_summary` of each; see
        :func:`ablation_result` for the norms and the shrink controls' keys.
    """
    # One implementation serves both: on one process the shard is the whole vector and
    # every collective the identity (sharding imports this module, hence the late import).
    from grokedge.spectral.sharding import Shard, sharded_ablation_experiment

    shard = Shard.of(theta.shape[0])
    return sharded_ablation_experiment(evaluate, theta, basis, batch, shard, n_random, seed)


def ablation_result(
    base_loss: float,
    base_acc: float,
    edge_loss: float,
    edge_acc: float,
    displacement: float,
    random_d: Sequence[tuple[float, float]],
    matched_d: Sequence[tuple[float, float]],
    *,
    theta_norm: float,
    edge_norm: float,
    shrink: ShrinkMeasure,
    shrink_norm: ShrinkMeasure,
) -> dict[str, Any]:
    """The dict of :func:`ablation_experiment` from its measurements ((Δloss, Δacc) per
    random subspace and per norm-matched displacement, the norms ‖θ‖ and ‖θ_edge‖, the
    shrink controls'); shared with the sharded form (``sharding.sharded_ablation_experiment``).

    Besides the keys listed in :func:`ablation_experiment`: ``theta_norm`` (‖θ‖),
    ``theta_sq_removed_frac`` (share of ‖θ‖² the edge removal deletes,
    :func:`theta_sq_removed_fraction`); for the shrink (prefix ``shrink``) and the
    norm-equal shrink (prefix ``shrink_norm``) each: ``<prefix>_loss``, ``_acc``,
    ``_dloss``, ``_dacc``, ``_displacement`` (‖θ − θ·c‖), ``_factor`` (c), ``_clamped``,
    ``_theta_sq_removed_frac`` and ``_ratio`` = |Δ_edge acc| / (|Δ_control acc| + 1e-8),
    the paper's ratio against that control (one deterministic control each: no spread
    for a z or an :func:`ablation_summary`).
    """
    d_loss, d_acc = edge_loss - base_loss, edge_acc - base_acc

    def control(prefix: str, measure: ShrinkMeasure) -> dict[str, Any]:
        dacc = measure.acc - base_acc
        return {
            f"{prefix}_loss": measure.loss,
            f"{prefix}_acc": measure.acc,
            f"{prefix}_dloss": measure.loss - base_loss,
            f"{prefix}_dacc": dacc,
            f"{prefix}_displacement": measure.displacement,
            f"{prefix}_factor": measure.factor,
            f"{prefix}_clamped": measure.clamped,
            f"{prefix}_theta_sq_removed_frac": theta_sq_removed_fraction(theta_norm, measure.norm),
            f"{prefix}_ratio": paper_ratio(d_acc, dacc),
        }

    return {
        "base_loss": base_loss,
        "base_acc": base_acc,
        "edge_loss": edge_loss,
        "edge_acc": edge_acc,
        "displacement": displacement,
        "theta_norm": theta_norm,
        "theta_sq_removed_frac": theta_sq_removed_fraction(theta_norm, edge_norm),
        **control("shrink", shrink),
        **control("shrink_norm", shrink_norm),
        "random_dloss": [x[0] for x in random_d],
        "random_dacc": [x[1] for x in random_d],
        "matched_dloss": [x[0] for x in matched_d],
        "matched_dacc": [x[1] for x in matched_d],
        "acc_random": ablation_summary(d_acc, [x[1] for x in random_d]),
        "loss_random": ablation_summary(d_loss, [x[0] for x in random_d]),
        "acc_matched": ablation_summary(d_acc, [x[1] for x in matched_d]),
        "loss_matched": ablation_summary(d_loss, [x[0] for x in matched_d]),
    }


def float64_norm(v: Tensor) -> float:
    """‖v‖ of a whole vector, in float64."""
    return float(torch.linalg.vector_norm(v.to(torch.float64)))


def params_norm(params: Iterable[Tensor]) -> float:
    """‖θ‖ over a sequence of tensors (float64 sum of their squares), parameter units."""
    total = 0.0
    for p in params:
        total += float(p.detach().to(torch.float64).pow(2).sum())
    return math.sqrt(total)


def edge_basis(vectors: Tensor, sigma: Tensor, indices: Sequence[int]) -> Tensor:
    """Rows ``indices`` of the edge ``vectors`` [k, p] whose σ [k] is positive
    ([k', p]; k' may be 0)."""
    keep = [i for i in indices if i < vectors.shape[0] and i < sigma.numel() and sigma[i] > 0]
    return vectors[keep]
