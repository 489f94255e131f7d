"""Ablation, random controls, KL and ε-sweeps against hand computations and brute force."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from grokedge.batch import IGNORE_INDEX
from grokedge.edge.selection import ParameterSelector
from grokedge.edge.sharding import Shard
from grokedge.experiments.ablation import (
    ablation_experiment,
    ablation_summary,
    sharded_ablation_experiment,
)
from grokedge.experiments.perturbation import (
    epsilon_grid,
    epsilon_sweep,
    flat_evaluator,
    kl_divergence,
    sweep_extremes,
)
from grokedge.experiments.random_controls import (
    iter_norm_matched_displacements,
    iter_random_orthonormal_subspaces,
    norm_matched_displacements,
    random_orthonormal_subspace,
    random_orthonormal_subspaces,
)
from grokedge.experiments.subspaces import (
    norm_equal_factor,
    orthonormalize,
    remove_subspace,
    scale_theta,
    sharded_remove_subspace,
    sharded_shrink_toward_zero,
    shrink_factor,
    shrink_toward_zero,
    subspace_coefficients,
    theta_sq_removed_fraction,
)
from grokedge.models import CausalTransformer
from tests.test_spectral_sharding import ThreadCollective, _toy_evaluate, run_ranks

ORTHO_TOL = 1e-6
P = 500


def gauss(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------- projection


def test_remove_subspace_leaves_the_orthogonal_complement():
    theta = gauss(P, seed=1)
    basis = random_orthonormal_subspace(3, P, seed=2, dtype=torch.float64)
    out = remove_subspace(theta, basis)
    # Nothing left in the removed span ...
    assert torch.allclose(basis @ out, torch.zeros(3, dtype=torch.float64), atol=1e-12)
    # ... and the orthogonal complement untouched: out = (I - VᵀV) θ from the dense projector.
    projector = torch.eye(P, dtype=torch.float64) - basis.T @ basis
    assert torch.allclose(out, projector @ theta, atol=1e-12)
    other = gauss(P, seed=3)
    other = projector @ other  # a vector of the complement
    assert torch.allclose(out @ other, theta @ other, rtol=1e-12)
    # Displacement = ‖coefficients‖; removing twice changes nothing more.
    assert float((theta - out).norm()) == pytest.approx(float((basis @ theta).norm()), rel=1e-12)
    assert torch.allclose(remove_subspace(out, basis), out, atol=1e-12)


def test_remove_subspace_non_orthonormal_basis_and_zero_rows():
    theta = gauss(P, seed=4)
    ortho = random_orthonormal_subspace(2, P, seed=5, dtype=torch.float64)
    mixed = torch.tensor([[2.0, 1.0], [0.5, -3.0], [1.0, 1.0]], dtype=torch.float64) @ ortho
    expected = remove_subspace(theta, ortho)
    assert torch.allclose(remove_subspace(theta, mixed, orthonormal=False), expected, atol=1e-12)
    assert orthonormalize(mixed).shape == (2, P)  # the dependent third row is dropped
    # A zero row (EdgeState's σ_k = 0) removes nothing.
    with_zero = torch.cat([ortho, torch.zeros(1, P, dtype=torch.float64)])
    assert torch.allclose(remove_subspace(theta, with_zero), expected, atol=1e-12)


def test_sliced_coefficients_sum_to_the_whole():
    theta = gauss(P, seed=6)
    basis = random_orthonormal_subspace(2, P, seed=7, dtype=torch.float64)
    cut = 173
    coeffs = subspace_coefficients(theta[:cut], basis[:, :cut]) + subspace_coefficients(
        theta[cut:], basis[:, cut:]
    )
    whole = remove_subspace(theta, basis)
    parts = torch.cat(
        [
            remove_subspace(theta[:cut], basis[:, :cut], coefficients=coeffs),
            remove_subspace(theta[cut:], basis[:, cut:], coefficients=coeffs),
        ]
    )
    assert torch.allclose(parts, whole, atol=1e-12)


def test_float32_theta_keeps_its_dtype():
    theta = gauss(P, seed=8).float()
    basis = random_orthonormal_subspace(2, P, seed=9)  # float32
    out = remove_subspace(theta, basis)
    assert out.dtype == torch.float32
    assert float((basis.double() @ out.double()).abs().max()) < ORTHO_TOL


# ---------------------------------------------------------------------------- shrink


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shrink_toward_zero_by_brute_force(dtype):
    theta = gauss(P, seed=40).to(dtype)
    values = [float(x) for x in theta]
    norm = math.sqrt(sum(x * x for x in values))  # ‖θ‖ by hand, in Python floats
    d = 0.37 * norm
    expected = torch.tensor([x * (1.0 - d / norm) for x in values], dtype=torch.float64)
    out = shrink_toward_zero(theta, d)
    assert out.dtype == dtype
    assert torch.allclose(out.double(), expected, rtol=1e-6 if dtype == torch.float32 else 1e-13)
    moved = float((theta.double() - out.double()).norm())
    assert moved == pytest.approx(d, rel=1e-6)
    assert shrink_factor(d, norm) == (pytest.approx(0.63), False)
    # A given whole-vector norm is used as is (a slice's own norm would be smaller).
    half = shrink_toward_zero(theta, d, theta_norm=2 * norm)
    assert torch.allclose(half.double(), theta.double() * (1.0 - d / (2 * norm)), rtol=1e-6)
    # It is the displacement of length d that shortens θ most: the triangle inequality's
    # bound ‖θ'‖ = ‖θ‖ − d, so ‖θ‖² loses 1 − (1 − 0.37)² of itself.
    assert float(out.double().norm()) == pytest.approx(norm - d, rel=1e-6)
    frac = theta_sq_removed_fraction(norm, float(out.double().norm()))
    assert frac == pytest.approx(1 - 0.63**2, rel=1e-6)


def test_shrink_clamps_at_zero():
    theta = gauss(P, seed=41)
    norm = float(theta.norm())
    assert shrink_factor(2.5 * norm, norm) == (0.0, True)
    out = shrink_toward_zero(theta, 2.5 * norm)
    assert torch.equal(out, torch.zeros(P, dtype=torch.float64))  # displacement ‖θ‖ < d
    assert theta_sq_removed_fraction(norm, 0.0) == 1.0
    # Exactly ‖θ‖ reaches 0 without clamping; d = 0 moves nothing, even at θ = 0.
    assert shrink_factor(norm, norm) == (0.0, False)
    assert torch.equal(shrink_toward_zero(theta, 0.0), theta)
    assert shrink_factor(0.0, 0.0) == (1.0, False) and shrink_factor(1e-3, 0.0) == (0.0, True)
    assert math.isnan(theta_sq_removed_fraction(0.0, 0.0))
    with pytest.raises(ValueError):
        shrink_factor(-1.0, norm)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_shrink_equals_the_whole_vector_one(world: int) -> None:
    p = 3001
    theta = gauss(p, seed=42)
    norm = float(theta.norm())

    def rank(r: int, coll: ThreadCollective) -> list[torch.Tensor]:
        shard = Shard.of(p, coll)
        return [
            shard.gather(sharded_shrink_toward_zero(shard.take(theta), d, shard))
            for d in (0.3 * norm, 1.5 * norm)  # the second one clamps
        ]

    for shrunk, clamped in run_ranks(world, rank):
        torch.testing.assert_close(
            shrunk, shrink_toward_zero(theta, 0.3 * norm), rtol=1e-13, atol=0
        )
        assert torch.equal(clamped, torch.zeros(p, dtype=torch.float64))
    one = sharded_shrink_toward_zero(theta, 0.3 * norm, Shard.of(p))
    assert torch.equal(one, shrink_toward_zero(theta, 0.3 * norm))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_norm_equal_shrink_by_brute_force(dtype):
    theta = gauss(P, seed=44).to(dtype)
    values = [float(x) for x in theta]
    norm = math.sqrt(sum(x * x for x in values))  # ‖θ‖ by hand, in Python floats
    # An edge with a large share of θ (a random 2-D subspace would hold only ~2/p of it).
    rows = torch.stack([theta.double() / norm + 0.05 * gauss(P, seed=45), gauss(P, seed=46)])
    basis = orthonormalize(rows)
    coefficients = [sum(v * x for v, x in zip(row, values, strict=True)) for row in basis.tolist()]
    d = math.sqrt(sum(c * c for c in coefficients))  # ‖removed edge component‖ by hand
    r = d / norm
    assert 0.5 < r < 1.0
    factor = math.sqrt(1.0 - r * r)  # by hand
    kept = remove_subspace(theta, basis)  # θ − θ's edge component
    kept_norm = float(kept.double().norm())
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert norm_equal_factor(kept_norm, norm) == pytest.approx(factor, rel=tol)
    out = scale_theta(theta, norm_equal_factor(kept_norm, norm))
    assert out.dtype == dtype
    expected = torch.tensor([x * factor for x in values], dtype=torch.float64)
    assert torch.allclose(out.double(), expected, rtol=tol, atol=0)
    # It leaves θ the norm the edge removal leaves, so deletes the same share r² of ‖θ‖²
    # (the shrink at distance d: 1 − (1 − r)²), by a displacement (1 − c)‖θ‖ < d.
    assert float(out.double().norm()) == pytest.approx(kept_norm, rel=1e-6)
    frac = theta_sq_removed_fraction(norm, float(out.double().norm()))
    assert frac == pytest.approx(r * r, rel=1e-5)
    assert frac < theta_sq_removed_fraction(norm, (1 - r) * norm)
    moved = float((theta.double() - out.double()).norm())
    assert moved == pytest.approx((1 - factor) * norm, rel=1e-5) and moved < d
    # θ = 0 (nothing to scale) and the edge removing nothing both give c = 1.
    assert norm_equal_factor(0.0, 0.0) == 1.0 and norm_equal_factor(norm, norm) == 1.0
    assert norm_equal_factor(0.0, norm) == 0.0
    with pytest.raises(ValueError):
        norm_equal_factor(-1.0, norm)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_norm_equal_shrink_equals_the_whole_vector_one(world: int) -> None:
    """Each rank scales its slice by the factor of the global norms (summed over ranks)."""
    p = 3001
    theta = gauss(p, seed=47)
    basis = random_orthonormal_subspace(2, p, 97, 0, dtype=torch.float64)
    dense = scale_theta(
        theta, norm_equal_factor(float(remove_subspace(theta, basis).norm()), float(theta.norm()))
    )

    def rank(r: int, coll: ThreadCollective) -> torch.Tensor:
        shard = Shard.of(p, coll)
        part = shard.take(theta)
        kept = shard.norm(sharded_remove_subspace(part, shard.take(basis), shard))
        return shard.gather(scale_theta(part, norm_equal_factor(kept, shard.norm(part))))

    for scaled in run_ranks(world, rank):
        torch.testing.assert_close(scaled, dense, rtol=1e-13, atol=0)


SHRINK_KEYS = (
    "theta_norm",
    "theta_sq_removed_frac",
    *(
        f"{prefix}_{key}"
        for prefix in ("shrink", "shrink_norm")
        for key in (
            "loss",
            "acc",
            "dloss",
            "dacc",
            "displacement",
            "factor",
            "theta_sq_removed_frac",
            "ratio",
        )
    ),
)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_ablation_shrink_equals_the_dense_one(world: int) -> None:
    p = 3001
    evaluate = _toy_evaluate(p)
    theta = gauss(p, seed=43)
    basis = random_orthonormal_subspace(2, p, 98, 0, dtype=torch.float64)
    dense = ablation_experiment(evaluate, theta, basis, {}, n_random=2, seed=1)
    assert dense["shrink_clamped"] is False and dense["shrink_dacc"] != 0.0
    assert dense["shrink_norm_clamped"] is False and dense["shrink_norm_dacc"] != 0.0

    def rank(r: int, coll: ThreadCollective) -> dict:
        shard = Shard.of(p, coll)
        return sharded_ablation_experiment(
            evaluate, shard.take(theta), shard.take(basis), {}, shard, n_random=2, seed=1
        )

    for result in run_ranks(world, rank):
        for key in SHRINK_KEYS:
            assert math.isclose(result[key], dense[key], rel_tol=1e-10, abs_tol=1e-12), key
        assert result["shrink_clamped"] is False and result["shrink_norm_clamped"] is False


# ---------------------------------------------------------------------------- random draws


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_subspaces_orthonormal_and_reproducible(dtype):
    subs = random_orthonormal_subspaces(4, 3, P, seed=11, dtype=dtype)
    assert subs.shape == (4, 3, P) and subs.dtype == dtype
    eye = torch.eye(3, dtype=torch.float64)
    for v in subs:
        assert torch.allclose(v.double() @ v.double().T, eye, atol=ORTHO_TOL)
    assert torch.equal(subs, random_orthonormal_subspaces(4, 3, P, seed=11, dtype=dtype))
    assert not torch.allclose(subs, random_orthonormal_subspaces(4, 3, P, seed=12, dtype=dtype))
    # Chunk-wise: the iterator gives the same draws, and draw i does not depend on n.
    assert torch.equal(
        torch.stack(list(iter_random_orthonormal_subspaces(4, 3, P, 11, None, dtype))), subs
    )
    assert torch.equal(random_orthonormal_subspaces(2, 3, P, seed=11, dtype=dtype), subs[:2])
    # Different draws of one stream are different subspaces.
    assert float((subs[0].double() @ subs[1].double().T).abs().max()) < 0.5


def test_norm_matched_displacements_have_the_requested_norm():
    target = 0.3721
    d64 = norm_matched_displacements(5, target, P, seed=3, dtype=torch.float64)
    assert d64.shape == (5, P)
    assert torch.allclose(
        d64.norm(dim=1), torch.full((5,), target, dtype=torch.float64), rtol=1e-14
    )
    d32 = norm_matched_displacements(5, target, P, seed=3)
    assert torch.allclose(
        d32.double().norm(dim=1), torch.full((5,), target, dtype=torch.float64), rtol=1e-6
    )
    # Random directions: reproducible, pairwise nearly orthogonal in high dimension.
    assert torch.equal(torch.stack(list(iter_norm_matched_displacements(5, target, P, 3))), d32)
    cos = (d64 @ d64.T) / target**2
    assert float((cos - torch.eye(5, dtype=torch.float64)).abs().max()) < 0.3
    assert torch.equal(norm_matched_displacements(1, 0.0, P, seed=0), torch.zeros(1, P))


# ---------------------------------------------------------------------------- summary


def test_ablation_summary_by_hand():
    s = ablation_summary(-0.5, [0.01, -0.01, 0.03])
    assert s["n_random"] == 3
    assert s["random_mean"] == pytest.approx(0.01)
    assert s["random_sd"] == pytest.approx(0.02)  # sqrt((0 + 0.02² + 0.02²) / 2)
    assert s["random_max_abs"] == pytest.approx(0.03)
    assert s["ratio"] == pytest.approx(0.5 / (0.01 + 1e-8))
    assert s["z"] == pytest.approx(-25.5)  # (-0.5 - 0.01) / 0.02
    assert s["frac_random_ge"] == 0.0
    # All random effects exactly 0 (accuracy resolution): no ratio (unresolved, not a
    # division by the floor), z is undefined.
    flat = ablation_summary(-0.5, [0.0, 0.0, 0.0])
    assert math.isnan(flat["ratio"]) and flat["ratio_resolved"] is False
    assert flat["random_sd"] == 0.0 and math.isnan(flat["z"])
    one = ablation_summary(0.2, torch.tensor([0.3]))
    assert math.isnan(one["random_sd"]) and math.isnan(one["z"]) and one["frac_random_ge"] == 1.0
    with pytest.raises(ValueError):
        ablation_summary(0.1, [])


def test_ablation_experiment_displacements():
    """With loss = ‖θ − θ0‖ the evaluation reads back each control's displacement."""
    theta0 = gauss(P, seed=20)
    basis = random_orthonormal_subspace(2, P, seed=21, dtype=torch.float64)

    def evaluate(theta, batch):
        dist = (theta - theta0).norm()
        return dist, -dist, torch.zeros(1)

    out = ablation_experiment(evaluate, theta0, basis, batch={}, n_random=6, seed=4)
    removed = float((basis @ theta0).norm())
    assert out["base_loss"] == 0.0 and out["displacement"] == pytest.approx(removed)
    assert out["edge_loss"] == pytest.approx(removed) and out["edge_acc"] == pytest.approx(-removed)
    assert out["matched_dloss"] == pytest.approx([removed] * 6, rel=1e-12)
    for sub, d in zip(
        iter_random_orthonormal_subspaces(6, 2, P, 4, None, torch.float64),
        out["random_dloss"],
        strict=True,
    ):
        assert d == pytest.approx(float((sub @ theta0).norm()))
    assert out["acc_matched"]["random_sd"] == pytest.approx(0.0, abs=1e-12)
    assert out["loss_random"]["n_random"] == 6
    # The shrink moves θ the same distance, straight toward 0; the edge removal deletes
    # r² of ‖θ‖², the shrink 1 − (1 − r)², with r = d/‖θ‖.
    norm = float(theta0.norm())
    r = removed / norm
    assert out["theta_norm"] == pytest.approx(norm, rel=1e-12)
    assert out["shrink_dloss"] == pytest.approx(removed, rel=1e-12)
    assert out["shrink_dacc"] == pytest.approx(-removed, rel=1e-12)
    assert out["shrink_displacement"] == pytest.approx(removed, rel=1e-12)
    assert out["shrink_factor"] == pytest.approx(1 - r, rel=1e-12)
    assert out["shrink_clamped"] is False
    assert out["theta_sq_removed_frac"] == pytest.approx(r**2, rel=1e-9)
    assert out["shrink_theta_sq_removed_frac"] == pytest.approx(1 - (1 - r) ** 2, rel=1e-9)
    assert out["shrink_ratio"] == pytest.approx(1.0, rel=1e-6)  # |Δ_edge| = |Δ_shrink| here
    # The norm-equal shrink scales θ by sqrt(1 − r²): the edge's share r² of ‖θ‖², by a
    # displacement (1 − sqrt(1 − r²))‖θ‖, which the loss reads back.
    c = math.sqrt(1 - r**2)
    moved = (1 - c) * norm
    assert out["shrink_norm_factor"] == pytest.approx(c, rel=1e-12)
    assert out["shrink_norm_clamped"] is False
    assert out["shrink_norm_dloss"] == pytest.approx(moved, rel=1e-9)
    assert out["shrink_norm_dacc"] == pytest.approx(-moved, rel=1e-9)
    assert out["shrink_norm_displacement"] == pytest.approx(moved, rel=1e-9)
    assert out["shrink_norm_theta_sq_removed_frac"] == pytest.approx(r**2, rel=1e-9)
    assert out["shrink_norm_ratio"] == pytest.approx(removed / moved, rel=1e-6)


