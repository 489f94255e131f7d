"""Read-outs of one window's edge (docs/theory.md §1, experiment 1): energy shares,
alignment, motion between consecutive windows, and their ``edge/*`` scalars.

Glue over the spectral math with CPU lists out, shared by
``grokedge.callbacks.edge_readouts`` (which re-exports :func:`measure` and
:func:`edge_scalars`), tests and scripts; no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from grokedge.edge.decomposition import energy_fractions, latest_energy_fractions
from grokedge.edge.geometry import (
    g23,
    gaps,
    kstar_ratio,
    kstar_weighted,
    principal_angles_finish,
    rotation_finish,
    spectral_ratio,
    stability_from_gram,
    stacked_gram,
    window_shift_dk_bound,
)
from grokedge.edge.provenance import sigma1_shares
from grokedge.edge.spectrum import EdgeState, WindowSpectrum

ROTATED = 3
"""Rotation is reported for v_1..v_3 (the edge and the first bulk direction)."""

PLANE = 2
"""Principal angles between the edge planes span(v_1, v_2) of consecutive windows."""


def measure(
    state: EdgeState,
    previous: EdgeState | None,
    evicted_dot: float | None,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Any]:
    """Every read-out of one window (glue over ``grokedge.edge``; CPU lists out).

    Args:
        state: the newest window's edge, k = ``state.top_k`` directions.
        previous: the window before (``None``: no motion read-outs).
        evicted_dot: ``GramCallback.evicted_dot``, relating ``previous`` and ``state``.
        reduce: when the vectors are this rank's slices, the sum over ranks of a partial
            Gram (``GramCallback.reduce``; collective: every rank calls ``measure``).
            Everything else here is W×W algebra on matrices already summed.

    Returns:
        ``grad_frac``, ``wd_frac``, ``align`` and their ``*_latest`` forms ([k] lists;
        fractions dimensionless, alignment in squared parameter units), ``stability``
        ([⌊W'/2⌋]), ``rotation_deg`` ([min(3, k)] degrees, NaN without ``previous``),
        ``principal_angles_deg`` ([2] degrees), ``dk_bound`` (bound on sin of v_1's
        rotation) and ``dk_bound_deg`` (its arcsin, 90 when the bound is >= 1).
    """
    k = state.top_k
    grad_frac, wd_frac, align = energy_fractions(state.grad_proj, state.wd_proj)
    grad_latest, wd_latest, align_latest = latest_energy_fractions(state.grad_proj, state.wd_proj)
    n_rot = min(ROTATED, k)
    rotation = [math.nan] * n_rot
    angles = [math.nan] * PLANE
    dk = math.nan
    if previous is not None:
        n = n_rot  # >= PLANE whenever k >= PLANE
        # One [2n, 2n] Gram of (v_prev; v_curr) on the device: rotation and plane angles
        # (sharded: of the slices, summed over ranks in one all-reduce).
        gram = stacked_gram(previous.vectors[:n], state.vectors[:n])
        gram = (gram if reduce is None else reduce(gram)).to("cpu")
        rotation = rotation_finish(gram).tolist()
        if k >= PLANE:
            plane = torch.tensor([0, 1, n, n + 1])
            angles = principal_angles_finish(gram[plane][:, plane], PLANE).tolist()
        dk = window_shift_dk_bound(previous.gram, state.gram, evicted_dot)
    if math.isnan(dk):
        dk_deg = math.nan
    else:  # a bound >= 1 (or +inf: no positive gap) bounds nothing: 90 degrees
        dk_deg = math.degrees(math.asin(min(1.0, dk)))
    return {
        "grad_frac": grad_frac.tolist(),
        "wd_frac": wd_frac.tolist(),
        "align": align.tolist(),
        "grad_frac_latest": grad_latest.tolist(),
        "wd_frac_latest": wd_latest.tolist(),
        "align_latest": align_latest.tolist(),
        "stability": stability_from_gram(state.gram).tolist(),
        "rotation_deg": rotation,
        "principal_angles_deg": angles,
        "dk_bound": dk,
        "dk_bound_deg": dk_deg,
    }


def edge_scalars(m: dict[str, Any]) -> dict[str, float]:
    """The ``edge/*`` scalars of one window from :func:`measure`'s output."""
    values: dict[str, float] = {}
    for i in range(len(m["grad_frac"])):
        k = i + 1
        values[f"edge/grad_frac_v{k}"] = m["grad_frac"][i]
        values[f"edge/wd_frac_v{k}"] = m["wd_frac"][i]
        values[f"edge/align_v{k}"] = m["align"][i]
        values[f"edge/grad_frac_latest_v{k}"] = m["grad_frac_latest"][i]
        values[f"edge/align_latest_v{k}"] = m["align_latest"][i]
    for i, a in enumerate(m["stability"]):
        values[f"edge/stability_v{i + 1}"] = a
    for i, r in enumerate(m["rotation_deg"]):
        values[f"edge/rotation_v{i + 1}_deg"] = r
    if m["rotation_deg"]:
        values["edge/rotation_deg"] = m["rotation_deg"][0]
    for i, a in enumerate(m["principal_angles_deg"]):
        values[f"edge/principal_angle_{i + 1}_deg"] = a
    values["edge/dk_bound"] = m["dk_bound"]
    values["edge/dk_bound_deg"] = m["dk_bound_deg"]
    return values


def definition_readouts(spectrum: WindowSpectrum) -> dict[str, Any]:
    """The energy read-outs of one definition's window ([k] lists): ``count``, ``sigma``,
    ``grad_frac``, ``wd_frac``, ``align`` and ``grad_frac_latest``, ``align_latest``
    (newest delta alone), ``delta_share`` ([W'] each delta's share of σ_1², u_1[i]²)."""
    grad, wd, align = energy_fractions(spectrum.grad_proj, spectrum.wd_proj)
    grad_latest, _, align_latest = latest_energy_fractions(spectrum.grad_proj, spectrum.wd_proj)
    return {
        "count": spectrum.count,
        "first_step": spectrum.spans[0][0] if spectrum.spans else None,
        "sigma": spectrum.sigma.tolist(),
        "grad_frac": grad.tolist(),
        "wd_frac": wd.tolist(),
        "align": align.tolist(),
        "grad_frac_latest": grad_latest.tolist(),
        "align_latest": align_latest.tolist(),
        "delta_share": sigma1_shares(spectrum) or [],
    }


# --------------------------------------------------------------- the spectrum (gram/*)


def spectrum_scalars(state: EdgeState) -> dict[str, float]:
    """The ``gram/*`` read-outs of one window (σ in parameter units, gaps in their square).

    ``gram/sigma_{j}`` (j = 1..W'), ``gram/g23`` = σ_2² − σ_3², ``gram/kstar`` =
    argmax_j σ_j/σ_{j+1}, ``gram/kstar_weighted`` = argmax_j (σ_j/Σσ)(σ_j/σ_{j+1}),
    ``gram/ratio`` = R = σ_k*/σ_{k*+1} (k* of the first definition), ``gram/deltas`` = W'.
    Undefined values are NaN (e.g. g23 with W' = 2).
    """
    sigma = state.sigma
    values = {f"gram/sigma_{j + 1}": float(s) for j, s in enumerate(sigma.tolist())}
    kstar = kstar_ratio(sigma)
    values["gram/g23"] = g23(sigma)
    values["gram/kstar"] = float(kstar)
    values["gram/kstar_weighted"] = float(kstar_weighted(sigma))
    values["gram/ratio"] = spectral_ratio(sigma, kstar) if sigma.numel() > 1 else math.nan
    values["gram/deltas"] = float(state.count)
    return values


def spectrum_row(state: EdgeState) -> dict[str, Any]:
    """The full spectrum of one window as plain lists, for ``analyses.jsonl``."""
    scalars = spectrum_scalars(state)
    return {
        "count": state.count,
        "sigma": state.sigma.tolist(),
        "gaps": gaps(state.sigma).tolist(),
        "g23": scalars["gram/g23"],
        "kstar": int(scalars["gram/kstar"]),
        "kstar_weighted": int(scalars["gram/kstar_weighted"]),
        "ratio": scalars["gram/ratio"],
    }
