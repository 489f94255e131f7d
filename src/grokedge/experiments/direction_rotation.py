"""How far a direction turns from one Gram window to the next, whole or sharded."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor

from grokedge.edge.geometry import rotation_finish, rotation_partial
from grokedge.edge.sharding import Shard


def _sharded(shard: Shard | None) -> bool:
    return shard is not None and shard.sharded


class DirectionRotation:
    """The angle (degrees) between a direction (e.g. the edge's v_1 [p], or this rank's
    slice [n] of it under DDP) and its value at the previous window.

    ``previous`` is kept as this rank's slice; a whole vector restored from a checkpoint
    is cut down at its first use (no communication). Under sharding every rank calls
    :meth:`update` with the same ``valid`` (σ_1 is global), and an angle costs one
    all-reduce of a [2, 2] Gram (``reduce``); on one process nothing is communicated.

    Example:
        >>> import torch
        >>> turn = DirectionRotation()
        >>> turn.update(torch.tensor([1.0, 0.0]), True)
        nan
        >>> round(turn.update(torch.tensor([1.0, 1.0]) / 2**0.5, True), 6)
        45.0
    """

    def __init__(self) -> None:
        self.previous: Tensor | None = None

    def update(
        self,
        v: Tensor,
        valid: bool,
        shard: Shard | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> float:
        """The angle from the previous direction to ``v`` (NaN: none yet); keeps ``v``.
        ``valid`` False (σ_1 = 0: no direction) forgets the previous one."""
        if not valid:
            self.previous = None
            return math.nan
        rotation = math.nan
        prev = self.slice(shard)
        if prev is not None:
            gram = rotation_partial(prev.to(v.device, v.dtype), v)
            if _sharded(shard):
                assert reduce is not None
                gram = reduce(gram)
            rotation = float(rotation_finish(gram)[0])
        self.previous = v.detach().clone()
        return rotation

    def slice(self, shard: Shard | None) -> Tensor | None:
        """``previous`` as this rank's slice (cut from a whole vector once, if it is one)."""
        prev = self.previous
        if prev is not None and _sharded(shard) and prev.shape[-1] == shard.p:
            self.previous = prev = shard.take(prev).clone()
        return prev

    def whole(self, shard: Shard | None) -> Tensor | None:
        """``previous`` as a whole CPU vector, for checkpoints (all-gathered if sharded:
        collective, every rank must call it)."""
        prev = self.slice(shard)
        if prev is None:
            return None
        if _sharded(shard):
            prev = shard.gather(prev.detach().reshape(1, -1))[0]
        return prev.detach().cpu()
