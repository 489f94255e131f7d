"""Davis–Kahan between consecutive windows against the explicit p×p operators XᵀX."""

from __future__ import annotations

import math

import pytest
import torch

from grokedge.edge.geometry import (
    davis_kahan_gap,
    rotation_deg,
    window_shift_dk_bound,
    window_shift_grams,
)
from grokedge.edge.row_dots import F32_BLOCK
from grokedge.edge.spectrum import spectrum
from grokedge.edge.window import UpdateWindow

P = 40


def deltas(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([3.0 ** (-i) for i in range(n)], dtype=torch.float64)
    base = torch.randn(n, P, generator=gen, dtype=torch.float64)
    # A dominant shared direction plus noise: v_1 moves a little between windows.
    common = torch.randn(P, generator=gen, dtype=torch.float64)
    return base * scale[:, None] + 2.0 * common


def top_vector(x: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(x.T @ x)
    return evecs[:, -1]


def explicit_bound(x_prev: torch.Tensor, x_curr: torch.Tensor) -> float:
    m_prev, m_curr = x_prev.T @ x_prev, x_curr.T @ x_curr
    lam_prev = torch.linalg.eigvalsh(m_prev).flip(0)
    lam_curr = torch.linalg.eigvalsh(m_curr).flip(0)
    return float(torch.linalg.matrix_norm(m_curr - m_prev)) / float(lam_curr[0] - lam_prev[1])


@pytest.mark.parametrize("grown", [False, True], ids=["slid", "grown"])
def test_window_shift_matches_the_p_by_p_operators(grown: bool) -> None:
    y = deltas(6, seed=1)
    if grown:
        x_prev, x_curr = y[:4], y[:5]
        evicted = None
    else:
        x_prev, x_curr = y[:5], y[1:6]
        evicted = float(y[0] @ y[5])
    a, b = window_shift_grams(x_prev @ x_prev.T, x_curr @ x_curr.T, evicted)
    # Same nonzero spectra as XᵀX, same Frobenius distance.
    for op, x in ((a, x_prev), (b, x_curr)):
        got = torch.linalg.eigvalsh(op).flip(0)[: x.shape[0]]
        want = torch.linalg.eigvalsh(x @ x.T).flip(0)
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)
    dist = float(torch.linalg.matrix_norm(a - b))
    m_dist = float(torch.linalg.matrix_norm(x_curr.T @ x_curr - x_prev.T @ x_prev))
    assert dist == pytest.approx(m_dist, rel=1e-10)
    # The angle between the top eigenvectors of A and B is the rotation of v_1.
    ua, ub = spectrum(a)[1][:, 0], spectrum(b)[1][:, 0]
    frame_angle = math.degrees(math.acos(min(1.0, abs(float(ua @ ub)))))
    v_angle = rotation_deg(top_vector(x_prev), top_vector(x_curr))
    assert frame_angle == pytest.approx(v_angle, abs=1e-6)
    # The bound is the explicit one, and it holds.
    bound = window_shift_dk_bound(x_prev @ x_prev.T, x_curr @ x_curr.T, evicted)
    assert bound == pytest.approx(explicit_bound(x_prev, x_curr), rel=1e-9)
    assert math.sin(math.radians(v_angle)) <= bound + 1e-12
    assert davis_kahan_gap(a, b) > 0


def test_window_shift_rejects_inconsistent_sizes() -> None:
    g = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="one delta more"):
        window_shift_grams(g, g, None)
    with pytest.raises(ValueError, match="keeps its size"):
        window_shift_grams(g, torch.eye(4, dtype=torch.float64), 0.0)


def test_push_reports_the_dot_with_the_evicted_delta_and_rejects_non_finite() -> None:
    win = UpdateWindow(3, P, dtype=torch.float32)
    rows = deltas(5, seed=2).float()
    for i in range(3):
        assert win.push(rows[i])
        assert win.last_evicted_dot is None  # not full before this push
    assert win.push(rows[3])  # evicts row 0
    got = win.last_evicted_dot
    assert got.dtype == torch.float64
    # float32 buffers: float32 products per block, summed in float64 (window module
    # docstring): within the block's rounding bound b·u·Σ|x_i y_i|, not float64-exact.
    bound = min(P, F32_BLOCK) * 2.0**-24 * float(rows[0].double().abs() @ rows[3].double().abs())
    assert float(got) == pytest.approx(float(rows[0].double() @ rows[3].double()), abs=bound)
    before = win.state_dict()
    saved = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in before.items()}
    bad = rows[4].clone()
    bad[7] = float("nan")
    assert not win.push(bad, check_finite=True)
    assert not win.push(rows[4], torch.full((P,), float("inf")), check_finite=True)
    after = win.state_dict()
    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(after[key], value), key
        else:
            assert after[key] == value, key
