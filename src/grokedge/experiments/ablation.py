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

All vectors live in the flat layout of :class:`~grokedge.edge.selection.ParameterSelector`
(θ_sel ∈ R^p, parameter units). Random draws are made on the CPU from a seed derived
from ``(seed, index)``, so draw ``index`` is the same on every device, for every ``n``,
and can be produced one at a time (n·k·p memory is never needed at once).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from grokedge.batch import IGNORE_INDEX, LABELS, Batch
from grokedge.edge.sharding import Shard
from grokedge.experiments.perturbation import FlatEvaluate
from grokedge.experiments.random_controls import random_displacement_slice, random_orthonormal_slice
from grokedge.experiments.subspaces import (
    float64_norm,
    norm_equal_factor,
    scale_theta,
    sharded_remove_subspace,
    shrink_factor,
    theta_sq_removed_fraction,
)

RATIO_FLOOR = 1e-8
"""Added to |Δ_control| in the paper's ratio (as the paper writes it); the ratio is only
taken against a resolved control (:func:`control_resolved`), where the floor changes
nothing but the last digits."""


DEFAULT_N_RANDOM = 20
"""The paper's number of random subspaces per ablation."""


# ---------------------------------------------------------------------------- summary


def ablation_summary(
    delta_edge: float, deltas_random: Sequence[float] | Tensor, resolution: float | None = None
) -> dict:
    """The edge effect against a control distribution of random effects.

    Args:
        delta_edge: change of a metric when the edge is removed (metric units, e.g.
            accuracy after − before).
        deltas_random: the same change for each random control.
        resolution: the smallest change the metric can show on the evaluated batch
            (accuracy: :func:`accuracy_resolution`; None: any non-zero change counts).
    Returns:
        dict with ``delta_edge``; ``n_random``; ``random_mean``, ``random_sd`` (sample
        sd, ddof = 1; NaN with fewer than two controls), ``random_max_abs``;
        ``ratio_resolved`` (:func:`control_resolved` of the mean), ``resolution``;
        ``ratio`` = |Δ_edge| / (|mean Δ_random| + 1e-8) (the paper's) when resolved, NaN
        when not (the two Δ are the numbers to read then); ``z`` =
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
        "ratio": paper_ratio(delta_edge, mean, resolution),
        "ratio_resolved": control_resolved(mean, resolution),
        "resolution": resolution,
        "z": z,
        "frac_random_ge": sum(abs(x) >= abs(delta_edge) for x in randoms) / n,
    }


def control_resolved(delta_control: float, resolution: float | None = None) -> bool:
    """Whether a control's effect can be divided by: non-zero, and at least
    ``resolution`` in magnitude (a mean of accuracy changes below one example's quantum
    is below what the batch can show; None: only exactly 0 is unresolved)."""
    if delta_control == 0 or not math.isfinite(delta_control):
        return False
    return resolution is None or abs(delta_control) >= resolution


def paper_ratio(delta_edge: float, delta_control: float, resolution: float | None = None) -> float:
    """The paper's ratio |Δ_edge| / (|Δ_control| + 1e-8) against a control's (mean)
    effect; NaN when the control's effect is below resolution (:func:`control_resolved`):
    a floor would turn "no measurable effect" into a ratio of ~10⁸·|Δ_edge|."""
    if not control_resolved(delta_control, resolution):
        return math.nan
    return abs(delta_edge) / (abs(delta_control) + RATIO_FLOOR)


def accuracy_resolution(batch: Batch) -> float | None:
    """One example's accuracy quantum on ``batch``: 1 / (number of evaluated label
    positions, those not ``IGNORE_INDEX``); labels [B] or [B, T]. A change of accuracy
    smaller than this cannot come from the batch's predictions (a mean over controls can
    still be smaller: it is then below resolution). ``inf`` for a batch with no labelled
    position; None (unknown: only an exact 0 is unresolved) for a batch without labels."""
    labels = batch.get(LABELS) if isinstance(batch, Mapping) else None
    if not isinstance(labels, Tensor):
        return None
    n = int((labels != IGNORE_INDEX).sum())
    return 1.0 / n if n > 0 else math.inf


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
            :func:`~grokedge.experiments.perturbation.flat_evaluator`).
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
    # every collective the identity.
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
    acc_resolution: float | None = None,
) -> dict[str, Any]:
    """The dict of :func:`ablation_experiment` from its measurements ((Δloss, Δacc) per
    random subspace and per norm-matched displacement, the norms ‖θ‖ and ‖θ_edge‖, the
    shrink controls'); shared with the sharded form (:func:`sharded_ablation_experiment`).

    Besides the keys listed in :func:`ablation_experiment`: ``theta_norm`` (‖θ‖),
    ``theta_sq_removed_frac`` (share of ‖θ‖² the edge removal deletes,
    :func:`theta_sq_removed_fraction`); for the shrink (prefix ``shrink``) and the
    norm-equal shrink (prefix ``shrink_norm``) each: ``<prefix>_loss``, ``_acc``,
    ``_dloss``, ``_dacc``, ``_displacement`` (‖θ − θ·c‖), ``_factor`` (c), ``_clamped``,
    ``_theta_sq_removed_frac`` and ``_ratio`` = |Δ_edge acc| / (|Δ_control acc| + 1e-8),
    the paper's ratio against that control (one deterministic control each: no spread
    for a z or an :func:`ablation_summary`), NaN with ``_ratio_resolved`` False when that
    control's Δacc is below ``acc_resolution`` (:func:`control_resolved`; None: only an
    exact 0 is unresolved). ``acc_random`` and ``acc_matched`` use the same resolution.
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
            f"{prefix}_ratio": paper_ratio(d_acc, dacc, acc_resolution),
            f"{prefix}_ratio_resolved": control_resolved(dacc, acc_resolution),
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
        "acc_random": ablation_summary(d_acc, [x[1] for x in random_d], acc_resolution),
        "loss_random": ablation_summary(d_loss, [x[0] for x in random_d]),
        "acc_matched": ablation_summary(d_acc, [x[1] for x in matched_d], acc_resolution),
        "loss_matched": ablation_summary(d_loss, [x[0] for x in matched_d]),
    }


