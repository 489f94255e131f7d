"""Edge definitions and window provenance against brute force (dense SVD of X itself)."""

from __future__ import annotations

import pytest
import torch

from grokedge.edge.definitions import (
    BURN_IN,
    NORMALIZED,
    PAPER,
    definition_edge,
    definition_spectrum,
)
from grokedge.edge.provenance import ENTERED, LEFT, DominanceTracker, coinciding, window_provenance
from grokedge.edge.window import UpdateWindow

W, P, N = 5, 64, 10  # window, parameters, steps per delta


def _deltas(seed: int, n: int = W, big: int | None = 0, scale: float = 30.0, shared: float = 0.0):
    """n (total, wd) pairs; delta ``big`` scaled up (the initial transient); ``shared``:
    weight of one direction common to every delta (training's deltas are correlated)."""
    g = torch.Generator().manual_seed(seed)
    total = torch.randn(n, P, generator=g, dtype=torch.float64)
    total += shared * torch.randn(1, P, generator=g, dtype=torch.float64)
    wd = 0.3 * torch.randn(n, P, generator=g, dtype=torch.float64)
    if big is not None:
        total[big] *= scale
        wd[big] *= scale
    return total, wd


def _window(total: torch.Tensor, wd: torch.Tensor) -> UpdateWindow:
    window = UpdateWindow(W, P, dtype=torch.float64)
    for i in range(total.shape[0]):
        window.push(total[i], wd[i], span=(i * N, (i + 1) * N))
    return window


def _brute(x: torch.Tensor, x_wd: torch.Tensor, k: int):
    """σ, V [k, p] (sign: the delta with the largest |projection| projects positively),
    and the per-delta grad/wd projections [n, k], from a dense SVD of X."""
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    v = vh[:k].clone()
    for j in range(k):
        proj = x @ v[j]
        if proj[proj.abs().argmax()] < 0:
            v[j] = -v[j]
    wd_proj = x_wd @ v.T
    return s, v, (x @ v.T) - wd_proj, wd_proj


