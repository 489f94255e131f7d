"""The gap flow terms against hand computations (grokedge.experiments.gap_flow).

On a quadratic loss L(θ) = ½ θᵀAθ − bᵀθ the Hessian is A and the gradient Aθ − b in
closed form, and the window's modes come from numpy's SVD of X: every symbol and term
is recomputed here independently of the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from grokedge.edge.spectrum import compute_edge
from grokedge.experiments.gap_flow import (
    GapFlowTerms,
    balance,
    curvatures_and_gradients,
    effective_gradients,
    gap_flow_at,
    gap_flow_terms,
    mode_coefficients,
    mode_gap,
    newest_grad_projections,
    observed_rate,
    prediction_agreement,
    signal_strengths,
)
from grokedge.experiments.gap_flow_record import EFFECTIVE, RAW, GapFlowRecord, PredictionPair

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

P, W = 7, 5


def quadratic(seed: int = 0):
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(P, P))
    a = m @ m.T / P + np.diag(rng.uniform(0.1, 1.0, P))  # SPD, distinct curvatures
    b = rng.normal(size=P)
    theta = rng.normal(size=P)
    at, bt = torch.tensor(a), torch.tensor(b)

    def loss(flat: torch.Tensor) -> torch.Tensor:
        return 0.5 * flat @ at @ flat - bt @ flat

    return a, b, theta, loss


def window(seed: int = 1, scales=(3.0, 1.5, 1.0, 0.5, 0.2)):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(P, W)))  # orthonormal columns: known modes
    u, _ = np.linalg.qr(rng.normal(size=(W, W)))
    x = u @ np.diag(scales) @ q.T  # [W, P], singular values = scales
    x_wd = 0.1 * rng.normal(size=(W, P))
    return x, x_wd


def edge_of(x: np.ndarray, x_wd: np.ndarray, top_k: int = 4):
    xt, wt = torch.tensor(x), torch.tensor(x_wd)
    return compute_edge(xt @ xt.T, wt @ xt.T, wt @ wt.T, xt, top_k, step=100)


def hand_terms(k, x, x_wd, a, b, theta, lr, wd, n_steps):
    """Every symbol of the equation from numpy alone (1-based k)."""
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    v_k, v_k1 = vt[k - 1], vt[k]
    d_k, d_k1 = s[k - 1] ** 2, s[k] ** 2
    h_k, h_k1 = v_k @ a @ v_k, v_k1 @ a @ v_k1
    gradient = a @ theta - b
    g_k, g_k1 = gradient @ v_k, gradient @ v_k1
    newest_grad_part = (x - x_wd)[-1]
    ge_k = -(newest_grad_part @ v_k) / (lr * n_steps)
    ge_k1 = -(newest_grad_part @ v_k1) / (lr * n_steps)
    t1 = -lr * (h_k - h_k1) * (d_k + d_k1) / 2
    t2 = -lr * ((h_k + h_k1) / 2 + wd) * (d_k - d_k1)
    t3 = lr * W * (g_k**2 / d_k - g_k1**2 / d_k1)
    t3e = lr * W * (ge_k**2 / d_k - ge_k1**2 / d_k1)
    return dict(
        d_k=d_k, d_k1=d_k1, gap=d_k - d_k1, h_k=h_k, h_k1=h_k1, term1=t1, term2=t2,
        term3=t3, predicted=t1 + t2 + t3, balance=t3 / abs(t2), g_k=g_k, g_k1=g_k1,
        ge_k=ge_k, ge_k1=ge_k1, term3_eff=t3e, predicted_eff=t1 + t2 + t3e,
        balance_eff=t3e / abs(t2),
    )  # fmt: skip


@pytest.mark.parametrize("k", [1, 2, 3])
def test_every_term_on_a_quadratic_matches_the_hand_computation(k: int) -> None:
    a, b, theta, loss = quadratic()
    x, x_wd = window()
    edge = edge_of(x, x_wd)
    lr, wd, n_steps = 1e-3, 0.5, 100
    got = gap_flow_at(
        edge.sigma, edge.vectors, edge.count, loss, torch.tensor(theta), lr, wd, k,
        grad_proj_newest=edge.grad_proj[-1], steps_per_delta=n_steps,
    )  # fmt: skip
    want = hand_terms(k, x, x_wd, a, b, theta, lr, wd, n_steps)
    assert got is not None and got.k == k and got.window == W
    assert (got.lr, got.weight_decay) == (lr, wd)
    for name in ("d_k", "d_k1", "gap", "h_k", "h_k1", "term1", "term2", "term3", "predicted"):
        assert getattr(got, name) == pytest.approx(want[name], rel=1e-9, abs=1e-15), name
    for name in ("term3_eff", "predicted_eff", "balance", "balance_eff"):
        assert getattr(got, name) == pytest.approx(want[name], rel=1e-8), name
    # G_j changes sign with v_j (a sign convention); the terms use G_j² only.
    assert abs(got.grad_k) == pytest.approx(abs(want["g_k"]), rel=1e-9)
    assert abs(got.grad_k1) == pytest.approx(abs(want["g_k1"]), rel=1e-9)
    assert abs(got.grad_eff_k) == pytest.approx(abs(want["ge_k"]), rel=1e-9)
    assert abs(got.grad_eff_k1) == pytest.approx(abs(want["ge_k1"]), rel=1e-9)


def test_default_mode_is_kstar_of_the_window() -> None:
    a, b, theta, loss = quadratic()
    # σ = 3, 2.5, 0.5, 0.4, 0.3: the largest ratio σ_j/σ_{j+1} is at j = 2.
    x, x_wd = window(scales=(3.0, 2.5, 0.5, 0.4, 0.3))
    edge = edge_of(x, x_wd)
    got = gap_flow_at(edge.sigma, edge.vectors, edge.count, loss, torch.tensor(theta), 1e-3, 1.0)
    want = hand_terms(2, x, x_wd, a, b, theta, 1e-3, 1.0, 1)
    assert got is not None and got.k == 2
    assert got.term2 == pytest.approx(want["term2"], rel=1e-9)
    assert math.isnan(got.term3_eff)  # no newest-delta projections given


def test_curvatures_and_gradients_are_per_unit_direction() -> None:
    a, b, theta, loss = quadratic()
    rng = np.random.default_rng(5)
    dirs = rng.normal(size=(3, P)) * np.array([[0.1], [1.0], [10.0]])  # any lengths
    h, g = curvatures_and_gradients(loss, torch.tensor(theta), torch.tensor(dirs))
    units = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    np.testing.assert_allclose(h.numpy(), np.einsum("ip,pq,iq->i", units, a, units), rtol=1e-10)
    np.testing.assert_allclose(g.numpy(), units @ (a @ theta - b), rtol=1e-10)


def test_terms_by_hand_with_round_numbers() -> None:
    t = gap_flow_terms(1, 4.0, 1.0, 2.0, 1.0, 4.0, 1.0, 0.1, 0.5, 5, grad_eff_k=2.0)
    assert t.gap == 3.0
    assert t.term1 == pytest.approx(-0.1 * (2 - 1) * 2.5)  # −η (h_k − h_k+1) d̄
    assert t.term2 == pytest.approx(-0.1 * (1.5 + 0.5) * 3)  # −η (h̄ + ω) g
    assert t.term3 == pytest.approx(0.1 * 5 * (16 / 4 - 1 / 1))  # η W (G_k²/d_k − ...)
    assert t.predicted == pytest.approx(-0.25 - 0.6 + 1.5)
    assert t.balance == pytest.approx(1.5 / 0.6)
    assert math.isnan(t.term3_eff)  # grad_eff_k1 missing: no effective Term 3
    zero_d = gap_flow_terms(1, 4.0, 0.0, 2.0, 1.0, 4.0, 1.0, 0.1, 0.5, 5)
    assert math.isnan(zero_d.term3) and math.isnan(zero_d.predicted)


def test_balance_edge_cases() -> None:
    assert balance(3.0, -1.5) == 2.0 and balance(-3.0, 1.5) == -2.0
    assert balance(1.0, 0.0) == math.inf and balance(-1.0, 0.0) == -math.inf
    assert math.isnan(balance(0.0, 0.0))


def test_unavailable_modes_give_none() -> None:
    _, _, theta, loss = quadratic()
    x, x_wd = window()
    edge = edge_of(x[:2], x_wd[:2], top_k=2)  # two deltas: modes 1 and 2 only
    th = torch.tensor(theta)
    assert gap_flow_at(edge.sigma, edge.vectors, edge.count, loss, th, 1e-3, 1.0, k=2) is None
    assert gap_flow_at(edge.sigma, edge.vectors, edge.count, loss, th, 1e-3, 1.0, k=1) is not None
    # top_k = 1 materialises no v_2.
    edge1 = edge_of(x, x_wd, top_k=1)
    assert gap_flow_at(edge1.sigma, edge1.vectors, 5, loss, th, 1e-3, 1.0, k=1) is None
    # σ_{k+1} = 0 (rank-deficient window): no direction v_{k+1}.
    rank1 = np.outer([1.0, 2.0, 3.0], np.arange(1.0, P + 1))
    edge_r = edge_of(rank1, 0 * rank1, top_k=3)
    assert gap_flow_at(edge_r.sigma, edge_r.vectors, 3, loss, th, 1e-3, 1.0, k=1) is None


def test_signal_strengths_gap_and_observed_rate() -> None:
    sigma = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    assert signal_strengths(sigma).tolist() == [9.0, 4.0, 1.0]
    assert mode_gap(sigma, 1) == 5.0 and mode_gap([3.0, 2.0, 1.0], 2) == 3.0
    assert math.isnan(mode_gap(sigma, 3)) and math.isnan(mode_gap(sigma, 0))
    assert observed_rate(5.0, 3.0, 100) == pytest.approx(-0.02)
    assert math.isnan(observed_rate(math.nan, 3.0, 100)) and math.isnan(observed_rate(1, 2, 0))


def test_effective_gradients() -> None:
    proj = torch.tensor([0.2, -0.05], dtype=torch.float64)
    np.testing.assert_allclose(effective_gradients(proj, 1e-3, 100).numpy(), [-2.0, 0.5])
    assert torch.isnan(effective_gradients(proj, 0.0, 100)).all()


def test_prediction_agreement_against_scipy() -> None:
    rng = np.random.default_rng(3)
    pred = rng.normal(size=40)
    obs = 0.01 * pred + 0.01 * rng.normal(size=40)
    obs[5] = obs[6]  # a tie in the ranks
    pred_nan, obs_nan = [*pred, math.nan, 1.0], [*obs, 2.0, math.inf]
    got = prediction_agreement(pred_nan, obs_nan)
    assert got["n"] == 40
    assert got["pearson"] == pytest.approx(stats.pearsonr(pred, obs).statistic, rel=1e-10)
    assert got["spearman"] == pytest.approx(stats.spearmanr(pred, obs).statistic, rel=1e-10)
    assert got["sign_agreement"] == pytest.approx(np.mean(np.sign(pred) == np.sign(obs)))
    assert got["scale"] == pytest.approx((pred @ obs) / (pred @ pred), rel=1e-10)
    one = prediction_agreement([1.0], [2.0])
    assert one["n"] == 1 and math.isnan(one["pearson"]) and one["sign_agreement"] == 1.0
    with pytest.raises(ValueError, match="differ in length"):
        prediction_agreement([1.0, 2.0], [1.0])


def test_modes_beyond_the_materialised_edge_from_the_window() -> None:
    x, x_wd = window()
    full = edge_of(x, x_wd, top_k=W)  # every vector materialised: the reference
    small = edge_of(x, x_wd, top_k=2)
    modes = [3, 4, 5]
    coeffs = mode_coefficients(small.sigma, small.eigvecs, modes)
    vectors = coeffs @ torch.tensor(x)  # what UpdateWindow.combine forms
    torch.testing.assert_close(vectors, full.vectors[2:], rtol=1e-9, atol=1e-12)
    newest = newest_grad_projections(small.sigma, small.eigvecs, small.cross_gram, modes)
    torch.testing.assert_close(newest, full.grad_proj[-1, 2:], rtol=1e-9, atol=1e-12)
    _, s, vt = np.linalg.svd(x, full_matrices=False)  # and against numpy, up to sign
    np.testing.assert_allclose(np.abs(vectors.numpy()), np.abs(vt[2:]), atol=1e-10)
    want = (x - x_wd)[-1] @ vt[2:].T
    np.testing.assert_allclose(np.abs(newest.numpy()), np.abs(want), rtol=1e-9)


def _terms(k: int, gap: float, predicted: float, balance: float) -> GapFlowTerms:
    nan = math.nan
    return GapFlowTerms(
        k, nan, nan, gap, nan, nan, nan, nan, nan, nan, 5, nan, nan, nan, predicted, balance,
        predicted_eff=2 * predicted, balance_eff=2 * balance,
    )  # fmt: skip


def test_gap_flow_record_pairs_by_hand_and_round_trips() -> None:
    record = GapFlowRecord()
    record.on_window(100, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    record.on_window(200, torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64))
    # Backward: g_1 went from 9 − 4 = 5 to 16 − 4 = 12 over 100 steps.
    observed = record.record(200, _terms(1, 12.0, 0.1, 3.0), weights_step=200)
    assert observed == pytest.approx(0.07)
    assert record.backward == [PredictionPair(200, 1, 0.1, 0.2, pytest.approx(0.07))]
    assert record.balances_of(RAW) == [(200, 3.0)] and record.balances_of(EFFECTIVE) == [(200, 6.0)]
    state = record.state_dict()
    resumed = GapFlowRecord()
    resumed.load_state_dict(torch_roundtrip(state))
    assert resumed.state_dict() == state
    # Forward: the next window's g_1 = 25 − 4 = 21, 9 more over 100 steps.
    for r in (record, resumed):
        assert r.on_window(300, torch.tensor([5.0, 2.0, 1.0], dtype=torch.float64))
        assert r.forward == [PredictionPair(200, 1, 0.1, 0.2, pytest.approx(0.09))]
        assert r.pending is None
    # Weights newer than the window (an at_end call): no forward pair is awaited.
    record.record(300, _terms(1, 21.0, 0.1, 3.0), weights_step=350)
    assert record.pending is None and not record.on_window(400, [6.0, 2.0, 1.0])


def torch_roundtrip(state: dict) -> dict:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)
