"""The selected parameter vector split between processes (docs/design.md, Scale).

Under data parallelism every rank holds the whole (replicated) θ_sel ∈ R^p but keeps
only a contiguous slice ``[start, stop)`` of it in its update window (see
``selection.slice_bounds``). Everything p-sized is then sliced and every number that
needs the whole vector is a sum of per-slice parts:

- the W×W Grams: ``G = Σ_r X_r X_rᵀ`` (one all-reduce of the stacked matrices per delta);
- dot products and norms: ``a·b = Σ_r a_r·b_r`` (:meth:`Shard.inner`);
- the edge vectors stay sharded: rank r holds ``v_k[start:stop]`` (``edge.compute_edge``
  with the summed matrices and the rank's slice of the deltas);
- only where a model evaluation needs the whole perturbed parameter vector are slices
  all-gathered (:meth:`Shard.gather`).

The communication goes through a small :class:`Collective` protocol so that this module
knows nothing of Lightning: :class:`LocalCollective` (one process: no communication at
all, so single-process numbers are untouched), :class:`TorchDistributedCollective`
(``torch.distributed``'s default group, gloo or NCCL), or any test double.

Every rank must call the same collectives in the same order: every function here that
communicates is called by all ranks, never by rank 0 alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from grokedge.batch import Batch
from grokedge.spectral.ablation import (
    DEFAULT_N_RANDOM,
    ablation_result,
    draw_generator,
    float64_norm,
    measure_scaled,
    norm_equal_factor,
    random_displacement,
    random_orthonormal_subspace,
    remove_subspace,
    shrink_factor,
    shrink_toward_zero,
    subspace_coefficients,
)
from grokedge.spectral.edge import EdgeState, compute_edge
from grokedge.spectral.geometry import partial_inner
from grokedge.spectral.perturbation import FlatEvaluate
from grokedge.spectral.selection import slice_bounds
from grokedge.spectral.window import UpdateWindow

RANDOM_CHUNK = 1 << 14
"""Gaussians drawn per call when replaying a random stream up to a slice. torch's CPU
normal sampler draws a tensor of n >= 16 values as n uniforms transformed in blocks of 16
(the last 16 redrawn when 16 does not divide n): chunks that are multiples of 16, with
a last chunk of at least 16, reproduce one large draw bit for bit (see
:func:`draw_plan`; ``tests/test_spectral_sharding.py`` checks it against the one-shot
draw)."""


@runtime_checkable
class Collective(Protocol):
    """The communication a sharded analysis needs; all ranks call each method together.

    Attributes:
        rank: this process's index in [0, world_size).
        world_size: number of processes sharing the vector.
    """

    rank: int
    world_size: int

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """The element-wise sum of ``tensor`` over all ranks (same shape on every rank);
        may work in place and return ``tensor`` itself."""
        ...

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor`` (rank order). Shapes may differ in their last dimension
        only (slices of near-equal length)."""
        ...


class LocalCollective:
    """One process: sums and gathers are the identity, no communication."""

    rank = 0
    world_size = 1

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return tensor

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        return [tensor]


class TorchDistributedCollective:
    """``torch.distributed`` on the default process group (initialised by the launcher).

    Tensors are communicated on their own device; with the gloo backend use CPU tensors or
    CUDA tensors gloo supports, with NCCL CUDA tensors. Uneven last dimensions (slices
    differing by one element) are padded to the longest before ``all_gather`` and trimmed.
    """

    def __init__(self) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised")
        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM)
        return tensor

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        # Lengths first (a tiny collective), then one padded gather of the data.
        n = torch.tensor([tensor.shape[-1]], dtype=torch.long, device=tensor.device)
        lengths = [torch.zeros_like(n) for _ in range(self.world_size)]
        self._dist.all_gather(lengths, n)
        sizes = [int(x) for x in lengths]
        longest = max(sizes)
        padded = tensor.new_zeros((*tensor.shape[:-1], longest))
        padded[..., : tensor.shape[-1]] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._dist.all_gather(parts, padded.contiguous())
        return [part[..., :size] for part, size in zip(parts, sizes, strict=True)]


