"""Exact per-step weight-decay displacement of a decoupled-decay optimizer.

With decoupled weight decay (``torch.optim.AdamW``, or ``Adam(decoupled_weight_decay=True)``)
a step is θ ← θ(1 − η_t ω_g) followed by the optimizer's own update, so the step's
weight-decay displacement is exactly −η_t ω_g θ_t, with η_t and ω_g read from the
parameter's group *at that step* (schedulers, groups with different or zero ω). Summed
over an interval it is δ_wd, and δ_grad = δ − δ_wd is everything else (preconditioning,
momentum, clipping), with no approximation (docs/theory.md §1; compare ``trapezoid_wd``).

With L2-style decay (``Adam``/``SGD`` with ``weight_decay > 0``) ωθ is added to the
gradient and then mixed into the optimizer's state: no exact split exists.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from grokedge.edge.selection import Segment, slice_segments
from grokedge.optimizer_facts import decay_of, group_index, inexact_groups


@dataclass
class _Entry:
    """One selected parameter's part in this tracker's slice."""

    param: Tensor
    segment: Segment
    view: Tensor  # [numel] view of the accumulator


class DecoupledWeightDecayTracker:
    """Accumulates −η_t ω_g θ_t over optimizer steps, flat, in sorted-name order.

    Args:
        optimizer: any ``torch.optim.Optimizer`` holding every selected parameter.
        named_params: the selected ``(name, parameter)`` pairs (e.g.
            ``ParameterSelector.named(model)``); laid out by sorted name, like the selector.
        allow_inexact: for a group whose decay is not decoupled but ω > 0, record zeros and
            warn once instead of raising.
        switch: how the refusal's message names that switch (None: no hint; a caller with
            its own argument for it names it itself).
        start, stop: slice ``[start, stop)`` of the flat vector to accumulate (docs/design.md,
            Scale); default the whole p.
        dtype: accumulator dtype (default: the parameters' dtype promoted to >= float32).

    Use either ``record_step()`` right before each ``optimizer.step()`` (after backward),
    or ``register()`` once. The accumulator lives on the parameters' device; a record is
    one fused ``_foreach_add_`` per param group, without host synchronisation.

    Create it after the model has reached its device (the accumulator is allocated there).

    Raises:
        ValueError: a selected trainable parameter is in no param group, or (unless
            ``allow_inexact``) its group has non-decoupled weight decay ω > 0.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        named_params: Iterable[tuple[str, Tensor]],
        *,
        allow_inexact: bool = False,
        switch: str | None = "allow_inexact=True",
        start: int = 0,
        stop: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        pairs = sorted(named_params, key=lambda item: item[0])
        if not pairs:
            raise ValueError("no parameters to track")
        self.names = tuple(name for name, _ in pairs)
        self._params = [param for _, param in pairs]
        numels = [param.numel() for param in self._params]
        self.p_total = sum(numels)
        stop = self.p_total if stop is None else stop
        self.start, self.stop = start, stop
        segments = slice_segments(self.names, numels, start, stop)
        if dtype is None:
            # Sums over many steps: never accumulate below float32, even for bf16 weights.
            dtype = torch.float32
            for param in self._params:
                dtype = torch.promote_types(dtype, param.dtype)
        self._buf = torch.zeros(stop - start, dtype=dtype, device=self._params[0].device)
        by_name = dict(pairs)
        self._entries = [
            _Entry(
                by_name[s.name],
                s,
                self._buf[s.slice_offset : s.slice_offset + s.numel],
            )
            for s in segments
        ]
        self.allow_inexact = allow_inexact
        self.switch = switch
        self._warned = False
        self.steps = 0  # records since the last take()
        self.bind(optimizer)

    # ------------------------------------------------------------------ optimizer binding

    def bind(self, optimizer: Optimizer) -> None:
        """(Re)attach to ``optimizer`` (e.g. a fresh one) and validate its groups."""
        group_of = group_index(optimizer)
        # A frozen parameter outside the optimizer never moves: its WD part is zero.
        missing = [
            name
            for name, param in zip(self.names, self._params, strict=True)
            if id(param) not in group_of and param.requires_grad
        ]
        if missing:
            raise ValueError(f"selected parameters not held by the optimizer: {missing}")
        self.optimizer = optimizer
        self._by_group: dict[int, list[_Entry]] = {}
        for entry in self._entries:
            if id(entry.param) in group_of:
                self._by_group.setdefault(group_of[id(entry.param)], []).append(entry)
        self._check_exact()

    def _inexact_groups(self) -> list[int]:
        return inexact_groups(self.optimizer, self._by_group)

    def _check_exact(self) -> None:
        inexact = self._inexact_groups()
        if not inexact:
            return
        decays = sorted({decay_of(self.optimizer.param_groups[i]) for i in inexact})
        message = (
            f"{type(self.optimizer).__name__} applies weight_decay={decays} as an L2 term "
            "added to the gradient (not decoupled), so its weight-decay displacement cannot "
            "be split exactly from the gradient part; allowed: a decoupled optimizer "
            "(torch.optim.AdamW, or Adam(decoupled_weight_decay=True)) or weight_decay=0"
        )
        if not self.allow_inexact:
            # A caller with its own name for the switch (GramCallback: allow_inexact_split)
            # passes switch=None and names it itself: one name per switch in a message.
            hint = f"; pass {self.switch} to record zeros instead" if self.switch else ""
            raise ValueError(message + hint)
        if not self._warned:
            warnings.warn(message + "; recording zeros for those groups", stacklevel=3)
            self._warned = True

    # ------------------------------------------------------------------------ recording

    @torch.no_grad()
    def record_step(self) -> None:
        """Add this step's −η ω θ for every selected parameter the optimizer will decay.

        Call after backward, immediately before ``optimizer.step()``. Parameters without
        a gradient are skipped, as the optimizer skips them.
        """
        groups = self.optimizer.param_groups
        inexact = set(self._inexact_groups())
        if inexact:
            self._check_exact()  # ω may have been raised since construction
        for index, entries in self._by_group.items():
            group = groups[index]
            decay = decay_of(group)
            if decay == 0 or index in inexact:
                continue
            chosen = [e for e in entries if e.param.grad is not None]
            if chosen:
                self._add(chosen, -(group["lr"] * decay))
        self.steps += 1

    def _add(self, entries: list[_Entry], alpha: float | Tensor) -> None:
        views = [e.view for e in entries]
        sources = [
            e.param.detach().reshape(-1)[e.segment.param_start : e.segment.param_stop]
            for e in entries
        ]
        if isinstance(alpha, Tensor):
            torch._foreach_add_(views, torch._foreach_mul(sources, alpha))
        elif all(s.dtype == self._buf.dtype for s in sources):
            torch._foreach_add_(views, sources, alpha=alpha)
        else:
            for view, source in zip(views, sources, strict=True):
                view.add_(source, alpha=alpha)

    def _pre_step(
        self, optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Step pre-hook: record now, or right after the closure if ``step`` was given one.

        Under a closure (Lightning's automatic optimisation) the gradients do not exist
        yet when the hook runs; the closure computes them without moving θ, so recording
        right after it sees exactly the θ_t, η_t, ω_g and gradients the update will use.
        """
        # torch passes step()'s own arguments, self included, as args.
        at = 1 if args and args[0] is optimizer else 0
        closure = kwargs.get("closure", args[at] if len(args) > at else None)
        if closure is None:
            self.record_step()
            return None
        recorded = False

        def recording_closure() -> Any:
            nonlocal recorded
            loss = closure()
            if not recorded:  # an optimizer may re-evaluate the closure (line searches)
                self.record_step()
                recorded = True
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": recording_closure}
        return (*args[:at], recording_closure, *args[at + 1 :]), kwargs

    def register(self, optimizer: Optimizer | None = None) -> RemovableHandle:
        """Record automatically at every ``optimizer.step()``; returns the hook's handle.

        Steps skipped by a ``GradScaler`` never call ``step()`` and are not recorded.
        ``handle.remove()`` stops recording. Passing another optimizer rebinds to it.
        """
        if optimizer is not None and optimizer is not self.optimizer:
            self.bind(optimizer)
        return self.optimizer.register_step_pre_hook(self._pre_step)

    # ------------------------------------------------------------------------- read-out

    @property
    def accumulated(self) -> Tensor:
        """The running sum [stop - start] (a live view; see ``take``)."""
        return self._buf

    def take(self) -> Tensor:
        """The WD displacement [stop - start] accumulated since the last take; resets."""
        out = self._buf.clone()
        self._buf.zero_()
        self.steps = 0
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "accumulated": self._buf,
            "steps": self.steps,
            "warned": self._warned,
            "start": self.start,
            "stop": self.stop,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["start"], state["stop"]) != (self.start, self.stop):
            raise ValueError(
                f"tracker state covers [{state['start']}, {state['stop']}); "
                f"this tracker covers [{self.start}, {self.stop})"
            )
        self._buf.copy_(state["accumulated"])
        self.steps = int(state["steps"])
        self._warned = bool(state["warned"])
