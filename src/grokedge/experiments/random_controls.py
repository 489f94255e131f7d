"""The ablation's random controls: orthonormal subspaces and displacements, drawn reproducibly.

Random draws are made on the CPU from a seed derived from ``(seed, index)``, so draw
``index`` is the same on every device, for every ``n``, and can be produced one at a time
(n·k·p memory is never needed at once). Sharded, each rank draws its slice of the very same
Gaussians (:func:`gaussian_rows`), so the controls of a sharded run are those of a
1-process run.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from grokedge.edge.sharding import Shard, to_comm_device

RANDOM_CHUNK = 1 << 14
"""Gaussians drawn per call when replaying a random stream up to a slice. torch's CPU
normal sampler draws a tensor of n >= 16 values as n uniforms transformed in blocks of 16
(the last 16 redrawn when 16 does not divide n): chunks that are multiples of 16, with
a last chunk of at least 16, reproduce one large draw bit for bit (see
:func:`draw_plan`; ``tests/test_spectral_sharding.py`` checks it against the one-shot
draw)."""


# ---------------------------------------------------------------------------- random draws


def draw_generator(seed: int, index: int) -> torch.Generator:
    """CPU generator of random draw ``index`` of the stream ``seed``.

    ``SeedSequence`` mixes ``(seed, index)`` into independent streams, so draws do not
    depend on how many were made before (chunk-wise generation, resumption).
    """
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def random_orthonormal_subspace(
    k: int,
    p: int,
    seed: int,
    index: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Random subspace number ``index``: [k, p] orthonormal rows.

    QR of a k×p standard Gaussian (float64, CPU): uniformly distributed on the
    Grassmannian. The signs are fixed so that R has a positive diagonal, which makes the
    rows the Gram–Schmidt orthonormalisation of the Gaussian rows: a function of the
    draw alone, not of the QR routine.
    """
    if not 0 < k <= p:
        raise ValueError(f"need 0 < k <= p, got k={k}, p={p}")
    gauss = torch.randn(p, k, generator=draw_generator(seed, index), dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    q = q * torch.sign(r.diagonal())
    return q.T.contiguous().to(device=device, dtype=dtype)


def iter_random_orthonormal_subspaces(
    n: int,
    k: int,
    p: int,
    seed: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Iterator[Tensor]:
    """Yields the n subspaces [k, p] of :func:`random_orthonormal_subspaces` one at a time."""
    for index in range(n):
        yield random_orthonormal_subspace(k, p, seed, index, device, dtype)


def random_orthonormal_subspaces(
    n: int,
    k: int,
    p: int,
    seed: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """[n, k, p]: n random k-dimensional orthonormal subspaces of R^p (the paper's control).

    Needs n·k·p memory; :func:`iter_random_orthonormal_subspaces` yields the same
    subspaces one at a time.
    """
    return torch.stack(list(iter_random_orthonormal_subspaces(n, k, p, seed, device, dtype)))


def random_displacement(
    norm: float,
    p: int,
    seed: int,
    index: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Draw ``index``: [p] a uniformly random direction of R^p scaled to length ``norm``."""
    if norm < 0:
        raise ValueError(f"norm must be >= 0, got {norm}")
    gauss = torch.randn(p, generator=draw_generator(seed, index), dtype=torch.float64)
    return (gauss * (norm / torch.linalg.vector_norm(gauss))).to(device=device, dtype=dtype)


def iter_norm_matched_displacements(
    n: int,
    displacement_norm: float,
    p: int,
    seed: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Iterator[Tensor]:
    """Yields the n displacements [p] of :func:`norm_matched_displacements` one at a time."""
    for index in range(n):
        yield random_displacement(displacement_norm, p, seed, index, device, dtype)


def norm_matched_displacements(
    n: int,
    displacement_norm: float,
    p: int,
    seed: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """[n, p]: random displacements Δθ with ‖Δθ‖ = ``displacement_norm`` (parameter units).

    The control the paper lacks (docs/theory.md §5): pass the edge removal's displacement
    ‖θ − θ'‖ and evaluate θ + Δθ. Norms are exact in float64 (relative error ~1e-16; a
    float32 result carries its own rounding, ~1e-7).
    """
    return torch.stack(
        list(iter_norm_matched_displacements(n, displacement_norm, p, seed, device, dtype))
    )


# ---------------------------------------------------------------------- random draws


def draw_plan(total: int, chunk: int = RANDOM_CHUNK) -> list[int]:
    """Sizes of the successive ``torch.randn`` calls that reproduce one draw of ``total``
    values: ``chunk``-sized calls (a multiple of 16) and a last call of at least 16 values
    (a remainder under 16 joins the call before it); one call when ``total`` <= chunk."""
    if chunk % 16:
        raise ValueError(f"chunk must be a multiple of 16, got {chunk}")
    if total <= chunk:
        return [total] if total else []
    full, rest = divmod(total, chunk)
    sizes = [chunk] * full
    if rest >= 16:
        sizes.append(rest)
    elif rest:
        sizes[-1] += rest
    return sizes


def gaussian_rows(
    p: int, k: int, start: int, stop: int, seed: int, index: int, dtype: torch.dtype
) -> Tensor:
    """Rows ``[start, stop)`` of ``torch.randn(p, k, generator=draw_generator(seed, index))``.

    Replays the draw's stream in chunks up to ``stop`` and keeps the slice, so that every
    rank's slice is bit-identical to the same rows of the single-process draw (the random
    controls of a sharded run are those of a 1-process run). Costs O(stop·k) generator
    work but only O(RANDOM_CHUNK + (stop − start)·k) memory.

    Returns:
        [stop - start, k] in ``dtype`` on the CPU.
    """
    if not 0 <= start <= stop <= p:
        raise ValueError(f"slice [{start}, {stop}) is not inside [0, {p})")
    generator = draw_generator(seed, index)
    out = torch.empty((stop - start) * k, dtype=dtype)
    lo, hi = start * k, stop * k
    pos = 0
    for n in draw_plan(p * k):
        if pos >= hi:
            break  # the rest of the stream lies beyond this slice
        chunk = torch.randn(n, generator=generator, dtype=dtype)
        a, b = max(pos, lo), min(pos + n, hi)
        if a < b:
            out[a - lo : b - lo] = chunk[a - pos : b - pos]
        pos += n
    return out.view(stop - start, k)


def random_orthonormal_slice(
    k: int,
    shard: Shard,
    seed: int,
    index: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """This rank's slice [k, n_local] of ``random_orthonormal_subspace(k, p, ...)``.

    The Gaussian rows are the single-process ones (:func:`gaussian_rows`); their
    Gram–Schmidt orthonormalisation is done as Cholesky-QR: the k×k Gram XᵀX is summed
    over ranks (one all-reduce), R = chol(XᵀX)ᵀ has a positive diagonal like the
    single-process QR with fixed signs, and Q = X R⁻¹. The same subspace up to float64
    round-off (~1e-15). Collective; on one rank it calls the unsharded function.
    """
    if not shard.sharded:
        return random_orthonormal_subspace(k, shard.p, seed, index, device, dtype)
    if not 0 < k <= shard.p:
        raise ValueError(f"need 0 < k <= p, got k={k}, p={shard.p}")
    gauss = gaussian_rows(shard.p, k, shard.start, shard.stop, seed, index, torch.float64)
    gram = shard.sum(to_comm_device(shard, gauss.T @ gauss).to(torch.float64)).to("cpu")
    chol = torch.linalg.cholesky(gram)  # gram = L Lᵀ, R = Lᵀ
    q = torch.linalg.solve_triangular(chol, gauss.T, upper=False)  # Lᵀ⁻¹ applied: Qᵀ = L⁻¹ Xᵀ
    return q.contiguous().to(device=device, dtype=dtype)


def random_displacement_slice(
    norm: float,
    shard: Shard,
    seed: int,
    index: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """This rank's slice [n_local] of ``random_displacement(norm, p, seed, index)``:
    the single-process Gaussian's rows, scaled by the whole vector's norm (summed over
    ranks: one all-reduce). Collective; on one rank it calls the unsharded function."""
    if not shard.sharded:
        return random_displacement(norm, shard.p, seed, index, device, dtype)
    if norm < 0:
        raise ValueError(f"norm must be >= 0, got {norm}")
    gauss = gaussian_rows(shard.p, 1, shard.start, shard.stop, seed, index, torch.float64)[:, 0]
    sq = shard.sum(to_comm_device(shard, gauss.pow(2).sum().reshape(1))).to("cpu")
    return (gauss * (norm / float(sq[0].sqrt()))).to(device=device, dtype=dtype)
