"""UpdateWindow: incremental W×W matrices against dense recomputes."""

from __future__ import annotations

import io
import math

import pytest
import torch

from grokedge.edge import row_dots as row_dots_module
from grokedge.edge import window_kernels
from grokedge.edge.selection import slice_bounds
from grokedge.edge.window import UpdateWindow

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


U32 = 2.0**-24
"""Unit round-off of float32."""
BIG_P = 10_000_000
"""Length of the rows of the large-p float32 Gram test (the issue's 10⁷)."""
BIG_W = 3
BIG_TOL = 1e-5
"""Error of a float32-block Gram entry relative to √(G_ii G_jj) allowed at p = 10⁷."""


@pytest.fixture
def matmul_precision():
    """Set ``torch.set_float32_matmul_precision`` for one test, restored afterwards."""
    saved = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(saved)


def stored_grams(win: UpdateWindow):
    """float64 brute force of the window's three matrices from its stored rows."""
    return dense(win.deltas(), win.wd_deltas())


def scaled_errors(got: torch.Tensor, want: torch.Tensor, diag_a, diag_b) -> torch.Tensor:
    """|got − want| / √(a_ii b_jj): each entry's error relative to its natural scale."""
    return (got - want).abs() / torch.sqrt(torch.outer(diag_a, diag_b))


@pytest.fixture(params=["fused", "torch"])
def float32_path(request, monkeypatch) -> str:
    """Each float32-block path of the push's dot products on the CPU: the fused one-pass
    kernel (``grokedge.edge.window_kernels``) and the two-GEMV torch path, each with
    64-column blocks so that P = 257 spans several."""
    if request.param == "fused":
        monkeypatch.setattr(row_dots_module, "KERNEL_MIN_P", 1)
        monkeypatch.setattr(window_kernels, "FUSED_BLOCK", 64)
    else:
        monkeypatch.setattr(row_dots_module, "_window_kernels", lambda: None)
        monkeypatch.setattr(row_dots_module, "F32_BLOCK", 64)
    return request.param


@pytest.mark.parametrize("p", [P, row_dots_module.KERNEL_MIN_P])
def test_the_kernels_are_the_default_cpu_path_from_kernel_min_p(monkeypatch, p):
    """numba is a dependency: a float32 CPU window of p ≥ KERNEL_MIN_P takes the kernels
    (not the fallback) for its dot products and its combinations; a shorter one takes
    the torch path, which costs it less than loading them."""
    assert row_dots_module._window_kernels() is window_kernels
    calls = []
    for name in ("fused_row_dots", "combine_rows"):
        real = getattr(window_kernels, name)
        monkeypatch.setattr(
            window_kernels, name, lambda *a, _n=name, _f=real: calls.append(_n) or _f(*a)
        )
    win = UpdateWindow(W, p)
    win.push(torch.randn(p), torch.randn(p))
    win.combine(torch.ones(1, 1))
    want = ["fused_row_dots", "combine_rows"] if p >= row_dots_module.KERNEL_MIN_P else []
    assert calls == want


def test_kernels_that_cannot_be_built_fall_back_with_one_warning(monkeypatch):
    """A platform where numba cannot compile or cache the kernels: the window warns and
    takes the torch path (checked when the kernels are first wanted, not mid-push)."""

    def broken() -> None:
        raise RuntimeError("no cache locator")

    monkeypatch.setattr(window_kernels, "warm_up", broken)
    with pytest.warns(RuntimeWarning, match="could not build its kernels.*torch path"):
        assert row_dots_module._window_kernels.__wrapped__() is None


@pytest.mark.parametrize("rows", [1, 3, 10])
def test_fused_row_dots_against_float64_brute_force(rows):
    """Odd and even row counts (the kernel takes rows in pairs), several blocks and a
    ragged last one: every dot within b·u·Σ|x_i y_i| of the float64 dot."""
    block, p = window_kernels.FUSED_BLOCK, 2 * window_kernels.FUSED_BLOCK + 123
    gen = torch.Generator().manual_seed(rows)
    mat = 1.0 + torch.randn(rows, p, generator=gen)
    t, w = torch.randn(p, generator=gen), 1.0 + torch.randn(p, generator=gen)
    dots, own = window_kernels.fused_row_dots(mat, (t, w))
    new = torch.stack([t, w]).double()
    for got, a in ((dots, mat.double()), (own, new)):
        want, abs_sum = a @ new.T, a.abs() @ new.abs().T
        assert got.dtype == torch.float64 and got.shape == want.shape
        assert ((got - want).abs() <= block * U32 * abs_sum).all()
        assert (got - want).abs().max() > 0  # float32 products, not float64
    assert own[0, 1] == own[1, 0]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("part", ["total", "wd"])
