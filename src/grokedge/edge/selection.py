"""Which parameters the spectral analysis watches, and how they map to one flat vector.

The flat vector θ_sel ∈ R^p concatenates the selected parameters, each flattened in
row-major order, in *sorted-name* order (docs/theory.md §1). Every other module of
``grokedge.edge`` and ``grokedge.experiments`` index p-sized vectors with this layout.

For the distributed Gram (docs/design.md, Scale) the flat vector is split into contiguous
slices ``[start, stop)``; :func:`slice_bounds` makes near-equal slices and
:func:`slice_segments` says which part of which parameter a slice covers, so a rank can
build its slice without materialising the whole p-vector.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from grokedge.checks import not_allowed

SELECT_KEY = "callbacks.gram.select"
"""Config key of the selector, named in error messages."""

ATTENTION = "attention"
ALL = "all"
ATTENTION_SUFFIXES = ("in_proj_weight", "out_proj.weight")
"""W_Q/W_K/W_V stacked, and the attention output projection (the paper's θ)."""

ALLOWED_DESCRIPTION = (
    f"'{ATTENTION}' (names ending in {' or '.join(ATTENTION_SUFFIXES)}), "
    f"'{ALL}', or a list of fnmatch patterns matched against parameter names"
)

ParamSource = Mapping[str, Tensor] | nn.Module


@dataclass(frozen=True)
class Segment:
    """The part of one parameter that falls in a slice of the flat vector.

    Elements ``[param_start, param_stop)`` of the flattened parameter ``name`` sit at
    ``[slice_offset, slice_offset + param_stop - param_start)`` of the slice.
    """

    name: str
    param_start: int
    param_stop: int
    slice_offset: int

    @property
    def numel(self) -> int:
        return self.param_stop - self.param_start


def slice_bounds(p: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous near-equal part ``[start, stop)`` of ``range(p)`` for ``rank``.

    The first ``p % world_size`` ranks get one element more; slices of consecutive ranks
    are adjacent and together cover ``range(p)`` exactly.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    base, extra = divmod(p, world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return start, stop


def slice_segments(
    names: Sequence[str], numels: Sequence[int], start: int, stop: int
) -> list[Segment]:
    """Segments of the parameters ``names`` (laid out in this order) inside ``[start, stop)``."""
    total = sum(numels)
    if not 0 <= start <= stop <= total:
        raise ValueError(f"slice [{start}, {stop}) is not inside [0, {total})")
    segments = []
    offset = 0
    for name, numel in zip(names, numels, strict=True):
        lo, hi = max(start, offset), min(stop, offset + numel)
        if lo < hi:
            segments.append(Segment(name, lo - offset, hi - offset, lo - start))
        offset += numel
    return segments


def _matches(name: str, select: str | Sequence[str]) -> bool:
    if select == ATTENTION:
        return any(name == s or name.endswith("." + s) for s in ATTENTION_SUFFIXES)
    if select == ALL:
        return True
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in select)


def check_select(select: object, key: str) -> str | tuple[str, ...]:
    """``select`` if it is ``"attention"``, ``"all"`` or a non-empty list of fnmatch
    patterns; else the error naming ``key``."""
    if isinstance(select, str):
        if select in (ATTENTION, ALL):
            return select
        allowed = f"{ALLOWED_DESCRIPTION} (wrap a single pattern in a list: [{select!r}])"
        raise not_allowed(key, select, allowed)
    if isinstance(select, Iterable):  # a list, or Hydra's ListConfig
        patterns = tuple(select)
        if patterns and all(isinstance(s, str) for s in patterns):
            return patterns
    raise not_allowed(key, select, ALLOWED_DESCRIPTION)


def _named_tensors(source: ParamSource) -> Mapping[str, Tensor]:
    if isinstance(source, nn.Module):
        return dict(source.named_parameters())
    return source


class ParameterSelector:
    """The selected parameters of a model and their flat layout.

    Args:
        named_parameters: ``(name, tensor)`` pairs, e.g. ``model.named_parameters()``.
        select: ``"attention"`` (default; the paper's θ: every ``in_proj_weight`` and
            ``out_proj.weight``), ``"all"``, or a list of fnmatch patterns.
        key: config key named in error messages.

    Raises:
        ValueError: ``select`` is malformed or matches no parameter.
    """

    def __init__(
        self,
        named_parameters: Iterable[tuple[str, Tensor]],
        select: str | Sequence[str] = ATTENTION,
        key: str = SELECT_KEY,
    ) -> None:
        self.select = check_select(select, key)
        available = dict(named_parameters)
        chosen = sorted(n for n in available if _matches(n, self.select))
        if not chosen:
            raise ValueError(
                f"{key}={select!r} matches no parameter; allowed: {ALLOWED_DESCRIPTION}; "
                f"the model has {len(available)} parameters, e.g. {sorted(available)[:5]}"
            )
        self.names: tuple[str, ...] = tuple(chosen)
        self.shapes: tuple[torch.Size, ...] = tuple(available[n].shape for n in chosen)
        self.numels: tuple[int, ...] = tuple(available[n].numel() for n in chosen)
        offsets, running = [], 0
        for numel in self.numels:
            offsets.append(running)
            running += numel
        self.offsets: tuple[int, ...] = tuple(offsets)
        self.p: int = running

    @classmethod
    def from_module(
        cls, module: nn.Module, select: str | Sequence[str] = ATTENTION, key: str = SELECT_KEY
    ) -> ParameterSelector:
        return cls(module.named_parameters(), select, key)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"ParameterSelector(select={self.select!r}, n={len(self.names)}, p={self.p})"

    def named(self, source: ParamSource) -> list[tuple[str, Tensor]]:
        """The selected ``(name, tensor)`` pairs of ``source``, in sorted-name order."""
        tensors = _named_tensors(source)
        return [(name, tensors[name]) for name in self.names]

    def slice_bounds(self, rank: int, world_size: int) -> tuple[int, int]:
        """``[start, stop)`` of the flat vector that ``rank`` of ``world_size`` handles."""
        return slice_bounds(self.p, rank, world_size)

    def segments(self, start: int = 0, stop: int | None = None) -> list[Segment]:
        """Which parameter elements lie in the slice ``[start, stop)`` of the flat vector."""
        return slice_segments(self.names, self.numels, start, self.p if stop is None else stop)

    def flatten(
        self,
        source: ParamSource,
        start: int = 0,
        stop: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """The flat vector (or its slice ``[start, stop)``), detached, on the params' device.

        Returns:
            Tensor [stop - start] (default [p]); a new tensor, never a view of a parameter.
        """
        tensors = _named_tensors(source)
        parts = [
            tensors[s.name].detach().reshape(-1)[s.param_start : s.param_stop]
            for s in self.segments(start, stop)
        ]
        if not parts:
            ref = tensors[self.names[0]]
            return torch.empty(0, dtype=dtype or ref.dtype, device=ref.device)
        flat = torch.cat(parts)
        return flat if dtype is None else flat.to(dtype)

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """Views of ``vec`` [p] shaped like the selected parameters, in sorted-name order."""
        if vec.shape != (self.p,):
            raise ValueError(f"expected a vector of shape [{self.p}], got {list(vec.shape)}")
        return {
            name: vec[off : off + numel].view(shape)
            for name, off, numel, shape in zip(
                self.names, self.offsets, self.numels, self.shapes, strict=True
            )
        }

    @torch.no_grad()
    def write_back(self, vec: Tensor, module: nn.Module) -> None:
        """Copy ``vec`` [p] into the module's selected parameters, in place."""
        tensors = dict(module.named_parameters())
        for name, value in self.unflatten(vec).items():
            tensors[name].copy_(value)

    def functional_params(self, vec: Tensor, source: ParamSource) -> dict[str, Tensor]:
        """All parameters of ``source`` with the selected ones replaced by views of ``vec``.

        For ``torch.func.functional_call(module, params, args)``: the live module is not
        touched. Unselected entries are the module's own tensors (not copies).
        """
        params = dict(_named_tensors(source))
        params.update(self.unflatten(vec))
        return params


def slice_views(
    named: Sequence[tuple[str, Tensor]], start: int, stop: int, buffers: Sequence[Tensor]
) -> tuple[list[Tensor], list[list[Tensor]]]:
    """This rank's part of each parameter and the matching views of flat slice buffers.

    Args:
        named: ``(name, parameter)`` pairs in sorted-name order (the flat layout).
        start, stop: this rank's slice ``[start, stop)`` of the flat vector (``[0, p)``:
            the whole, unsharded).
        buffers: flat [n] buffers laid out like the slice (e.g. θ at the last capture).
    Returns:
        (the parameters' detached parts, in layout order: flat [numel'] slices when
        sharded, the whole parameters otherwise; per buffer, its views of the same parts,
        shaped alike).
    """
    names = [name for name, _ in named]
    numels = [param.numel() for _, param in named]
    if (start, stop) != (0, sum(numels)):
        by_name = dict(named)
        segments = slice_segments(names, numels, start, stop)
        params = [
            by_name[s.name].detach().reshape(-1)[s.param_start : s.param_stop] for s in segments
        ]
        views = [
            [buf[s.slice_offset : s.slice_offset + s.numel] for s in segments] for buf in buffers
        ]
        return params, views
    params = [param.detach() for _, param in named]
    views: list[list[Tensor]] = [[] for _ in buffers]
    offset = 0
    for param in params:
        stop = offset + param.numel()
        for buf, out in zip(buffers, views, strict=True):
            out.append(buf[offset:stop].view(param.shape))
        offset = stop
    return params, views
