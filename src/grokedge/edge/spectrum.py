"""The spectral edge of a window: singular values, edge vectors, per-delta projections.

Everything but the edge vectors comes from W×W algebra (float64, CPU). With the
eigenpairs (σ_k², u_k) of G = X Xᵀ the right singular vectors are v_k = Xᵀ u_k / σ_k, and

    δ_i · v_k    = (G u_k)_i / σ_k = σ_k u_k[i]
    δ_wd,i · v_k = (C u_k)_i / σ_k              (C = X_wd Xᵀ)
    δ_grad,i · v_k = δ_i · v_k − δ_wd,i · v_k

so the projections need no p-sized work. Only the top-k vectors are materialised,
O(k·W·p), on the deltas' device. Under slicing (docs/design.md, Scale) every rank passes the
*summed* W×W matrices and its own slice of the deltas: the eigendecomposition is the same
on every rank, and each gets its slice of v_k.

Sign convention: u_k (hence v_k) is flipped so that its largest-magnitude entry is
positive: the delta with the largest projection on v_k projects positively,
δ_i · v_k > 0. Entries within ``SIGN_TIE_RTOL`` of the largest count as tied, and the
first of them decides: the Gram's float32 products (grokedge.edge.window) are exact
to ~1e-7 of its scale only, so a closer margin is round-off, which two runs of the same
window (one process, or slices summed across ranks) may order differently. The sign is
thus a function of G alone, identical on every rank.

Rank: eigenvalues below ``RANK_RTOL · W' · λ_max`` are round-off of a rank-deficient G
(fewer independent deltas than W', or zero updates); their σ is reported as 0, their
vectors and projections are zero, never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from grokedge.edge.window import UpdateWindow

RANK_RTOL = 10 * torch.finfo(torch.float64).eps
"""Relative eigenvalue threshold (per row of G) below which a mode counts as zero."""
SIGN_TIE_RTOL = 1e-5
"""Entries of u_k within this fraction of its largest magnitude tie for its sign: well
above the float32 Gram products' ~1e-7 (grokedge.edge.window), far below a real gap."""


@runtime_checkable
class DeltaSource(Protocol):
    """Anything that can form ``coeffs @ X`` for chronological coefficients [m, W']."""

    def combine(self, coeffs: Tensor) -> Tensor: ...


@dataclass
class WindowSpectrum:
    """The spectrum of one window and the per-delta projections on its directions, from
    W×W algebra alone (no p-sized vectors). W' = deltas in the window, k = top_k.

    Attributes:
        step: optimizer step at which the window's newest delta was closed.
        sigma: [W'] float64 CPU, singular values of X, descending, >= 0.
        eigvecs: [W', W'] float64 CPU, column j = u_j (eigenvector of G for σ_j²), sign
            convention of the module docstring.
        grad_proj: [W', k] float64 CPU, δ_grad,i · v_k (parameter units).
        wd_proj: [W', k] float64 CPU, δ_wd,i · v_k.
        count: W', deltas in the window.
        gram, cross_gram, wd_gram: [W', W'] float64 CPU, the (summed) matrices used.
        spans: W' (begin, end) optimizer steps of the deltas, oldest first (empty when
            unrecorded).
        definition: the edge definition that formed the window's rows
            (:mod:`grokedge.edge.definitions`; ``paper``: the raw deltas).
    """

    step: int
    sigma: Tensor
    eigvecs: Tensor
    grad_proj: Tensor
    wd_proj: Tensor
    count: int
    gram: Tensor
    cross_gram: Tensor
    wd_gram: Tensor
    spans: list[tuple[int, int]] = field(default_factory=list, kw_only=True)
    definition: str = field(default="paper", kw_only=True)

    @property
    def top_k(self) -> int:
        return self.grad_proj.shape[1]

    @property
    def total_proj(self) -> Tensor:
        """[W', k] float64, δ_i · v_k = grad_proj + wd_proj."""
        return self.grad_proj + self.wd_proj


@dataclass
class EdgeState(WindowSpectrum):
    """A :class:`WindowSpectrum` with its top-k edge vectors materialised.

    Attributes:
        vectors: [k, p] on the deltas' device and dtype, rows v_1..v_k (unit norm over the
            whole θ_sel; a slice of it under slicing); zero rows where σ_k = 0.
    """

    vectors: Tensor

    @property
    def top_k(self) -> int:
        return self.vectors.shape[0]