def default_collective() -> Collective:
    """:class:`TorchDistributedCollective` when ``torch.distributed`` is initialised with
    more than one process, else :class:`LocalCollective`."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchDistributedCollective()
    return LocalCollective()


@dataclass(frozen=True)
class Shard:
    """This rank's slice ``[start, stop)`` of a p-vector and the collective of its group.

    With ``world_size == 1`` (a :class:`LocalCollective`) the slice is the whole vector and
    every method returns its input without communication: single-process numbers are the
    unsharded ones bit for bit.
    """

    p: int
    start: int
    stop: int
    collective: Collective

    @classmethod
    def of(cls, p: int, collective: Collective | None = None) -> Shard:
        """The near-equal contiguous slice of ``range(p)`` for the collective's rank."""
        coll = LocalCollective() if collective is None else collective
        start, stop = slice_bounds(p, coll.rank, coll.world_size)
        return cls(p, start, stop, coll)

    @property
    def rank(self) -> int:
        return self.collective.rank

    @property
    def world_size(self) -> int:
        return self.collective.world_size

    @property
    def sharded(self) -> bool:
        return self.collective.world_size > 1

    @property
    def n(self) -> int:
        """Elements of this rank's slice."""
        return self.stop - self.start

    def bounds(self, rank: int) -> tuple[int, int]:
        return slice_bounds(self.p, rank, self.world_size)

    def sum(self, tensor: Tensor) -> Tensor:
        """Σ over ranks of ``tensor`` (identity on one rank). Collective."""
        return self.collective.all_reduce_sum(tensor) if self.sharded else tensor

    def inner(self, a: Tensor, b: Tensor) -> Tensor:
        """[m, n] float64 dot products of the whole vectors whose slices are the rows of
        ``a`` [m, n_local] (or [n_local]) and ``b``. Collective."""
        return self.sum(partial_inner(a, b))

    def norm(self, a: Tensor) -> float:
        """‖a‖ of the whole vector whose slice is ``a`` [n_local]. Collective."""
        return float(self.inner(a, a)[0, 0].clamp_min(0.0).sqrt())

    def take(self, full: Tensor) -> Tensor:
        """This rank's slice of whole vectors ``full`` [..., p] (a view)."""
        if full.shape[-1] != self.p:
            raise ValueError(f"expected [..., {self.p}], got {list(full.shape)}")
        return full[..., self.start : self.stop]

    def gather(self, part: Tensor) -> Tensor:
        """The whole vectors [..., p] from every rank's slice ``part`` [..., n_local].

        Collective. Used only where a model evaluation needs the full parameter vector
        (ablated or perturbed θ, curvature directions); everything else sums partial
        dot products instead.
        """
        if part.shape[-1] != self.n:
            raise ValueError(f"expected [..., {self.n}], got {list(part.shape)}")
        if not self.sharded:
            return part
        return torch.cat(self.collective.all_gather(part.contiguous()), dim=-1)


# ------------------------------------------------------------------------ the edge


def reduced_window_matrices(
    window: UpdateWindow, shard: Shard
) -> tuple[Tensor, Tensor, Tensor, float | None]:
    """The window's G, C, X_wd X_wdᵀ summed over ranks, and δ_evicted · δ_newest.

    One all-reduce of a single packed float64 vector [3·W'² (+1)] (every rank has the same
    W' and eviction state: they push the same deltas' slices in the same order).

    Returns:
        (gram, cross_gram, wd_gram) [W', W'] float64 CPU, chronological, and the summed
        evicted dot (``None`` when the latest push evicted nothing).
    """
    mats = window.matrices()  # G, C, X_wd X_wdᵀ: one read-out
    n = mats.shape[1]
    evicted = window.last_evicted_dot
    parts = [mats.reshape(-1)]
    if evicted is not None:
        parts.append(evicted.detach().to("cpu", torch.float64).reshape(1))
    packed = torch.cat(parts)
    if shard.sharded:
        device = window.device if _needs_device(shard) else torch.device("cpu")
        packed = shard.sum(packed.to(device)).to("cpu")
    g, c, w = (packed[i * n * n : (i + 1) * n * n].reshape(n, n) for i in range(3))
    return g, c, w, (None if evicted is None else float(packed[-1]))


def _needs_device(shard: Shard) -> bool:
    # NCCL communicates CUDA tensors only; gloo and test doubles take CPU tensors.
    coll = shard.collective
    if isinstance(coll, TorchDistributedCollective):
        return coll._dist.get_backend() == "nccl"
    return False


def sharded_edge(
    window: UpdateWindow, shard: Shard, top_k: int, step: int, out: Tensor | None = None
) -> tuple[EdgeState, float | None]:
    """The edge of a window that holds this rank's slice of every delta.

    Sums the W×W matrices over ranks (one all-reduce), eigendecomposes them (identically
    on every rank) and materialises this rank's slice of v_1..v_k, [top_k, n_local].
    On one rank it is ``edge.edge_from_window`` exactly.

    Returns:
        (the ``EdgeState`` — its matrices and σ global, its ``vectors`` sliced —, the
        summed δ_evicted · δ_newest or ``None``).
    """
    g, c, w, evicted = reduced_window_matrices(window, shard)
    return compute_edge(g, c, w, window, top_k, step, out), evicted


