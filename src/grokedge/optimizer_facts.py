"""What the edge's split and the analyses read of an optimizer, in one place (pure torch).

- whether a parameter group's weight decay is *decoupled* (θ ← θ(1 − η ω) before the
  optimizer's own update: ``torch.optim.AdamW``, or a group with
  ``decoupled_weight_decay=True``), which is what makes the weight-decay part of a delta
  exact (docs/theory.md §1);
- a group's weight decay ω (0 when unset or None) and learning rate η;
- which optimizer, and which of its param groups, holds a parameter (by identity).

The group is read *live*: schedulers and callbacks (e.g. the weight-decay removal) change
η and ω during a run, so a value is read at the step it is used.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

ParamGroup = dict[str, Any]
"""One of ``optimizer.param_groups``: its ``params`` and hyperparameters (lr, weight_decay)."""


def is_decoupled(optimizer: Optimizer, group: ParamGroup) -> bool:
    """Whether ``group``'s weight decay is applied as θ ← θ(1 − η ω), apart from the
    gradient (AdamW, or ``decoupled_weight_decay=True``), rather than as an L2 term added
    to the gradient."""
    return isinstance(optimizer, torch.optim.AdamW) or bool(
        group.get("decoupled_weight_decay", False)
    )


def decay_of(group: ParamGroup) -> float:
    """ω of ``group`` (dimensionless, per unit learning rate); 0 when unset or None."""
    return float(group.get("weight_decay", 0.0) or 0.0)


def lr_of(group: ParamGroup) -> float:
    """η of ``group`` now (parameter units per gradient unit)."""
    return float(group["lr"])


def group_index(optimizer: Optimizer) -> dict[int, int]:
    """``{id(parameter): index of its param group}`` for every parameter ``optimizer`` holds."""
    return {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}


def inexact_groups(optimizer: Optimizer, indices: Iterable[int]) -> list[int]:
    """The groups among ``indices`` whose decay cannot be split exactly from the gradient
    part: ω != 0 and not decoupled."""
    groups = optimizer.param_groups
    return [
        i for i in indices if decay_of(groups[i]) != 0 and not is_decoupled(optimizer, groups[i])
    ]


def optimizer_holding(
    optimizers: Iterable[Optimizer], param: Tensor
) -> tuple[Optimizer, ParamGroup] | None:
    """The first of ``optimizers`` holding ``param`` (by identity) and its param group
    (lr, weight decay), or None when none holds it."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            if any(p is param for p in group["params"]):
                return optimizer, group
    return None


def optimizer_for(
    optimizers: Iterable[Optimizer], module: nn.Module, name: str
) -> tuple[Optimizer, ParamGroup] | None:
    """:func:`optimizer_holding` of ``module``'s parameter ``name``: how the callbacks
    (Gram, gap flow, decoupling) find their optimizer, by the first selected parameter."""
    return optimizer_holding(optimizers, dict(module.named_parameters())[name])
