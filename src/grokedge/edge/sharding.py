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

from grokedge.edge.geometry import partial_inner
from grokedge.edge.selection import slice_bounds
from grokedge.edge.spectrum import EdgeState, compute_edge
from grokedge.edge.window import UpdateWindow


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
