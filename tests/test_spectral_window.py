"""UpdateWindow: incremental W×W matrices against dense recomputes."""

from __future__ import annotations

import io

import pytest
import torch

from grokedge.spectral import UpdateWindow, slice_bounds
from grokedge.spectral import window as window_module

W = 5
P = 257
PUSHES = 23  # > 4 W: the ring wraps several times, at a slot that is not 0
REL_TOL = 1e-10


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def random_deltas(n: int, p: int, seed: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    totals = torch.randn(n, p, generator=gen, dtype=dtype)
    wds = 0.1 * torch.randn(n, p, generator=gen, dtype=dtype)
    return totals, wds


def dense(totals: torch.Tensor, wds: torch.Tensor):
    x, xw = totals.double(), wds.double()
    return x @ x.T, xw @ x.T, xw @ xw.T


def test_incremental_grams_match_dense_recompute_after_wraparound():
    totals, wds = random_deltas(PUSHES, P, seed=0)
    win = UpdateWindow(W, P, dtype=torch.float64)
    worst = 0.0
    for n in range(1, PUSHES + 1):
        win.push(totals[n - 1], wds[n - 1])
        lo = max(0, n - W)
        g, c, gw = dense(totals[lo:n], wds[lo:n])
        assert win.count == n - lo
        assert win.gram().shape == (n - lo, n - lo)
        assert win.gram().dtype == torch.float64 and win.gram().device.type == "cpu"
        for got, want in ((win.gram(), g), (win.cross_gram(), c), (win.wd_gram(), gw)):
            worst = max(worst, rel_err(got, want))
        assert torch.equal(win.deltas(), totals[lo:n])
        assert torch.equal(win.wd_deltas(), wds[lo:n])
    assert worst <= REL_TOL, worst
    # cross-Gram orientation: C[i, j] = δ_wd,i · δ_j, not its transpose
    assert torch.allclose(win.cross_gram()[0, 1], wds[-W] @ totals[-W + 1])


def test_float32_buffers_accumulate_in_float64(monkeypatch):
    monkeypatch.setattr(window_module, "ACCUM_CHUNK", 64)  # exercise the chunked path
    totals, wds = random_deltas(12, P, seed=1, dtype=torch.float32)
    win = UpdateWindow(W, P)
    for t, w in zip(totals, wds, strict=True):
        win.push(t, w)
    g, c, gw = dense(totals[-W:], wds[-W:])  # float64 Gram of the stored float32 values
    for got, want in ((win.gram(), g), (win.cross_gram(), c), (win.wd_gram(), gw)):
        assert rel_err(got, want) <= REL_TOL


def test_push_without_wd_and_shape_checks():
    win = UpdateWindow(3, 4, dtype=torch.float64)
    win.push(torch.ones(4))
    assert torch.equal(win.cross_gram(), torch.zeros(1, 1))
    assert float(win.gram()) == 4.0
    with pytest.raises(ValueError, match="shape"):
        win.push(torch.ones(5))
    with pytest.raises(ValueError, match="W must be >= 2"):
        UpdateWindow(1, 4)


def test_combine_equals_coefficients_times_chronological_deltas():
    totals, wds = random_deltas(8, P, seed=2)
    win = UpdateWindow(W, P, dtype=torch.float64)
    for t, w in zip(totals, wds, strict=True):
        win.push(t, w)
    coeffs = torch.randn(3, W, dtype=torch.float64)
    assert torch.allclose(win.combine(coeffs), coeffs @ totals[-W:])
    assert torch.allclose(win.combine(coeffs, wd=True), coeffs @ wds[-W:])


@pytest.mark.parametrize("world_size", [2, 3])
def test_partial_grams_of_slices_sum_to_whole(world_size):
    totals, wds = random_deltas(9, P, seed=3)
    whole = UpdateWindow(W, P, dtype=torch.float64)
    parts = []
    for rank in range(world_size):
        start, stop = slice_bounds(P, rank, world_size)
        parts.append((start, stop, UpdateWindow(W, stop - start, dtype=torch.float64)))
    for t, w in zip(totals, wds, strict=True):
        whole.push(t, w)
        for start, stop, win in parts:
            win.push(t[start:stop], w[start:stop])
    for read in ("gram", "cross_gram", "wd_gram"):
        summed = sum(getattr(win, read)() for _, _, win in parts)
        assert rel_err(summed, getattr(whole, read)()) <= REL_TOL


def test_state_dict_round_trip_reproduces_identical_grams():
    totals, wds = random_deltas(12, P, seed=4, dtype=torch.float32)
    first = UpdateWindow(W, P)
    for t, w in zip(totals[:7], wds[:7], strict=True):
        first.push(t, w)
    blob = io.BytesIO()
    torch.save(first.state_dict(), blob)
    blob.seek(0)
    second = UpdateWindow(W, P)
    second.load_state_dict(torch.load(blob, weights_only=True))
    for t, w in zip(totals[7:], wds[7:], strict=True):
        first.push(t, w)
        second.push(t, w)
        for read in ("gram", "cross_gram", "wd_gram"):
            assert torch.equal(getattr(first, read)(), getattr(second, read)())
    assert second.pushes == first.pushes == 12
    with pytest.raises(ValueError, match="W=5"):
        UpdateWindow(W + 1, P).load_state_dict(first.state_dict())


def test_reset_empties_the_window():
    totals, wds = random_deltas(3, P, seed=5)
    win = UpdateWindow(W, P, dtype=torch.float64)
    for t, w in zip(totals, wds, strict=True):
        win.push(t, w)
    win.reset()
    assert win.count == 0
    win.push(totals[0], wds[0])
    assert rel_err(win.gram(), dense(totals[:1], wds[:1])[0]) <= REL_TOL