def test_a_non_finite_delta_leaves_the_window_unchanged(float32_path, bad, part):
    """The push's own dots detect NaN/inf on either float32 path (the kernel is compiled
    without no-NaN/no-inf assumptions)."""
    totals, wds = random_deltas(W + 2, P, seed=3, dtype=torch.float32)
    win = UpdateWindow(W, P)
    for t, w in zip(totals, wds, strict=True):
        assert win.push(t, w, check_finite=True)
    before = (win.matrices().clone(), win.deltas().clone(), win.pushes)
    total, wd = torch.randn(P), torch.randn(P)
    (total if part == "total" else wd)[P // 2] = bad
    assert not win.push(total, wd, check_finite=True)
    assert torch.equal(win.matrices(), before[0]) and torch.equal(win.deltas(), before[1])
    assert win.pushes == before[2]


def test_float32_blocks_within_their_rounding_bound(float32_path):
    """float32 buffers: float32 products per block, float64 across blocks, on either CPU
    path. Each entry's error is within the rigorous bound b·u·Σ|x_i y_i| (b = block
    length), which the float64 brute force of the stored values checks entry by entry,
    and far below 10⁻¹⁰-exactness would need: the path is really float32 (a float64 path
    would be ~10⁻¹⁶)."""
    block = 64
    totals, wds = random_deltas(12, P, seed=1, dtype=torch.float32)
    win = UpdateWindow(W, P)
    for t, w in zip(totals, wds, strict=True):
        win.push(t, w)
    x, xw = win.deltas().double(), win.wd_deltas().double()
    for got, (a, b) in (
        (win.gram(), (x, x)),
        (win.cross_gram(), (xw, x)),
        (win.wd_gram(), (xw, xw)),
    ):
        want = a @ b.T
        abs_sum = a.abs() @ b.abs().T  # Σ|x_i y_i| per entry
        assert ((got - want).abs() <= block * U32 * abs_sum).all()
    err = (win.gram() - x @ x.T).abs().max()
    assert err > 0  # float32 rounding is there: the test exercises the float32 path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_upcast_path_accumulates_exactly_in_float64(monkeypatch, matmul_precision, dtype):
    """bfloat16 buffers, and float32 buffers when the float32 matmul precision allows
    reduced-precision GEMMs (TF32 / bfloat16 passes), take the exact up-cast path."""
    monkeypatch.setattr(row_dots_module, "ACCUM_CHUNK", 64)  # exercise the chunked path
    matmul_precision("high")
    totals, wds = random_deltas(12, P, seed=1, dtype=dtype)
    win = UpdateWindow(W, P, dtype=dtype)
    for t, w in zip(totals, wds, strict=True):
        win.push(t, w)
    g, c, gw = stored_grams(win)  # float64 Gram of the stored values
    for got, want in ((win.gram(), g), (win.cross_gram(), c), (win.wd_gram(), gw)):
        assert rel_err(got, want) <= REL_TOL


@pytest.mark.parametrize("path", ["fused", "torch"])
def test_float32_gram_at_ten_million_against_float64_brute_force(monkeypatch, path):
    """p = 10⁷, float32 buffers at the default block: every entry of G, C = X_wd Xᵀ and
    X_wd X_wdᵀ within 10⁻⁵ of the float64 dot of the same stored rows, relative to
    √(G_ii G_jj). The deltas share a common direction with a non-zero mean (all-positive
    products: the worst case for round-off), and the window wraps once."""
    if path == "torch":
        monkeypatch.setattr(row_dots_module, "_window_kernels", lambda: None)
    gen = torch.Generator().manual_seed(7)
    common = 1.0 + torch.randn(BIG_P, generator=gen)
    win = UpdateWindow(BIG_W, BIG_P)
    for i in range(BIG_W + 1):
        total = common + (0.5 + i) * torch.randn(BIG_P, generator=gen)
        win.push(total, -1e-3 * (common + torch.randn(BIG_P, generator=gen)))
        del total
    x, xw = win.deltas(), win.wd_deltas()
    got = {"gram": win.gram(), "cross": win.cross_gram(), "wd": win.wd_gram()}
    want = {key: torch.zeros(BIG_W, BIG_W, dtype=torch.float64) for key in got}
    for i in range(BIG_W):
        for j in range(BIG_W):  # one float64 pair at a time: 160 MB, not 480 MB
            xi, xj, wi, wj = x[i].double(), x[j].double(), xw[i].double(), xw[j].double()
            want["gram"][i, j] = xi @ xj
            want["cross"][i, j] = wi @ xj
            want["wd"][i, j] = wi @ wj
    g_diag, w_diag = want["gram"].diagonal(), want["wd"].diagonal()
    worst = max(
        float(scaled_errors(got["gram"], want["gram"], g_diag, g_diag).max()),
        float(scaled_errors(got["cross"], want["cross"], w_diag, g_diag).max()),
        float(scaled_errors(got["wd"], want["wd"], w_diag, w_diag).max()),
    )
    print(f"max scaled error at p = 10^7: {worst:.3e}")
    assert worst <= BIG_TOL, worst


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


@pytest.mark.parametrize("path", ["fused", "torch"])
@pytest.mark.parametrize(("size", "k"), [(2, 1), (5, 4), (7, 3), (12, 2)])
def test_float32_combine_against_float64_brute_force(monkeypatch, path, size, k):
    """float32 windows on the CPU: the numba combination (window sizes that are not a
    multiple of its 5-row group, odd k, several blocks and a ragged last one, a ring that
    has wrapped) and the torch GEMM, within float32 round-off of the float64 product of
    the stored rows."""
    if path == "fused":
        monkeypatch.setattr(row_dots_module, "KERNEL_MIN_P", 1)
        monkeypatch.setattr(window_kernels, "COMBINE_BLOCK", 64)
    else:
        monkeypatch.setattr(row_dots_module, "_window_kernels", lambda: None)
    totals, wds = random_deltas(2 * size + 1, P, seed=size, dtype=torch.float32)
    win = UpdateWindow(size + 1, P)
    for t, w in zip(totals, wds, strict=True):
        win.push(t, w)
    coeffs = torch.randn(k, size + 1)
    out = torch.full((k, P), math.nan)
    for part, rows in ((False, win.deltas()), (True, win.wd_deltas())):
        got = win.combine(coeffs, wd=part, out=out)
        want = coeffs.double() @ rows.double()
        scale = coeffs.double().abs() @ rows.double().abs()
        assert got is out and torch.isfinite(got).all()
        assert ((got.double() - want).abs() <= (size + 2) * U32 * scale).all()


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
