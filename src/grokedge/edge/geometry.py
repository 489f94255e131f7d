"""Shape of the spectrum and motion of the edge (docs/theory.md §1).

Spectral read-outs (gaps, k*, ratios) take σ [W'] (descending, float64, CPU, as in
``EdgeState.sigma``) and return Python numbers or small CPU tensors; indices k, j are
1-based like the paper's.

Geometric read-outs between p-sized vectors (rotation, principal angles, stability)
come in two stages so that they work on slices of θ_sel (docs/design.md, Scale):

1. ``partial_inner`` / ``stacked_gram``: float64 dot products of the rows of this
   rank's slices, on the device (no host sync) — sum them over the ranks;
2. ``*_finish``: the angle from the summed small matrix, on the CPU.

The one-call forms (``rotation_deg`` …) do both on whole vectors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from grokedge.edge.row_dots import chunked_matmul_t
from grokedge.edge.spectrum import spectrum

FIRST_GAP = 2
"""g_23 = σ_2² − σ_3² needs three singular values."""


def _as_rows(x: Tensor) -> Tensor:
    return x.unsqueeze(0) if x.ndim == 1 else x


# ----------------------------------------------------------------------------- spectrum


def gaps(sigma: Tensor) -> Tensor:
    """[W'-1] float64, σ_j² − σ_{j+1}² (units of G: squared parameter units)."""
    s2 = sigma.to(torch.float64) ** 2
    return s2[:-1] - s2[1:]


def g23(sigma: Tensor) -> float:
    """σ_2² − σ_3²; NaN when the window has fewer than three singular values."""
    g = gaps(sigma)
    return float(g[FIRST_GAP - 1]) if g.numel() >= FIRST_GAP else math.nan


def _argmax_defined(scores: Tensor, defined: Tensor) -> int:
    """1-based argmax of ``scores`` over ``defined`` (first on ties); 1 if none defined."""
    if not bool(defined.any()):
        return 1
    masked = torch.where(defined, scores, torch.full_like(scores, -math.inf))
    return int(masked.argmax()) + 1


def _ratios(sigma: Tensor) -> tuple[Tensor, Tensor]:
    s = sigma.to(torch.float64)
    head, tail = s[:-1], s[1:]
    defined = tail > 0
    return head / torch.where(defined, tail, torch.ones_like(tail)), defined


def kstar_ratio(sigma: Tensor) -> int:
    """k* = argmax_j σ_j/σ_{j+1}, 1-based.

    Ratios with σ_{j+1} = 0 are skipped; ties go to the smallest j; with fewer than two
    positive singular values no ratio is defined and the leading mode, 1, is returned.
    """
    ratios, defined = _ratios(sigma)
    return _argmax_defined(ratios, defined)


def kstar_weighted(sigma: Tensor) -> int:
    """Signal-weighted k* = argmax_j (σ_j/Σσ)·(σ_j/σ_{j+1}), 1-based, rules of ``kstar_ratio``."""
    ratios, defined = _ratios(sigma)
    s = sigma.to(torch.float64)
    total = float(s.sum())
    if total <= 0:
        return 1
    return _argmax_defined(s[:-1] / total * ratios, defined)


def spectral_ratio(sigma: Tensor, k: int) -> float:
    """R = σ_k/σ_{k+1} (1-based k, 1 <= k < W'); +inf if only σ_{k+1} = 0, NaN if both."""
    if not 1 <= k < sigma.numel():
        raise ValueError(f"k must be in [1, {sigma.numel() - 1}], got {k}")
    num, den = float(sigma[k - 1]), float(sigma[k])
    if den > 0:
        return num / den
    return math.inf if num > 0 else math.nan


# ---------------------------------------------------------------------- partial products


def partial_inner(a: Tensor, b: Tensor) -> Tensor:
    """Float64 dot products of the rows of ``a`` [m, p] (or [p]) with those of ``b`` [n, p].

    Returns [m, n] float64 on the inputs' device. On slices: sum over ranks for the whole.
    """
    return chunked_matmul_t(_as_rows(a), _as_rows(b), torch.float64)


def stacked_gram(*blocks: Tensor) -> Tensor:
    """Gram [m, m] float64 (device) of all rows of ``blocks`` ([m_i, p] or [p]) stacked."""
    rows = torch.cat([_as_rows(b) for b in blocks])
    return partial_inner(rows, rows)


# ---------------------------------------------------------------------------- rotation


def rotation_partial(v_prev: Tensor, v_curr: Tensor) -> Tensor:
    """Partial products for ``rotation_finish``: the [2k, 2k] Gram of (v_prev; v_curr)."""
    if v_prev.shape != v_curr.shape:
        raise ValueError(f"shapes differ: {list(v_prev.shape)} vs {list(v_curr.shape)}")
    return stacked_gram(v_prev, v_curr)


def rotation_finish(gram: Tensor) -> Tensor:
    """[k] degrees, arccos |⟨v_prev,j, v_curr,j⟩| / (‖v_prev,j‖ ‖v_curr,j‖), in [0, 90].

    ``gram`` is the (summed) ``rotation_partial``. NaN where a vector is zero.
    """
    g = gram.to("cpu", torch.float64)
    k = g.shape[0] // 2
    idx = torch.arange(k)
    dot = g[idx, idx + k].abs()
    norms = (g[idx, idx] * g[idx + k, idx + k]).sqrt()
    cos = torch.where(norms > 0, dot / torch.where(norms > 0, norms, 1.0), math.nan)
    return torch.rad2deg(torch.arccos(cos.clamp(max=1.0)))


def rotation_deg(v_prev: Tensor, v_curr: Tensor) -> float | Tensor:
    """Edge rotation arccos |⟨v_prev, v_curr⟩| in degrees (sign-invariant, normalised).

    Vectors [p] give a float; rows [k, p] give [k] angles (row j with row j).
    """
    angles = rotation_finish(rotation_partial(v_prev, v_curr))
    return float(angles[0]) if v_prev.ndim == 1 else angles


# --------------------------------------------------------------------- principal angles


def _inv_sqrt(gram: Tensor) -> Tensor:
    evals, evecs = torch.linalg.eigh((gram + gram.T) / 2)
    tol = torch.finfo(torch.float64).eps * gram.shape[0] * float(evals.abs().max())
    inv = torch.where(evals > tol, evals.clamp(min=tol).rsqrt(), math.nan)
    return evecs @ torch.diag(inv) @ evecs.T


def principal_angles_partial(u: Tensor, v: Tensor) -> Tensor:
    """Partial products for ``principal_angles_finish``: Gram [(m+n), (m+n)] of (U; V)."""
    return stacked_gram(u, v)


def principal_angles_finish(gram: Tensor, m: int) -> Tensor:
    """Principal angles (degrees, ascending, [min(m, n)]) between span(U) and span(V).

    ``gram`` is the summed ``principal_angles_partial`` and ``m`` the number of rows of U.
    The rows need not be orthonormal: each block is whitened by its own Gram, so the
    angles are those of the spans; NaN if a set of rows is linearly dependent.
    """
    g = gram.to("cpu", torch.float64)
    guu, gvv, guv = g[:m, :m], g[m:, m:], g[:m, m:]
    cosines = torch.linalg.svdvals(_inv_sqrt(guu) @ guv @ _inv_sqrt(gvv))
    return torch.rad2deg(torch.arccos(cosines.clamp(0.0, 1.0)))


def principal_angles_deg(u: Tensor, v: Tensor) -> Tensor:
    """Principal angles between span(rows of U [m, p]) and span(rows of V [n, p]), degrees.

    E.g. the edge planes span(v_1, v_2) of two windows: ``U = state.vectors[:2]``.
    """
    return principal_angles_finish(principal_angles_partial(u, v), _as_rows(u).shape[0])


# ---------------------------------------------------------------------------- stability


def split_halves(count: int) -> tuple[slice, slice]:
    """The two halves of a window of ``count`` deltas (chronological) for ``stability``.

    Both halves hold h = ⌊count/2⌋ deltas: the oldest h and the newest h. For odd counts
    the middle delta belongs to neither, so the halves are disjoint (no shared delta
    inflates α) and equally long (comparable spectra). E.g. W' = 5: deltas 1-2 vs 4-5.
    """
    h = count // 2
    if h < 1:
        raise ValueError(f"stability needs at least 2 deltas, got {count}")
    return slice(0, h), slice(count - h, count)


def stability_finish(gram: Tensor, n_first: int) -> Tensor:
    """α_j = |⟨v_j(A), v_j(B)⟩|, j = 1..min(h_A, h_B), from the Gram of (A; B) stacked.

    With A = the first ``n_first`` rows and B the rest, v_j(A) = Aᵀ a_j / s_j, so
    ⟨v_j(A), v_j(B)⟩ = a_jᵀ (A Bᵀ) b_j / (s_j t_j): W×W algebra only. NaN where a
    half has fewer than j non-zero singular values.
    """
    g = gram.to("cpu", torch.float64)
    s_a, u_a = spectrum(g[:n_first, :n_first])
    s_b, u_b = spectrum(g[n_first:, n_first:])
    h = min(s_a.numel(), s_b.numel())
    cross = u_a[:, :h].T @ g[:n_first, n_first:] @ u_b[:, :h]
    norm = s_a[:h] * s_b[:h]
    return torch.where(
        norm > 0, cross.diagonal().abs() / torch.where(norm > 0, norm, 1.0), math.nan
    )


def stability(deltas_first_half: Tensor, deltas_second_half: Tensor) -> Tensor:
    """[min(h_A, h_B)] float64, α_j between the edge vectors of two sets of deltas [h, p]."""
    gram = stacked_gram(deltas_first_half, deltas_second_half)
    return stability_finish(gram, _as_rows(deltas_first_half).shape[0])


def stability_from_gram(gram: Tensor) -> Tensor:
    """α_j of a window from its Gram [W', W'] alone, halves as in ``split_halves``."""
    first, second = split_halves(gram.shape[0])
    idx = torch.cat([torch.arange(gram.shape[0])[first], torch.arange(gram.shape[0])[second]])
    g = gram.to("cpu", torch.float64)[idx][:, idx]
    return stability_finish(g, first.stop - first.start)


# -------------------------------------------------------------------------- Davis-Kahan


def davis_kahan_gap(gram_prev: Tensor, gram_curr: Tensor) -> float:
    """Eigengap of v_1 used by ``davis_kahan_bound``: λ_1(G_curr) − λ_2(G_prev).

    This is the separation, in the sin θ theorem, between v_1's eigenvalue in the
    perturbed matrix and the rest of the unperturbed spectrum; with it the bound is a
    theorem for any perturbation size (the naive σ_1² − σ_2² of G_prev is only valid for
    small ‖ΔG‖). +inf when G_prev has a single eigenvalue (no other mode to rotate into).
    """
    lam_prev = spectrum(gram_prev)[0] ** 2
    lam_curr = spectrum(gram_curr)[0] ** 2
    if lam_prev.numel() < FIRST_GAP:
        return math.inf
    return float(lam_curr[0] - lam_prev[1])


def davis_kahan_bound(gram_prev: Tensor, gram_curr: Tensor, gap: float | None = None) -> float:
    """Davis–Kahan bound sin θ(u_1, u'_1) <= ‖G_curr − G_prev‖_F / gap.

    θ is the angle between the top eigenvectors of the two W'×W' matrices, which must be
    indexed consistently (same deltas per row). ``gap`` defaults to ``davis_kahan_gap``;
    a non-positive gap gives +inf (no bound).
    """
    if gram_prev.shape != gram_curr.shape:
        raise ValueError(f"shapes differ: {list(gram_prev.shape)} vs {list(gram_curr.shape)}")
    diff = gram_curr.to("cpu", torch.float64) - gram_prev.to("cpu", torch.float64)
    gap = davis_kahan_gap(gram_prev, gram_curr) if gap is None else gap
    if gap <= 0:
        return math.inf
    if math.isinf(gap):
        return 0.0
    return float(torch.linalg.matrix_norm(diff, "fro")) / gap


def _psd_sqrt(gram: Tensor) -> Tensor:
    evals, evecs = torch.linalg.eigh((gram + gram.T) / 2)
    return evecs @ torch.diag(evals.clamp(min=0.0).sqrt()) @ evecs.T


def window_shift_grams(
    gram_prev: Tensor, gram_curr: Tensor, evicted_dot: float | None
) -> tuple[Tensor, Tensor]:
    """Two consecutive windows' operators XᵀX in one common orthonormal frame.

    The edge v_1 of a window X [n, p] is the top eigenvector of the p×p operator
    M = XᵀX, whose nonzero spectrum is that of G = X Xᵀ. Consecutive windows share all
    deltas but the evicted oldest one (prev) and the newest one (curr). Let Y [m, p] hold
    the union of their deltas, oldest first (m = n + 1 when one was evicted, m = n when
    the window only grew), S = (Y Yᵀ)^{1/2} and D_prev, D_curr the 0/1 diagonals picking
    each window's rows. Then

        A = S D_prev S,   B = S D_curr S        ([m, m])

    are M_prev and M_curr seen through the polar factor of Y (an isometry on the span of
    the deltas): same nonzero eigenvalues, eigenvectors mapped to the v's with angles
    preserved, and ‖A − B‖_F = ‖M_curr − M_prev‖_F. So ``davis_kahan_bound(A, B)`` is
    a theorem for the rotation of v_1 itself, from W×W numbers only.

    Args:
        gram_prev: [n_p, n_p] float64, G of the previous window, chronological.
        gram_curr: [n_c, n_c] G of the current window, chronological.
        evicted_dot: δ_evicted · δ_newest (``UpdateWindow.last_evicted_dot``), or
            ``None`` if the window grew (n_c = n_p + 1, nothing evicted).
    Returns:
        (A, B), [m, m] float64 CPU.
    """
    gp = gram_prev.to("cpu", torch.float64)
    gc = gram_curr.to("cpu", torch.float64)
    n_p, n_c = gp.shape[0], gc.shape[0]
    if evicted_dot is None:
        if n_c != n_p + 1:
            raise ValueError(f"a grown window has one delta more: got {n_p} then {n_c}")
        union = gc
        d_prev = torch.ones(n_c, dtype=torch.float64)
        d_prev[-1] = 0.0
        d_curr = torch.ones(n_c, dtype=torch.float64)
    else:
        if n_c != n_p:
            raise ValueError(f"a slid window keeps its size: got {n_p} then {n_c}")
        m = n_p + 1
        union = torch.zeros(m, m, dtype=torch.float64)
        union[:n_p, :n_p] = gp
        union[1:, 1:] = gc  # the shared deltas: the same stored dot products as gp[1:, 1:]
        union[0, m - 1] = union[m - 1, 0] = float(evicted_dot)
        d_prev = torch.ones(m, dtype=torch.float64)
        d_prev[-1] = 0.0
        d_curr = torch.ones(m, dtype=torch.float64)
        d_curr[0] = 0.0
    s = _psd_sqrt(union)
    return s @ torch.diag(d_prev) @ s, s @ torch.diag(d_curr) @ s


def window_shift_dk_bound(gram_prev: Tensor, gram_curr: Tensor, evicted_dot: float | None) -> float:
    """Davis–Kahan bound on sin of v_1's rotation between two consecutive windows.

    ``davis_kahan_bound`` on ``window_shift_grams``: ‖M_curr − M_prev‖_F divided by
    λ_1(curr) − λ_2(prev) (σ² units cancel; dimensionless). Compare with
    ``sin(rotation_deg)`` of v_1; values >= 1 bound nothing.
    """
    a, b = window_shift_grams(gram_prev, gram_curr, evicted_dot)
    return davis_kahan_bound(a, b)