# ---------------------------------------------------------------------------- KL and sweeps


def test_kl_divergence_by_hand():
    base = torch.zeros(1, 1, 2, dtype=torch.float64)
    pert = torch.tensor([[[math.log(3.0), 0.0]]], dtype=torch.float64)  # q = (3/4, 1/4)
    mask = torch.ones(1, 1, dtype=torch.bool)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # = ½ ln(4/3)
    assert kl_divergence(base, pert, mask) == pytest.approx(expected, rel=1e-12)
    assert kl_divergence(base, base, mask) == 0.0
    logits = gauss(3, 5, 4, seed=30)
    assert kl_divergence(logits, logits, torch.ones(3, 5, dtype=torch.bool)) == 0.0
    assert (
        kl_divergence(
            logits, logits + 0.1 * gauss(3, 5, 4, seed=31), torch.ones(3, 5, dtype=torch.bool)
        )
        > 0
    )


def test_kl_divergence_masks_and_weights():
    base = torch.zeros(2, 2, 2)
    pert = torch.zeros(2, 2, 2)
    pert[0, 0, 0] = math.log(3.0)  # row 0, position 0: KL = ½ ln(4/3)
    pert[1, 1, 0] = 50.0  # row 1, position 1: huge, but masked out
    mask = torch.tensor([[True, True], [True, False]])
    k = 0.5 * math.log(4 / 3)
    assert kl_divergence(base, pert, mask) == pytest.approx(k / 3)
    # Row 0 stands for 3 sequences: (3k + 3·0 + 1·0) / (3 + 3 + 1).
    assert kl_divergence(base, pert, mask, torch.tensor([3.0, 1.0])) == pytest.approx(3 * k / 7)
    assert math.isnan(kl_divergence(base, pert, torch.zeros(2, 2, dtype=torch.bool)))