def spectrum(gram: Tensor) -> tuple[Tensor, Tensor]:
    """σ (descending, [W']) and U ([W', W'], columns u_j, sign-normalised) of G, float64."""
    g = gram.to("cpu", torch.float64)
    g = (g + g.T) / 2  # eigh reads one triangle; symmetrising averages the round-off
    evals, evecs = torch.linalg.eigh(g)
    evals, evecs = evals.flip(0), evecs.flip(1)
    if evals.numel():
        tol = RANK_RTOL * evals.numel() * max(float(evals[0]), 0.0)
        evals = torch.where(evals > tol, evals, torch.zeros_like(evals))
    magnitude = evecs.abs()
    tied = magnitude >= magnitude.amax(dim=0) * (1.0 - SIGN_TIE_RTOL)
    lead = tied.to(torch.int8).argmax(dim=0)  # the first entry tied with the largest
    signs = torch.sign(evecs[lead, torch.arange(evecs.shape[1])])
    evecs = evecs * torch.where(signs == 0, torch.ones_like(signs), signs)
    return evals.sqrt(), evecs


def _checked(gram: Tensor, cross_gram: Tensor, wd_gram: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    n = gram.shape[0]
    if gram.shape != (n, n) or cross_gram.shape != (n, n) or wd_gram.shape != (n, n):
        raise ValueError(
            f"gram, cross_gram, wd_gram must be square and equal, got {list(gram.shape)}, "
            f"{list(cross_gram.shape)}, {list(wd_gram.shape)}"
        )
    return (
        gram.to("cpu", torch.float64),
        cross_gram.to("cpu", torch.float64),
        wd_gram.to("cpu", torch.float64),
    )


def _top(sigma: Tensor, u: Tensor, top_k: int) -> tuple[int, Tensor, Tensor, Tensor]:
    """k' = min(top_k, W'), u_1..u_k', σ_1..σ_k' and 1/σ (0 where σ = 0)."""
    k_avail = min(top_k, u.shape[0])
    u_k, s_k = u[:, :k_avail], sigma[:k_avail]
    nonzero = s_k > 0
    inv = torch.where(nonzero, 1.0 / torch.where(nonzero, s_k, torch.ones_like(s_k)), 0.0)
    return k_avail, u_k, s_k, inv


def _coeffs(u_k: Tensor, inv: Tensor, top_k: int) -> Tensor:
    """[top_k, W'] float64: v_k = Σ_i (u_k[i] / σ_k) δ_i (zero rows beyond k')."""
    coeffs = torch.zeros(top_k, u_k.shape[0], dtype=torch.float64)
    coeffs[: u_k.shape[1]] = (u_k * inv).T
    return coeffs


def _decompose(
    gram: Tensor, cross_gram: Tensor, top_k: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """σ, U, the [top_k, W'] coefficients of v_k in the deltas, and the total and WD
    projections [W', top_k] of each delta on each v_k (all float64 CPU)."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    n = gram.shape[0]
    sigma, u = spectrum(gram)
    k_avail, u_k, s_k, inv = _top(sigma, u, top_k)
    coeffs = _coeffs(u_k, inv, top_k)
    total_proj = torch.zeros(n, top_k, dtype=torch.float64)
    wd_proj = torch.zeros(n, top_k, dtype=torch.float64)
    total_proj[:, :k_avail] = u_k * s_k  # zero where σ_k = 0
    wd_proj[:, :k_avail] = (cross_gram @ u_k) * inv
    return sigma, u, coeffs, total_proj, wd_proj


def _vectors(coeffs: Tensor, deltas: Tensor | DeltaSource, n: int, out: Tensor | None) -> Tensor:
    """``coeffs @ X`` from the deltas (a tensor [W', p] or a ``DeltaSource``)."""
    if isinstance(deltas, Tensor):
        if deltas.ndim != 2 or deltas.shape[0] != n:
            raise ValueError(f"deltas must be [{n}, p], got {list(deltas.shape)}")
        return torch.matmul(coeffs.to(deltas.device, deltas.dtype), deltas, out=out)
    # ``out`` only for sources that take it (UpdateWindow does).
    return deltas.combine(coeffs) if out is None else deltas.combine(coeffs, out=out)


def window_spectrum(
    gram: Tensor,
    cross_gram: Tensor,
    wd_gram: Tensor,
    top_k: int,
    step: int,
    spans: list[tuple[int, int]] | None = None,
    definition: str = "paper",
) -> WindowSpectrum:
    """The spectrum and projections of a window from its W×W matrices alone (no vectors).

    Args as :func:`compute_edge`; ``spans``: the deltas' (begin, end) steps, oldest first.
    """
    gram, cross_gram, wd_gram = _checked(gram, cross_gram, wd_gram)
    sigma, u, _, total_proj, wd_proj = _decompose(gram, cross_gram, top_k)
    return WindowSpectrum(
        step=int(step),
        sigma=sigma,
        eigvecs=u,
        grad_proj=total_proj - wd_proj,
        wd_proj=wd_proj,
        count=gram.shape[0],
        gram=gram,
        cross_gram=cross_gram,
        wd_gram=wd_gram,
        spans=list(spans or []),
        definition=definition,
    )


def compute_edge(
    gram: Tensor,
    cross_gram: Tensor,
    wd_gram: Tensor,
    deltas: Tensor | DeltaSource,
    top_k: int,
    step: int,
    out: Tensor | None = None,
    spans: list[tuple[int, int]] | None = None,
    definition: str = "paper",
) -> EdgeState:
    """Eigendecompose the window's Gram and materialise the top-k edge vectors.

    Args:
        gram: [W', W'] G = X Xᵀ (summed over slices), chronological.
        cross_gram: [W', W'] C = X_wd Xᵀ, same order.
        wd_gram: [W', W'] X_wd X_wdᵀ (kept in the state for energy read-outs).
        deltas: X, [W', p] chronological (this rank's slice), or a ``DeltaSource`` such as
            an ``UpdateWindow`` (avoids reordering the ring).
        top_k: number of edge vectors, >= 1; may exceed W' (extra rows are zero).
        step: optimizer step recorded in the state.
        out: optional [top_k, p] buffer for the vectors (deltas' dtype and device); reuse
            one across windows to avoid a fresh p-sized allocation each time. The state's
            ``vectors`` is then this buffer: don't reuse it while the state is in use.
        spans, definition: recorded in the state (see :class:`WindowSpectrum`).
    """
    gram, cross_gram, wd_gram = _checked(gram, cross_gram, wd_gram)
    n = gram.shape[0]
    sigma, u, coeffs, total_proj, wd_proj = _decompose(gram, cross_gram, top_k)
    vectors = _vectors(coeffs, deltas, n, out)
    return EdgeState(
        step=int(step),
        sigma=sigma,
        eigvecs=u,
        vectors=vectors,
        grad_proj=total_proj - wd_proj,
        wd_proj=wd_proj,
        count=n,
        gram=gram,
        cross_gram=cross_gram,
        wd_gram=wd_gram,
        spans=list(spans or []),
        definition=definition,
    )


def edge_from_spectrum(
    spec: WindowSpectrum, deltas: Tensor | DeltaSource, out: Tensor | None = None
) -> EdgeState:
    """:func:`compute_edge` of a window whose spectrum is already known: the same state
    (the spectrum's tensors, shared, not copied) with its top-k vectors materialised from
    ``deltas`` (the rows the spectrum was computed of), without a second
    eigendecomposition. ``out`` as in :func:`compute_edge`."""
    _, u_k, _, inv = _top(spec.sigma, spec.eigvecs, spec.top_k)
    vectors = _vectors(_coeffs(u_k, inv, spec.top_k), deltas, spec.count, out)
    return EdgeState(
        step=spec.step,
        sigma=spec.sigma,
        eigvecs=spec.eigvecs,
        vectors=vectors,
        grad_proj=spec.grad_proj,
        wd_proj=spec.wd_proj,
        count=spec.count,
        gram=spec.gram,
        cross_gram=spec.cross_gram,
        wd_gram=spec.wd_gram,
        spans=list(spec.spans),
        definition=spec.definition,
    )


def edge_from_window(
    window: UpdateWindow, top_k: int, step: int, out: Tensor | None = None
) -> EdgeState:
    """``compute_edge`` on a single (unsliced) window: no reduction of the W×W matrices."""
    return compute_edge(
        *window.matrices(),
        window,
        top_k,
        step,
        out,
        spans=window.spans(),
    )