def _check(state, x, x_wd, k=3):
    k = min(k, x.shape[0])
    s, v, grad_proj, wd_proj = _brute(x, x_wd, k)
    torch.testing.assert_close(state.sigma, s, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state.vectors[:k], v, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(state.grad_proj[:, :k], grad_proj, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(state.wd_proj[:, :k], wd_proj, rtol=1e-8, atol=1e-10)


def _edge(definition: str, window: UpdateWindow, start_step: int = 0):
    return definition_edge(
        definition,
        window.gram(),
        window.cross_gram(),
        window.wd_gram(),
        window,
        window.spans(),
        top_k=3,
        step=W * N,
        start_step=start_step,
    )


def test_paper_definition_is_the_svd_of_the_raw_window() -> None:
    total, wd = _deltas(0)
    state = _edge(PAPER, _window(total, wd))
    _check(state, total, wd)
    assert state.definition == PAPER
    assert state.spans == [(i * N, (i + 1) * N) for i in range(W)]


@pytest.mark.parametrize("start_step", [N, 2 * N, 3 * N - 1])
def test_burn_in_drops_the_deltas_that_begin_before_it(start_step: int) -> None:
    total, wd = _deltas(1)
    state = _edge(BURN_IN, _window(total, wd), start_step)
    keep = [i for i in range(W) if i * N >= start_step]
    _check(state, total[keep], wd[keep])
    assert state.count == len(keep)
    assert [b for b, _ in state.spans] == [i * N for i in keep]


def test_burn_in_with_fewer_than_two_deltas_left_has_no_edge() -> None:
    total, wd = _deltas(2)
    window = _window(total, wd)
    assert _edge(BURN_IN, window, start_step=4 * N) is None  # one delta left
    spec = definition_spectrum(
        BURN_IN, window.gram(), window.cross_gram(), window.wd_gram(), window.spans(), 3, 0, 4 * N
    )
    assert spec is None


def test_normalized_definition_is_the_svd_of_unit_deltas() -> None:
    total, wd = _deltas(3)
    norms = total.norm(dim=1, keepdim=True)
    state = _edge(NORMALIZED, _window(total, wd))
    # Each delta and its WD part scaled by the same 1/‖δ_i‖: the split still sums.
    _check(state, total / norms, wd / norms)


def test_normalized_edge_is_not_owned_by_one_large_delta() -> None:
    total, wd = _deltas(4, scale=100.0)
    window = _window(total, wd)
    paper = window_provenance(_edge(PAPER, window))
    normalized = window_provenance(_edge(NORMALIZED, window))
    assert paper.dominant_share > 0.99 and paper.dominant_index == 0
    assert normalized.dominant_share < 0.9


def test_provenance_shares_are_the_squared_left_singular_vector() -> None:
    total, wd = _deltas(5, big=2, scale=5.0)
    state = _edge(PAPER, _window(total, wd))
    prov = window_provenance(state, burn_in_step=N)
    u, s, _ = torch.linalg.svd(total, full_matrices=False)
    share = u[:, 0] ** 2
    # σ_1² u_1[i]² = (δ_i · v_1)²: brute force from the projections as well.
    v1 = torch.linalg.svd(total, full_matrices=False)[2][0]
    energy = (total @ v1) ** 2
    torch.testing.assert_close(torch.tensor(prov.delta_share, dtype=torch.float64), share)
    torch.testing.assert_close(torch.tensor(prov.delta_energy, dtype=torch.float64), energy)
    assert abs(sum(prov.delta_energy) - float(s[0]) ** 2) < 1e-8 * float(s[0]) ** 2
    assert prov.dominant_index == int(share.argmax()) == 2
    assert (prov.dominant_begin, prov.dominant_end) == (2 * N, 3 * N)
    assert (prov.first_step, prov.last_step) == (0, W * N)
    assert prov.holds_burn_in  # the first delta begins at 0 < N
    assert not window_provenance(state, burn_in_step=0).holds_burn_in
    scalars = prov.scalars()
    assert scalars["gram/dominant_delta_step"] == 2 * N
    assert scalars["gram/window_holds_burn_in"] == 1.0


def test_tracker_records_a_large_delta_entering_and_leaving() -> None:
    """A stream of deltas with one 30x larger at index 7: it enters at its own window and
    leaves W windows later; nothing else is dominant. (Full windows only: of two iid
    deltas one always holds half of σ_1²; and nearly orthogonal deltas hand σ_1² to the
    longest one, so the stream shares a direction, as training's deltas do.)"""
    n = 16
    total, wd = _deltas(6, n=n, big=7, shared=3.0)
    window = UpdateWindow(W, P, dtype=torch.float64)
    tracker = DominanceTracker(threshold=0.5)
    for i in range(n):
        step = (i + 1) * N
        window.push(total[i], wd[i], span=(i * N, step))
        if window.count < W:
            continue
        state = _edge(PAPER, window)
        tracker.update(step, window_provenance(state), state.spans)
    kinds = [(c.kind, c.step, c.begin) for c in tracker.changes]
    assert kinds == [(ENTERED, 8 * N, 7 * N), (LEFT, (8 + W) * N, 7 * N)]
    assert coinciding((8 + W) * N + N, tracker.changes, tolerance=N) == [tracker.changes[1]]
    assert coinciding(3 * N, tracker.changes, tolerance=N) == []
    restored = DominanceTracker()
    restored.load_state_dict(tracker.state_dict())
    assert restored.changes == tracker.changes and restored.current == tracker.current


def test_window_spans_round_trip_through_the_state() -> None:
    total, wd = _deltas(7, n=7)
    window = UpdateWindow(W, P, dtype=torch.float64)
    for i in range(7):
        window.push(total[i], wd[i], span=(i * N, (i + 1) * N))
    other = UpdateWindow(W, P, dtype=torch.float64)
    other.load_state_dict(window.state_dict())
    assert other.spans() == window.spans() == [(i * N, (i + 1) * N) for i in range(2, 7)]


@pytest.mark.parametrize("start_step", [0, N, 3 * N, 100 * N])
def test_edge_from_all_spectra_equals_definition_edge_bit_for_bit(start_step: int) -> None:
    """The recorder's shortcuts change no bit: the edge built from its definition's
    spectrum (no second eigendecomposition), ``burn_in`` sharing the ``paper`` spectrum
    once it keeps every row, and T = I skipping the products T M Tᵀ."""
    from grokedge.edge.definitions import (
        all_spectra,
        definition_rows,
        mapped_matrices,
        mapped_spans,
        spectrum_edge,
    )
    from grokedge.edge.spectrum import window_spectrum

    total, wd = _deltas(7, n=W + 2, shared=0.5)
    total[3] = 0.0  # a zero delta: a zero row of normalized's T
    window = _window(total, wd)
    g, c, w = window.gram(), window.cross_gram(), window.wd_gram()
    spans = window.spans()
    spectra = all_spectra(g, c, w, spans, 3, W * N, start_step)
    fields = ("sigma", "eigvecs", "grad_proj", "wd_proj", "gram", "cross_gram", "wd_gram")
    for definition in (PAPER, BURN_IN, NORMALIZED):
        expected = definition_edge(definition, g, c, w, window, spans, 3, W * N, start_step)
        got = spectrum_edge(spectra[definition], g, spans, window, start_step)
        if expected is None:
            assert got is None and spectra[definition] is None
            continue
        assert got is not None
        for name in (*fields, "vectors"):
            assert torch.equal(getattr(got, name), getattr(expected, name)), (definition, name)
        assert (got.spans, got.count, got.definition) == (
            expected.spans,
            expected.count,
            expected.definition,
        )
        # The spectra against the plain products T M Tᵀ (no shortcut).
        rows = definition_rows(definition, g, spans, start_step)
        plain = window_spectrum(
            *(rows @ m @ rows.T for m in (g, c, w)),
            3,
            W * N,
            mapped_spans(rows, spans),
            definition,
        )
        for name in fields:
            assert torch.equal(getattr(spectra[definition], name), getattr(plain, name))
        batched = mapped_matrices(rows, g, c, w)
        for m, b in zip((g, c, w), batched, strict=True):
            assert torch.equal(b, rows @ m @ rows.T)
