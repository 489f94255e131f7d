"""Edge definitions: which rows form the window whose spectrum is called the edge.

The paper's edge is the top right singular vector of the raw window X = [δ_1; …; δ_W'].
Its σ_1² is a sum of per-delta contributions σ_1² u_1[i]², so one delta much larger than
the others (the first one, θ(N) − θ(0), carries the initial transient) can own the edge
until it leaves the window, W intervals later (docs/edge_definitions.md). The other
definitions change the rows, not the algebra:

- ``paper``:      X' = X, every delta of the window as it is;
- ``burn_in``:    X' = the rows of X whose delta *begins* at or after ``start_step``
                  (a delta θ(e) − θ(b) begins at b): the window simply ignores the deltas
                  of the burn-in, and equals ``paper`` once none is left in it;
- ``normalized``: X' = D^{-1/2} X with D = diag(G): every delta scaled to unit norm, so
                  the edge is the direction the deltas *share*, whatever their sizes.
                  Its weight-decay part is scaled by the same 1/‖δ_i‖, so that
                  δ'_grad,i + δ'_wd,i = δ'_i still holds and the energy shares keep their
                  meaning (each delta weighs the same in the window mean).

Each is X' = T X for a [W'', W'] row map T (a selection and a scaling), hence

    G' = T G Tᵀ,   C' = T C Tᵀ,   X'_wd X'_wdᵀ = T (X_wd X_wdᵀ) Tᵀ,   v'_k = (c'_k T) X

so every definition costs W×W algebra, plus one combination of the stored deltas for
the definition whose vectors are materialised. Under slicing the matrices are the summed
ones and T is the same on every rank.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from grokedge.checks import check_choice
from grokedge.edge.spectrum import (
    DeltaSource,
    EdgeState,
    WindowSpectrum,
    compute_edge,
    edge_from_spectrum,
    window_spectrum,
)
from grokedge.edge.window import MIN_WINDOW

PAPER, BURN_IN, NORMALIZED = "paper", "burn_in", "normalized"
EDGE_DEFINITIONS = (PAPER, BURN_IN, NORMALIZED)
"""Every edge definition, the paper's first."""


def check_definition(key: str, value: object) -> str:
    """``value`` if it names an edge definition, else the error naming ``key``."""
    return check_choice(key, value, EDGE_DEFINITIONS)


def definition_rows(
    definition: str, gram: Tensor, spans: list[tuple[int, int]], start_step: int = 0
) -> Tensor:
    """The row map T of ``definition`` for one window.

    Args:
        definition: one of :data:`EDGE_DEFINITIONS`.
        gram: [W', W'] G = X Xᵀ (summed over slices), chronological.
        spans: W' (begin, end) steps of the deltas, oldest first (``burn_in`` reads the
            begins; an unknown begin, −1, counts as inside the burn-in).
        start_step: the burn-in: ``burn_in`` keeps deltas with begin >= start_step (0:
            every delta).
    Returns:
        T, [W'', W'] float64 CPU (W'' <= W': the rows kept, in chronological order).
    """
    n = gram.shape[0]
    eye = torch.eye(n, dtype=torch.float64)
    if definition == PAPER:
        return eye
    if definition == BURN_IN:
        if start_step <= 0:
            return eye
        if len(spans) != n:
            raise ValueError(f"burn_in needs the {n} deltas' spans, got {len(spans)}")
        keep = [i for i, (begin, _) in enumerate(spans) if begin >= start_step]
        return eye[keep]
    if definition == NORMALIZED:
        norms = gram.to("cpu", torch.float64).diagonal().clamp(min=0).sqrt()
        # A zero delta stays a zero row: no direction to share.
        inv = torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, 1.0), 0.0)
        return torch.diag(inv)
    raise ValueError(f"unknown edge definition {definition!r}: one of {EDGE_DEFINITIONS}")


