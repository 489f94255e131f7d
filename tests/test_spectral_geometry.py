"""Geometry read-outs on hand-made spectra and known subspaces, and Davis–Kahan."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from grokedge.edge.geometry import (
    davis_kahan_bound,
    g23,
    gaps,
    kstar_ratio,
    kstar_weighted,
    principal_angles_deg,
    principal_angles_finish,
    principal_angles_partial,
    rotation_deg,
    spectral_ratio,
    split_halves,
    stability,
    stability_from_gram,
)
from grokedge.edge.selection import slice_bounds
from grokedge.edge.spectrum import spectrum

ANGLE_TOL = 1e-6  # degrees


def sig(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_gaps_and_g23_by_hand():
    sigma = sig(4, 2, 1, 0.5)
    assert torch.equal(gaps(sigma), sig(12, 3, 0.75))
    assert g23(sigma) == 3.0
    assert math.isnan(g23(sig(4, 2)))


def test_kstar_by_hand():
    # ratios 2, 2, 2: a tie, resolved to the smallest j
    assert kstar_ratio(sig(4, 2, 1, 0.5)) == 1
    assert kstar_weighted(sig(4, 2, 1, 0.5)) == 1
    # ratios 1.2, 5, 1.25 -> 2; weighted 3/6.4·1.2 = .56, 2.5/6.4·5 = 1.95, .5/6.4·1.25 = .10 -> 2
    assert kstar_ratio(sig(3, 2.5, 0.5, 0.4)) == 2
    assert kstar_weighted(sig(3, 2.5, 0.5, 0.4)) == 2
    # ratios 10, 50 -> 2; weighted 10/11.02·10 = 9.07 vs 1/11.02·50 = 4.54 -> 1
    assert kstar_ratio(sig(10, 1, 0.02)) == 2
    assert kstar_weighted(sig(10, 1, 0.02)) == 1
    # zero σ are skipped: the ratio 1/0 is not an edge
    assert kstar_ratio(sig(3, 1, 0, 0)) == 1
    assert kstar_ratio(sig(1, 0.5, 0.1, 0)) == 2  # ratios 2, 5, (0.1/0 skipped)
    assert kstar_ratio(sig(3, 0)) == 1 and kstar_ratio(sig(0, 0)) == 1


def test_spectral_ratio():
    assert spectral_ratio(sig(4, 2, 1), 2) == 2.0
    assert spectral_ratio(sig(4, 0), 1) == math.inf
    assert math.isnan(spectral_ratio(sig(0, 0), 1))
    with pytest.raises(ValueError):
        spectral_ratio(sig(4, 2), 2)


def test_rotation_of_a_known_angle():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(50, 2, generator=gen, dtype=torch.float64))
    a, b = q[:, 0], q[:, 1]
    for deg in (0.0, 17.0, 30.0, 89.0):
        rad = math.radians(deg)
        turned = math.cos(rad) * a + math.sin(rad) * b
        assert abs(rotation_deg(a, turned) - deg) <= ANGLE_TOL
        assert abs(rotation_deg(a, -turned) - deg) <= ANGLE_TOL  # sign-invariant
        assert abs(rotation_deg(2 * a, 3 * turned) - deg) <= ANGLE_TOL  # normalised
    rows = rotation_deg(torch.stack([a, b]), torch.stack([b, b]))
    assert torch.allclose(rows, torch.tensor([90.0, 0.0], dtype=torch.float64), atol=ANGLE_TOL)


def test_principal_angles_of_known_subspaces_and_slices():
    gen = torch.Generator().manual_seed(1)
    e, _ = torch.linalg.qr(torch.randn(40, 4, generator=gen, dtype=torch.float64))
    e = e.T  # 4 orthonormal rows
    alpha, beta = math.radians(25.0), math.radians(60.0)
    u = torch.stack([e[0], e[1]])
    v = torch.stack(
        [
            math.cos(alpha) * e[0] + math.sin(alpha) * e[2],
            math.cos(beta) * e[1] + math.sin(beta) * e[3],
        ]
    )
    want = torch.tensor([25.0, 60.0], dtype=torch.float64)
    assert torch.allclose(principal_angles_deg(u, v), want, atol=ANGLE_TOL)
    # a non-orthonormal basis of the same span gives the same angles
    mixed = torch.stack([2 * v[0] + v[1], v[0] - 0.5 * v[1]])
    assert torch.allclose(principal_angles_deg(u, mixed), want, atol=ANGLE_TOL)
    # identical planes
    assert torch.allclose(
        principal_angles_deg(u, u.flip(0)), torch.zeros(2, dtype=torch.float64), atol=ANGLE_TOL
    )
    # from partial products of 3 slices
    partial = sum(
        principal_angles_partial(u[:, a:b], v[:, a:b])
        for a, b in (slice_bounds(40, r, 3) for r in range(3))
    )
    assert torch.allclose(principal_angles_finish(partial, 2), want, atol=ANGLE_TOL)


def test_split_halves_documented_rule():
    assert split_halves(5) == (slice(0, 2), slice(3, 5))  # middle delta dropped
    assert split_halves(4) == (slice(0, 2), slice(2, 4))
    assert split_halves(2) == (slice(0, 1), slice(1, 2))
    with pytest.raises(ValueError):
        split_halves(1)


def test_stability_matches_numpy_svd_of_each_half():
    gen = torch.Generator().manual_seed(2)
    scales = torch.tensor([[5.0], [2.0], [1.0]], dtype=torch.float64)
    base = torch.randn(3, 80, generator=gen, dtype=torch.float64) * scales
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64) @ base
    x += 0.1 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    first, second = split_halves(5)
    a, b = x[first], x[second]
    _, _, va = np.linalg.svd(a.numpy(), full_matrices=False)
    _, _, vb = np.linalg.svd(b.numpy(), full_matrices=False)
    brute = np.abs(np.sum(va * vb, axis=1))
    assert np.allclose(stability(a, b).numpy(), brute, atol=1e-10)
    assert np.allclose(stability_from_gram(x @ x.T).numpy(), brute, atol=1e-10)
    assert stability(a, b).shape == (2,)


def test_davis_kahan_bound_holds_on_random_perturbations():
    gen = torch.Generator().manual_seed(3)
    checked = 0
    for trial in range(100):
        x = torch.randn(5, 30, generator=gen, dtype=torch.float64)
        g = x @ x.T
        scale = 10.0 ** (trial % 5 - 3)  # from tiny to larger than the gap
        noise = torch.randn(5, 5, generator=gen, dtype=torch.float64) * scale * float(g.norm())
        g_next = g + (noise + noise.T) / 2
        u1, u2 = spectrum(g)[1][:, 0], spectrum(g_next)[1][:, 0]
        sin = math.sqrt(max(0.0, 1.0 - float(u1 @ u2) ** 2))
        bound = davis_kahan_bound(g, g_next)
        assert sin <= bound + 1e-12, (trial, sin, bound)
        checked += math.isfinite(bound) and bound < 1
    assert checked > 25  # the bound is informative in many trials, not vacuous
    assert davis_kahan_bound(g, g) == 0.0