def to_comm_device(shard: Shard, tensor: Tensor) -> Tensor:
    """``tensor`` on the device the shard's collective communicates on (the CPU, except
    under NCCL, where it stays on its CUDA device)."""
    return tensor if _needs_device(shard) else tensor.to("cpu")


# ------------------------------------------------------------- checkpoint states


def gather_whole(shard: Shard, part: Tensor) -> Tensor:
    """Whole vectors [..., p] on the CPU from this rank's slices [..., n]. Collective."""
    return shard.gather(to_comm_device(shard, part.detach())).to("cpu")


def partial_matrices(deltas: Tensor) -> Tensor:
    """[3, W, W] float64 (G, C, X_wd X_wdᵀ in ring order) of a window slice's buffer
    [2, W, n] — what its incremental pushes would have accumulated, up to summation order."""
    total, wd = deltas[0].to(torch.float64), deltas[1].to(torch.float64)
    return torch.stack([total @ total.T, wd @ total.T, wd @ wd.T])


def gather_window_state(window: UpdateWindow, shard: Shard) -> tuple[dict[str, Any], Tensor]:
    """A sliced window's state as one process would hold it, and each rank's own part.

    Collective (every rank calls it for the same windows in the same order).

    Returns:
        (``UpdateWindow.state_dict`` with the whole deltas [2, W, p] gathered to the CPU
        and the matrices [3, W, W] summed over ranks, so that it resumes on any number of
        ranks; the per-rank partial matrices [world_size, 3, W, W], restored bit for bit
        on the same number of ranks by :func:`slice_window_state`).
    """
    state = dict(window.state_dict())
    partial = state["matrices"]
    deltas = gather_whole(shard, state["deltas"])
    flat = to_comm_device(shard, partial.detach().reshape(-1))
    per_rank = torch.stack(shard.collective.all_gather(flat)).to("cpu")
    state.update(p=shard.p, deltas=deltas, matrices=per_rank.sum(0).reshape(partial.shape))
    return state, per_rank.reshape(shard.world_size, *partial.shape)