def mapped_matrices(
    rows: Tensor, gram: Tensor, cross_gram: Tensor, wd_gram: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """T G Tᵀ, T C Tᵀ and T Gw Tᵀ ([W'', W''] float64 CPU) for the row map T."""
    # One batched product for the three matrices: a capture runs this for every
    # definition, and each small torch call costs microseconds (more right after the
    # p-sized passes have emptied the caches). Each row of T has at most one non-zero
    # entry, so every entry is one product whatever the summation order: the same bits
    # as three separate products.
    mats = torch.stack([m.to("cpu", torch.float64) for m in (gram, cross_gram, wd_gram)])
    return tuple((rows @ mats @ rows.T).unbind(0))  # type: ignore[return-value]


def mapped_spans(rows: Tensor, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The spans of the rows T keeps (each row of T has one non-zero entry or none)."""
    if len(spans) != rows.shape[1]:
        return []
    out = []
    for row in rows.tolist():  # one host read-out instead of a nonzero() per row
        nz = [j for j, x in enumerate(row) if x != 0]
        if nz:
            out.append(spans[nz[0]])
    return out


class MappedDeltas:
    """``coeffs @ (T X)`` from a source of X, without forming T X ([W'', p])."""

    def __init__(self, source: DeltaSource, rows: Tensor) -> None:
        self.source = source
        self.rows = rows

    def combine(self, coeffs: Tensor, out: Tensor | None = None) -> Tensor:
        mixed = coeffs.to(torch.float64) @ self.rows
        if out is None:
            return self.source.combine(mixed)
        return self.source.combine(mixed, out=out)  # type: ignore[call-arg]


def _mapped_window(
    definition: str,
    gram: Tensor,
    cross_gram: Tensor,
    wd_gram: Tensor,
    spans: list[tuple[int, int]],
    start_step: int,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor], list[tuple[int, int]]] | None:
    """(T, its three W''×W'' matrices, its spans), or ``None`` below two deltas."""
    rows = definition_rows(definition, gram, spans, start_step)
    if rows.shape[0] < MIN_WINDOW:
        return None
    if _keeps_every_row(definition, spans, gram.shape[0], start_step):
        # T = I: T M Tᵀ = M exactly; skip the products (a capture's fixed cost).
        mats = tuple(m.to("cpu", torch.float64) for m in (gram, cross_gram, wd_gram))
        kept = list(spans) if len(spans) == rows.shape[1] else []
        return rows, mats, kept  # type: ignore[return-value]
    return rows, mapped_matrices(rows, gram, cross_gram, wd_gram), mapped_spans(rows, spans)


def _keeps_every_row(
    definition: str, spans: list[tuple[int, int]], n: int, start_step: int
) -> bool:
    """Whether ``definition_rows`` is the identity for this window (``paper``; ``burn_in``
    once every delta begins at or after ``start_step``: its steady state)."""
    if definition == PAPER or (definition == BURN_IN and start_step <= 0):
        return True
    if definition != BURN_IN or len(spans) != n:
        return False  # (definition_rows raises on missing spans)
    return all(begin >= start_step for begin, _ in spans)


def definition_spectrum(
    definition: str,
    gram: Tensor,
    cross_gram: Tensor,
    wd_gram: Tensor,
    spans: list[tuple[int, int]],
    top_k: int,
    step: int,
    start_step: int = 0,
) -> WindowSpectrum | None:
    """The spectrum of the window under ``definition`` (W×W algebra only); ``None`` when
    fewer than two deltas remain (e.g. all inside the burn-in)."""
    mapped = _mapped_window(definition, gram, cross_gram, wd_gram, spans, start_step)
    if mapped is None:
        return None
    _, (g, c, w), kept = mapped
    return window_spectrum(g, c, w, top_k, step, kept, definition)


def definition_edge(
    definition: str,
    gram: Tensor,
    cross_gram: Tensor,
    wd_gram: Tensor,
    deltas: DeltaSource,
    spans: list[tuple[int, int]],
    top_k: int,
    step: int,
    start_step: int = 0,
    out: Tensor | None = None,
) -> EdgeState | None:
    """The edge (with its top-k vectors, from ``deltas``) under ``definition``; ``None``
    when fewer than two deltas remain. ``paper`` is :func:`compute_edge` exactly."""
    mapped = _mapped_window(definition, gram, cross_gram, wd_gram, spans, start_step)
    if mapped is None:
        return None
    if definition == PAPER:
        return compute_edge(gram, cross_gram, wd_gram, deltas, top_k, step, out, spans, PAPER)
    rows, (g, c, w), kept = mapped
    return compute_edge(g, c, w, MappedDeltas(deltas, rows), top_k, step, out, kept, definition)


def spectrum_edge(
    spec: WindowSpectrum | None,
    gram: Tensor,
    spans: list[tuple[int, int]],
    deltas: DeltaSource,
    start_step: int = 0,
    out: Tensor | None = None,
) -> EdgeState | None:
    """:func:`definition_edge` under ``spec.definition``, from that definition's spectrum
    (``all_spectra``) already computed: the same state without a second
    eigendecomposition. ``gram``, ``spans``: the raw window's G and spans (they give the
    row map T)."""
    if spec is None:
        return None
    if spec.definition == PAPER:
        return edge_from_spectrum(spec, deltas, out)
    rows = definition_rows(spec.definition, gram, spans, start_step)
    return edge_from_spectrum(spec, MappedDeltas(deltas, rows), out)


def all_spectra(
    gram: Tensor,
    cross_gram: Tensor,
    wd_gram: Tensor,
    spans: list[tuple[int, int]],
    top_k: int,
    step: int,
    start_step: int = 0,
) -> dict[str, WindowSpectrum | None]:
    """:func:`definition_spectrum` under every definition, keyed by name."""
    out: dict[str, WindowSpectrum | None] = {}
    for d in EDGE_DEFINITIONS:
        paper = out.get(PAPER)
        if d != PAPER and paper is not None and _keeps_every_row(d, spans, paper.count, start_step):
            # Same rows as the paper's window (burn_in past its burn-in): the same
            # matrices give the same spectrum bit for bit; skip the second
            # eigendecomposition (a capture's fixed cost).
            out[d] = replace(paper, definition=d)
            continue
        out[d] = definition_spectrum(d, gram, cross_gram, wd_gram, spans, top_k, step, start_step)
    return out