def test_epsilon_grid():
    grid = epsilon_grid()
    assert len(grid) == 25 and grid[0] == -0.03 and grid[-1] == 0.03 and grid[12] == 0.0
    assert grid == sorted(grid)
    assert epsilon_grid(5, 1.0) == [-1.0, -0.5, 0.0, 0.5, 1.0]


def test_epsilon_sweep_on_a_tiny_model():
    torch.manual_seed(0)
    net = CausalTransformer(
        vocab_size=3, num_classes=4, max_len=6, d_model=8, n_layers=1, n_heads=2, d_ff=16
    )
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (3, 6), generator=g)
    labels[2, 3:] = IGNORE_INDEX
    batch = {
        "tokens": torch.randint(0, 3, (3, 6), generator=g),
        "labels": labels,
        "weight": torch.tensor([1.0, 2.0, 1.0]),
    }

    def evaluate_params(params, b):
        logits = functional_call(net, params, (b["tokens"],), strict=False)
        loss = F.cross_entropy(
            logits.flatten(0, 1), b["labels"].flatten(), ignore_index=IGNORE_INDEX
        )
        valid = b["labels"] != IGNORE_INDEX
        acc = ((logits.argmax(-1) == b["labels"]) & valid).sum() / valid.sum()
        return SimpleNamespace(loss=loss, acc=acc, logits=logits)

    selector = ParameterSelector.from_module(net)
    evaluate = flat_evaluator(evaluate_params, selector, net)
    theta = selector.flatten(net)
    directions = random_orthonormal_subspace(2, selector.p, seed=0)
    grid = epsilon_grid(5, 0.5)
    calls = []

    def counted(flat, b):
        calls.append(1)
        return evaluate(flat, b)

    rows = epsilon_sweep(counted, theta, directions, grid, batch)
    assert len(rows) == 2 * 5
    assert len(calls) == 1 + 2 * 4  # the base once; ε = 0 shares it
    assert [r["direction"] for r in rows] == [1] * 5 + [2] * 5
    base_loss, _, base_logits = evaluate(theta, batch)
    base_loss = float(base_loss)
    for r in rows:
        v = directions[r["direction"] - 1]
        loss, acc, logits = evaluate(theta + r["epsilon"] * v, batch)
        assert r["loss"] == pytest.approx(float(loss), rel=1e-6)
        assert r["delta_loss"] == pytest.approx(float(loss) - base_loss, abs=1e-6)
        kl = kl_divergence(base_logits, logits, labels != IGNORE_INDEX, batch["weight"])
        assert r["kl"] == pytest.approx(kl, rel=1e-6, abs=1e-12)
        if r["epsilon"] == 0.0:  # the shared base is θ + 0·v's evaluation bit for bit
            assert (r["loss"], r["acc"]) == (float(loss), float(acc))
            assert r["kl"] == 0.0 and r["delta_loss"] == 0.0 and r["delta_acc"] == 0.0
        else:
            assert r["kl"] > 0
    ext = sweep_extremes(rows)
    assert set(ext) == {1, 2}
    assert ext[1]["max_kl"] == max(r["kl"] for r in rows if r["direction"] == 1)
    # The live model was never touched.
    assert torch.equal(selector.flatten(net), theta)