def slice_window_state(
    state: dict[str, Any], shard: Shard, rank_matrices: Tensor | None = None
) -> dict[str, Any]:
    """A whole-vector window state (:func:`gather_window_state`, or one process's) cut to
    this rank's slice. ``rank_matrices``: the writer's per-rank partial matrices when it
    ran on as many ranks as this one (restored bit for bit); ``None``: this slice's
    partial matrices recomputed from its deltas (:func:`partial_matrices`)."""
    out = dict(state)
    deltas = shard.take(out["deltas"]).contiguous()
    matrices = partial_matrices(deltas) if rank_matrices is None else rank_matrices[shard.rank]
    out.update(p=shard.n, deltas=deltas, matrices=matrices)
    return out


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
    """This rank's slice [k, n_local] of ``ablation.random_orthonormal_subspace(k, p, ...)``.

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
    """This rank's slice [n_local] of ``ablation.random_displacement(norm, p, seed, index)``:
    the single-process Gaussian's rows, scaled by the whole vector's norm (summed over
    ranks: one all-reduce). Collective; on one rank it calls the unsharded function."""
    if not shard.sharded:
        return random_displacement(norm, shard.p, seed, index, device, dtype)
    if norm < 0:
        raise ValueError(f"norm must be >= 0, got {norm}")
    gauss = gaussian_rows(shard.p, 1, shard.start, shard.stop, seed, index, torch.float64)[:, 0]
    sq = shard.sum(to_comm_device(shard, gauss.pow(2).sum().reshape(1))).to("cpu")
    return (gauss * (norm / float(sq[0].sqrt()))).to(device=device, dtype=dtype)


# -------------------------------------------------------------------------- ablation


def sharded_ablation_experiment(
    evaluate: FlatEvaluate,
    theta: Tensor,
    basis: Tensor,
    batch: Batch,
    shard: Shard,
    n_random: int = DEFAULT_N_RANDOM,
    seed: int = 0,
) -> dict[str, Any]:
    """``ablation.ablation_experiment`` on this rank's slices (collective).

    Projections and norms are partial dot products summed over ranks: the edge
    coefficients θ·v_k, the random subspaces' Gram (Cholesky-QR), the norm-matched
    displacements' norms, ‖θ − θ'‖, ‖θ‖ and ‖θ_edge‖ (the two shrink factors), and each
    shrink's ‖θ·c‖ and ‖θ − θ·c‖. The model, however, is evaluated on whole parameter
    vectors, so each ablated, shrunk or displaced θ is all-gathered from its slices (one
    p-vector per evaluation: 4 + 2·``n_random`` gathers). The random draws are those of the
    single-process experiment (:func:`gaussian_rows`), so results agree with a 1-process
    run to float round-off. It is also the single-process experiment: with a
    :class:`LocalCollective` shard every gather and sum is the identity, the norms are
    ``ablation.float64_norm`` and the draws the unsharded ones, so
    ``ablation.ablation_experiment`` (which calls this with ``Shard.of(p)``) keeps its
    numbers bit for bit.

    Args:
        evaluate: ``(whole θ_sel [p], batch) -> (loss, acc, logits)``.
        theta: [n_local] this rank's slice of θ_sel.
        basis: [k, n_local] this rank's slice of orthonormal edge rows.
    Returns:
        the dict of ``ablation_experiment`` (identical keys and units).
    """
    if basis.ndim != 2 or basis.shape[1] != theta.shape[0]:
        raise ValueError(f"basis must be [k, {theta.shape[0]}], got {list(basis.shape)}")
    with torch.no_grad():
        # One process keeps the plain float64 norm (a partial inner product's square root
        # can differ from it in the last bit).
        norm = shard.norm if shard.sharded else float64_norm
        base_loss, base_acc = _scalars2(evaluate(shard.gather(theta), batch))
        edge_slice = sharded_remove_subspace(theta, basis, shard)
        edge_loss, edge_acc = _scalars2(evaluate(shard.gather(edge_slice), batch))
        displacement = norm((theta - edge_slice).to(torch.float64))
        theta_norm = norm(theta.to(torch.float64))
        edge_norm = norm(edge_slice.to(torch.float64))

        def evaluate_at(part: Tensor) -> tuple[float, float]:
            return _scalars2(evaluate(shard.gather(part), batch))

        # The factors come from the whole vector's norms, so every rank scales its slice
        # by the same c and the slices make up the single-process shrinks.
        factor, clamped = shrink_factor(displacement, theta_norm)
        shrink = measure_scaled(theta, factor, evaluate_at, norm, clamped=clamped)
        shrink_norm = measure_scaled(
            theta, norm_equal_factor(edge_norm, theta_norm), evaluate_at, norm
        )
        k = basis.shape[0]
        random_d: list[tuple[float, float]] = []
        for index in range(n_random):
            sub = random_orthonormal_slice(k, shard, seed, index, theta.device, theta.dtype)
            moved = sharded_remove_subspace(theta, sub, shard)
            loss, acc = _scalars2(evaluate(shard.gather(moved), batch))
            random_d.append((loss - base_loss, acc - base_acc))
        matched_d: list[tuple[float, float]] = []
        for index in range(n_random):
            delta = random_displacement_slice(
                displacement, shard, seed + 1, index, theta.device, theta.dtype
            )
            loss, acc = _scalars2(evaluate(shard.gather(theta + delta), batch))
            matched_d.append((loss - base_loss, acc - base_acc))
    return ablation_result(
        base_loss,
        base_acc,
        edge_loss,
        edge_acc,
        displacement,
        random_d,
        matched_d,
        theta_norm=theta_norm,
        edge_norm=edge_norm,
        shrink=shrink,
        shrink_norm=shrink_norm,
    )


def sharded_shrink_toward_zero(theta: Tensor, distance: float, shard: Shard) -> Tensor:
    """This rank's slice of θ·max(0, 1 − d/‖θ‖) (collective: ‖θ‖² is summed over ranks).
    ``theta`` [n_local], ``distance`` d in parameter units; on one rank
    ``ablation.shrink_toward_zero`` itself."""
    if not shard.sharded:
        return shrink_toward_zero(theta, distance)
    return shrink_toward_zero(theta, distance, theta_norm=shard.norm(theta.to(torch.float64)))


def sharded_remove_subspace(theta: Tensor, basis: Tensor, shard: Shard) -> Tensor:
    """This rank's slice of θ − Σ_k (θ·v_k) v_k for orthonormal rows v_k (collective: the
    coefficients θ·v_k are summed over ranks). ``theta`` [n_local], ``basis`` [k, n_local];
    on one rank ``ablation.remove_subspace`` itself."""
    if not shard.sharded:
        return remove_subspace(theta, basis)
    coefficients = shard.sum(to_comm_device(shard, subspace_coefficients(theta, basis)))
    return remove_subspace(theta, basis, coefficients=coefficients.to(theta.device))


def _scalars2(result: tuple[Any, Any, Tensor]) -> tuple[float, float]:
    loss, acc, _ = result
    return float(loss), float(acc)
