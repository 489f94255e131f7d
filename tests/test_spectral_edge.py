"""compute_edge and the grad/WD decomposition against brute force (numpy SVD, dot products)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from grokedge.edge.decomposition import energy_fractions, latest_energy_fractions, trapezoid_wd
from grokedge.edge.geometry import rotation_deg, rotation_finish, rotation_partial
from grokedge.edge.selection import slice_bounds
from grokedge.edge.spectrum import compute_edge, edge_from_window
from grokedge.edge.window import UpdateWindow

W = 5
P = 300
TOP_K = 3
SIGMAS = (10.0, 5.0, 2.5, 1.0, 0.3)  # well separated: each v_j is well defined
TOL = 1e-10


def trajectory(seed: int, sigmas=SIGMAS, p: int = P):
    """Deltas X = U diag(σ) Vᵀ with known σ, and WD parts correlated with them."""
    gen = torch.Generator().manual_seed(seed)
    n = len(sigmas)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(p, n, generator=gen, dtype=torch.float64))
    x = u @ torch.diag(torch.tensor(sigmas, dtype=torch.float64)) @ v.T
    wd = -0.3 * x + 0.05 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    return x, wd


def filled_window(x: torch.Tensor, wd: torch.Tensor, junk: int = 3) -> UpdateWindow:
    """A float64 window whose ring has wrapped, ending with the rows of x."""
    win = UpdateWindow(x.shape[0], x.shape[1], dtype=torch.float64)
    gen = torch.Generator().manual_seed(99)
    for _ in range(junk):
        win.push(torch.randn(x.shape[1], generator=gen, dtype=torch.float64))
    for t, w in zip(x, wd, strict=True):
        win.push(t, w)
    return win


def test_edge_matches_numpy_svd_and_direct_projections():
    x, wd = trajectory(seed=0)
    win = filled_window(x, wd)
    state = edge_from_window(win, TOP_K, step=700)

    _, s_np, vt_np = np.linalg.svd(x.numpy(), full_matrices=False)
    assert np.max(np.abs(state.sigma.numpy() - s_np) / s_np) <= TOL
    assert torch.all(state.sigma[:-1] >= state.sigma[1:])
    vectors = state.vectors
    assert vectors.shape == (TOP_K, P) and vectors.dtype == torch.float64
    align = np.abs(np.sum(vectors.numpy() * vt_np[:TOP_K], axis=1))
    assert np.max(np.abs(align - 1)) <= TOL
    assert torch.allclose(vectors @ vectors.T, torch.eye(TOP_K, dtype=torch.float64), atol=TOL)

    grad = x - wd
    direct_grad, direct_wd = grad @ vectors.T, wd @ vectors.T
    scale = float(x.abs().max())
    assert float((state.grad_proj - direct_grad).abs().max()) <= TOL * scale
    assert float((state.wd_proj - direct_wd).abs().max()) <= TOL * scale
    assert float((state.total_proj - x @ vectors.T).abs().max()) <= TOL * scale
    assert state.step == 700 and state.count == W and state.top_k == TOP_K


def test_tensor_deltas_and_window_source_agree():
    x, wd = trajectory(seed=1)
    win = filled_window(x, wd)
    via_window = edge_from_window(win, TOP_K, step=0)
    via_tensor = compute_edge(win.gram(), win.cross_gram(), win.wd_gram(), x, TOP_K, step=0)
    assert torch.allclose(via_window.vectors, via_tensor.vectors, atol=TOL)


def test_sign_convention_largest_projection_is_positive():
    x, wd = trajectory(seed=2)
    state = edge_from_window(filled_window(x, wd), TOP_K, step=0)
    proj = state.total_proj  # δ_i · v_k
    lead = proj.abs().argmax(dim=0)
    assert torch.all(proj[lead, torch.arange(TOP_K)] > 0)
    again = compute_edge(state.gram, state.cross_gram, state.wd_gram, x, TOP_K, step=0)
    assert torch.allclose(again.vectors, state.vectors, atol=TOL)  # no sign flip


def test_rank_deficient_windows_give_zeros_not_nans():
    win = UpdateWindow(W, 6, dtype=torch.float64)
    delta = torch.arange(6, dtype=torch.float64)
    win.push(delta, 0.1 * delta)
    win.push(2 * delta, 0.2 * delta)  # collinear: σ_2 = 0
    state = edge_from_window(win, top_k=4, step=0)  # top_k > W' = 2
    assert state.vectors.shape == (4, 6) and state.grad_proj.shape == (2, 4)
    assert state.sigma[1] == 0
    for t in (state.vectors, state.grad_proj, state.wd_proj, state.sigma):
        assert torch.isfinite(t).all()
    assert torch.equal(state.vectors[1:], torch.zeros(3, 6, dtype=torch.float64))
    assert torch.isclose(state.vectors[0].norm(), torch.tensor(1.0, dtype=torch.float64))

    zero = UpdateWindow(W, 6)
    zero.push(torch.zeros(6))
    zero.push(torch.zeros(6))
    state = edge_from_window(zero, top_k=2, step=0)
    assert torch.equal(state.sigma, torch.zeros(2, dtype=torch.float64))
    assert torch.equal(state.vectors, torch.zeros(2, 6))
    grad_frac, _, _ = energy_fractions(state.grad_proj, state.wd_proj)
    assert torch.isnan(grad_frac).all()  # no energy, no share (documented)


def test_grad_plus_wd_is_total_and_energy_fractions_match_direct():
    x, wd = trajectory(seed=3)
    state = edge_from_window(filled_window(x, wd), TOP_K, step=0)
    assert torch.allclose(state.grad_proj + state.wd_proj, state.total_proj, rtol=0, atol=1e-15)

    vectors = state.vectors
    grad_p, wd_p = (x - wd) @ vectors.T, wd @ vectors.T  # explicit projections
    g_e, w_e = (grad_p**2).mean(0), (wd_p**2).mean(0)
    grad_frac, wd_frac, align = energy_fractions(state.grad_proj, state.wd_proj)
    assert torch.allclose(grad_frac, g_e / (g_e + w_e), rtol=TOL)
    assert torch.allclose(wd_frac, w_e / (g_e + w_e), rtol=TOL)
    assert torch.allclose(grad_frac + wd_frac, torch.ones(TOP_K, dtype=torch.float64))
    assert torch.allclose(align, (grad_p * wd_p).mean(0), rtol=TOL)
    # wd = -0.3 x + noise: the parts oppose along the edge
    assert align[0] < 0

    last_g, last_w, last_a = latest_energy_fractions(state.grad_proj, state.wd_proj)
    assert torch.allclose(last_g, grad_p[-1] ** 2 / (grad_p[-1] ** 2 + wd_p[-1] ** 2), rtol=TOL)
    assert torch.allclose(last_a, grad_p[-1] * wd_p[-1], rtol=TOL)
    assert torch.allclose(last_w, 1 - last_g)

    # invariant to the sign of v_k
    neg = energy_fractions(-state.grad_proj, -state.wd_proj)
    assert all(torch.equal(a, b) for a, b in zip(neg, (grad_frac, wd_frac, align), strict=True))


@pytest.mark.parametrize("world_size", [2, 3])
def test_sliced_edge_vectors_and_rotation_equal_the_whole(world_size):
    x, wd = trajectory(seed=4)
    x_next, wd_next = trajectory(seed=5)
    whole = filled_window(x, wd)
    whole_state = edge_from_window(whole, TOP_K, step=0)

    bounds = [slice_bounds(P, r, world_size) for r in range(world_size)]
    windows = [filled_window(x[:, a:b], wd[:, a:b]) for a, b in bounds]
    reads = ("gram", "cross_gram", "wd_gram")
    summed = [sum(getattr(w, read)() for w in windows) for read in reads]
    states = [compute_edge(*summed, w, TOP_K, step=0) for w in windows]
    concat = torch.cat([s.vectors for s in states], dim=1)
    assert float((concat - whole_state.vectors).abs().max()) <= TOL
    assert torch.allclose(states[0].grad_proj, whole_state.grad_proj, atol=TOL)

    # next window: rotation from summed partial dot products equals the whole's
    next_whole = edge_from_window(filled_window(x_next, wd_next), TOP_K, step=1)
    partial = sum(
        rotation_partial(s.vectors, next_whole.vectors[:, a:b])
        for s, (a, b) in zip(states, bounds, strict=True)
    )
    sliced = rotation_finish(partial)
    whole_rot = rotation_deg(whole_state.vectors, next_whole.vectors)
    assert torch.allclose(sliced, whole_rot, atol=1e-9)
    brute = torch.rad2deg(
        torch.arccos((whole_state.vectors * next_whole.vectors).sum(1).abs().clamp(max=1))
    )
    assert torch.allclose(whole_rot, brute, atol=1e-6)


def test_trapezoid_wd_is_the_papers_formula():
    prev, curr = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0])
    got = trapezoid_wd(prev, curr, lr=1e-3, weight_decay=0.5, n_steps=100)
    assert torch.allclose(got, torch.tensor([-0.05 * 2.0, -0.05 * -1.0]))
    assert math.isclose(float(got[0]), -1e-3 * 0.5 * 100 * (1 + 3) / 2, rel_tol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_float32_window_on_cuda_matches_float64_on_cpu():
    x, wd = trajectory(seed=6)
    cpu = edge_from_window(filled_window(x, wd), TOP_K, step=0)
    win = UpdateWindow(W, P, device="cuda")  # float32 buffers, float64 dot products
    for t, w in zip(x, wd, strict=True):
        win.push(t.float().cuda(), w.float().cuda())
    gpu = edge_from_window(win, TOP_K, step=0)
    assert gpu.vectors.device.type == "cuda" and gpu.vectors.dtype == torch.float32
    assert gpu.sigma.device.type == "cpu" and gpu.sigma.dtype == torch.float64
    assert torch.allclose(gpu.sigma, cpu.sigma, rtol=1e-6)
    assert torch.allclose(gpu.vectors.double().cpu(), cpu.vectors, atol=1e-5)
    assert torch.allclose(gpu.wd_proj, cpu.wd_proj, atol=1e-5)