# -------------------------------------------------------------------------- ablation


def sharded_ablation_experiment(
    evaluate: FlatEvaluate,
    theta: Tensor,
    basis: Tensor,
    batch: Batch,
    shard: Shard,
    n_random: int = DEFAULT_N_RANDOM,
    seed: int = 0,
) -> dict[str, Any]:
    """:func:`ablation_experiment` on this rank's slices (collective).

    Projections and norms are partial dot products summed over ranks: the edge
    coefficients θ·v_k, the random subspaces' Gram (Cholesky-QR), the norm-matched
    displacements' norms, ‖θ − θ'‖, ‖θ‖ and ‖θ_edge‖ (the two shrink factors), and each
    shrink's ‖θ·c‖ and ‖θ − θ·c‖. The model, however, is evaluated on whole parameter
    vectors, so each ablated, shrunk or displaced θ is all-gathered from its slices (one
    p-vector per evaluation: 4 + 2·``n_random`` gathers). The random draws are those of the
    single-process experiment (:func:`gaussian_rows`), so results agree with a 1-process
    run to float round-off. It is also the single-process experiment: with a
    :class:`LocalCollective` shard every gather and sum is the identity, the norms are
    ``subspaces.float64_norm`` and the draws the unsharded ones, so
    ``ablation_experiment`` (which calls this with ``Shard.of(p)``) keeps its
    numbers bit for bit.

    Args:
        evaluate: ``(whole θ_sel [p], batch) -> (loss, acc, logits)``.
        theta: [n_local] this rank's slice of θ_sel.
        basis: [k, n_local] this rank's slice of orthonormal edge rows.
    Returns:
        the dict of ``ablation_experiment`` (identical keys and units).
    """
    if basis.ndim != 2 or basis.shape[1] != theta.shape[0]:
        raise ValueError(f"basis must be [k, {theta.shape[0]}], got {list(basis.shape)}")
    with torch.no_grad():
        # One process keeps the plain float64 norm (a partial inner product's square root
        # can differ from it in the last bit).
        norm = shard.norm if shard.sharded else float64_norm
        base_loss, base_acc = _scalars2(evaluate(shard.gather(theta), batch))
        edge_slice = sharded_remove_subspace(theta, basis, shard)
        edge_loss, edge_acc = _scalars2(evaluate(shard.gather(edge_slice), batch))
        displacement = norm((theta - edge_slice).to(torch.float64))
        theta_norm = norm(theta.to(torch.float64))
        edge_norm = norm(edge_slice.to(torch.float64))

        def evaluate_at(part: Tensor) -> tuple[float, float]:
            return _scalars2(evaluate(shard.gather(part), batch))

        # The factors come from the whole vector's norms, so every rank scales its slice
        # by the same c and the slices make up the single-process shrinks.
        factor, clamped = shrink_factor(displacement, theta_norm)
        shrink = measure_scaled(theta, factor, evaluate_at, norm, clamped=clamped)
        shrink_norm = measure_scaled(
            theta, norm_equal_factor(edge_norm, theta_norm), evaluate_at, norm
        )
        k = basis.shape[0]
        random_d: list[tuple[float, float]] = []
        for index in range(n_random):
            sub = random_orthonormal_slice(k, shard, seed, index, theta.device, theta.dtype)
            moved = sharded_remove_subspace(theta, sub, shard)
            loss, acc = _scalars2(evaluate(shard.gather(moved), batch))
            random_d.append((loss - base_loss, acc - base_acc))
        matched_d: list[tuple[float, float]] = []
        for index in range(n_random):
            delta = random_displacement_slice(
                displacement, shard, seed + 1, index, theta.device, theta.dtype
            )
            loss, acc = _scalars2(evaluate(shard.gather(theta + delta), batch))
            matched_d.append((loss - base_loss, acc - base_acc))
    return ablation_result(
        base_loss,
        base_acc,
        edge_loss,
        edge_acc,
        displacement,
        random_d,
        matched_d,
        theta_norm=theta_norm,
        edge_norm=edge_norm,
        shrink=shrink,
        shrink_norm=shrink_norm,
        acc_resolution=accuracy_resolution(batch),
    )


def _scalars2(result: tuple[Any, Any, Tensor]) -> tuple[float, float]:
    loss, acc, _ = result
    return float(loss), float(acc)
