"""EdgeDecouplingCallback: keep ω fixed and cut the gradient out of the edge direction.

The experiment the paper lacks (docs/theory.md §5): its causal claim rests on changing ω,
which changes the weight-decay part of *every* direction at once. This callback leaves ω
alone and intervenes on the gradient part of the update along the current edge v_1
only, at every optimizer step after a trigger.

What exactly is modified. AdamW's step is θ_{t+1} = θ_t(1 − η_t ω) + a_t, where a_t is
the Adam update (moments, bias correction, clipping included) and −η_t ω θ_t the
weight-decay part. An optimizer step pre-hook copies the selected parameters θ_t (flat,
the GramCallback's layout); a step post-hook recovers a_t = θ_{t+1} − θ_t(1 − η_t ω)
exactly (same factor, same float32 product as AdamW; parameters without a gradient are
not decayed and give a_t = θ_{t+1} − θ_t), computes its component along the newest edge
vector v_1 (unit, over the selected parameters), c = a_t·v_1, and the weight-decay part's
w = −η_t ω θ_t·v_1, and adds a multiple of v_1 to the selected parameters:

- ``remove``:  θ_{t+1} −= c v_1: the applied gradient part has no v_1 component;
- ``enforce``: when c and w have opposite signs, θ_{t+1} −= c v_1 (the projection of
  the gradient part onto the half-space aligned with the weight-decay part: opposing
  components are removed, aligned ones kept);
- ``flip``:    when c and w have opposite signs, θ_{t+1} −= 2c v_1 (the opposing
  component is reversed, its magnitude kept).

Only the applied displacement changes: the optimizer's state (Adam moments) still sees
the raw gradients, ω and η are untouched, and the weight-decay part is exactly what it
was, so the GramCallback's split stays exact (its gradient part is the modified a_t).
All of it is one p-vector copy, two dot products and one axpy a step, on the parameters'
device, without host synchronisation.

Under DDP (``trainer=ddp``) the selected parameters, their gradients (all-reduced by DDP)
and the optimizer's steps are replicated, while a sharded GramCallback holds only this
rank's slice of v_1. The whole v_1 is all-gathered once per new edge (at the first armed
step that sees it; every rank steps together and sees the same edge, so every rank
gathers) and kept; c, w and the change are then computed locally on whole, identical
vectors, so every rank applies the same update and the replicas stay equal, with no
collective in the per-step hooks otherwise. On one process nothing is gathered or copied:
the edge's own v_1 is used, bit for bit as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from grokedge.callbacks.gram import find_gram_callback
from grokedge.callbacks.intervention import InterventionCallback
from grokedge.checks import check_choice
from grokedge.config_checks import names_python_arguments
from grokedge.edge.spectrum import EdgeState
from grokedge.functional import analysed_module
from grokedge.optimizer_facts import decay_of, group_index, inexact_groups, lr_of, optimizer_for

DECOUPLING_KEY = "callbacks.decoupling"
DECOUPLING = "decoupling"
MODES = ("remove", "enforce", "flip")
STAT_NAMES = ("steps", "grad_energy", "v1_energy", "removed_energy", "opposed")


class EdgeDecouplingCallback(InterventionCallback):
    """Removes (or aligns) the gradient part's v_1 component at every step after a trigger.

    Needs a :class:`~grokedge.callbacks.gram.GramCallback` (the edge v_1 and the flat
    layout) and an optimizer with decoupled weight decay (AdamW). Off unless a trigger is
    set. Steps while the Gram has no edge yet are left alone (counted as not modified).

    Args:
        mode: ``remove``, ``enforce`` or ``flip`` (see the module docstring).
        at_step / after_grok: the trigger, as in ``WDRemovalCallback``.
        every: optimizer steps between measurements after the trigger.
        n_sequences, sample, subset_seed, eval_set, block, folds, seed, tables,
        config_key: as ``WDRemovalCallback``.

    Logs (``global_step``): ``decouple/start_step`` once; at the trigger and every
    ``every`` steps the compression read-outs of ``WDRemovalCallback`` under
    ``decouple/`` (``decouple/theta_norm``, ``decouple/theta_norm_selected``,
    ``decouple/attn_entropy``, ``decouple/linear_r2``, ``decouple/test_acc``,
    ``decouple/weight_decay``) and, over the steps since the previous measurement:
    ``decouple/v1_grad_frac`` = Σ c² / Σ ‖a‖² (share of the gradient part's energy on
    v_1, before modification), ``decouple/removed_frac`` = Σ (change)² / Σ ‖a‖²,
    ``decouple/opposed_frac`` (share of steps where c opposed w), ``decouple/steps``
    (steps modified). Rows ``decoupling`` in ``analyses.jsonl``; W&B table
    ``decouple/measures_table``.

    Example:
        >>> EdgeDecouplingCallback(mode="remove", at_step=200, every=100)  # doctest: +SKIP
    """

    analysis = DECOUPLING
    prefix = "decouple"

    schedule_defaults: ClassVar[Mapping[str, Any]] = {"every": 100}

    @names_python_arguments
    def __init__(
        self,
        mode: str = "remove",
        config_key: str = DECOUPLING_KEY,
        **options: Any,
    ) -> None:
        # options: the trigger (at_step, after_grok), block, folds, seed (as
        # InterventionCallback) and the AnalysisSchedule keys.
        super().__init__(config_key=config_key, **options)
        self.mode = check_choice(f"{config_key}.mode", mode, MODES)
        self._handles: list[RemovableHandle] = []
        self._params: list[Tensor] = []
        self._groups: list[int] = []
        self._before: Tensor | None = None
        self._before_views: list[Tensor] = []
        self._armed = False
        self._v1_whole: Tensor | None = None  # sharded: v_1 gathered whole, [p]
        self._v1_edge: EdgeState | None = None  # the edge it was gathered from
        self._stats: Tensor | None = None  # float64 [len(STAT_NAMES)] since last read
        self._pending_stats: Tensor | None = None
        self.optimizer: Optimizer | None = None

    # ------------------------------------------------------------------ hooks setup

    @names_python_arguments
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.enabled and self.gram is None:
            # Its edge v_1 is the GramCallback's: raises, naming this callback and the fix.
            find_gram_callback(trainer, from_config=self.from_config, reader=self.label)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)  # the protocol check on one batch
        if not self.enabled:
            return
        assert self.selector is not None
        net = analysed_module(pl_module)
        found = optimizer_for(trainer.optimizers, net, self.selector.names[0])
        if found is not None:
            self.attach(net, found[0])
            return
        raise ValueError(f"{self.config_key}: no optimizer holds the selected parameters")

    def attach(self, model: nn.Module, optimizer: Optimizer) -> None:
        """Register the step hooks on ``optimizer`` for the selected parameters of ``model``
        (``self.selector``, the Gram's layout). Lightning calls this from ``on_fit_start``;
        call it yourself to use the callback without a Trainer (set ``gram`` to an object
        whose ``edge`` is the current ``EdgeState``, and ``fired_step`` to start)."""
        assert self.selector is not None
        self._params = [p for _, p in self.selector.named(model)]
        self.optimizer = optimizer
        group_of = group_index(optimizer)
        self._groups = [group_of.get(id(p), -1) for p in self._params]
        if inexact_groups(optimizer, set(self._groups) - {-1}):
            raise ValueError(
                f"{self.config_key}: {type(optimizer).__name__} does not decouple "
                "its weight decay, so the step's gradient part cannot be recovered "
                "exactly; allowed: torch.optim.AdamW (or weight_decay 0)"
            )
        device, dtype = self._params[0].device, self._params[0].dtype
        self._before = torch.empty(self.selector.p, dtype=dtype, device=device)
        self._before_views = [v.view(-1) for v in self.selector.unflatten(self._before).values()]
        self._stats = torch.zeros(len(STAT_NAMES), dtype=torch.float64, device=device)
        if self._pending_stats is not None:
            self._stats.copy_(self._pending_stats)
            self._pending_stats = None
        for handle in self._handles:
            handle.remove()
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def fire(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        return {"decouple/start_step": float(trainer.global_step)}

    # ------------------------------------------------------------------ the step hooks

    @torch.no_grad()
    def _pre_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        edge = None if self.gram is None else self.gram.edge
        self._armed = self.fired_step is not None and edge is not None and float(edge.sigma[0]) > 0
        if self._armed:
            assert edge is not None
            if self._sharded() and self._v1_edge is not edge:
                self._gather_v1(edge)
            torch._foreach_copy_(self._before_views, [p.detach().view(-1) for p in self._params])

    @torch.no_grad()
    def _post_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if not self._armed:
            return
        self._armed = False
        assert self.gram is not None and self.gram.edge is not None and self._stats is not None
        assert self.selector is not None
        v1 = self.gram.edge.vectors[0]
        if self._sharded():
            assert self._v1_whole is not None and self._v1_edge is self.gram.edge
            v1 = self._v1_whole
        v_views = [v.view(-1) for v in self.selector.unflatten(v1).values()]
        groups = optimizer.param_groups
        c = torch.zeros((), dtype=torch.float64, device=v1.device)  # a·v1
        w = torch.zeros((), dtype=torch.float64, device=v1.device)  # (−ηωθ)·v1
        energy = torch.zeros((), dtype=torch.float64, device=v1.device)
        for param, before, v, g in zip(
            self._params, self._before_views, v_views, self._groups, strict=True
        ):
            decay = 0.0
            if g >= 0 and param.grad is not None:
                group = groups[g]
                decay = lr_of(group) * decay_of(group)
            after = param.detach().view(-1)
            adam = after - before * (1.0 - decay) if decay else after - before
            vd = v.to(torch.float64)
            c += torch.dot(adam.to(torch.float64), vd)
            energy += adam.to(torch.float64).pow(2).sum()
            if decay:
                w -= decay * torch.dot(before.to(torch.float64), vd)
        opposed = (c * w) < 0
        if self.mode == "remove":
            change = -c
        elif self.mode == "enforce":
            change = torch.where(opposed, -c, torch.zeros_like(c))
        else:  # flip
            change = torch.where(opposed, -2.0 * c, torch.zeros_like(c))
        for param, v in zip(self._params, v_views, strict=True):
            param.detach().view(-1).add_(v * change.to(v.dtype))
        self._stats += torch.stack(
            [torch.ones_like(c), energy, c * c, change * change, opposed.to(torch.float64)]
        )

    def _sharded(self) -> bool:
        """Whether the Gram's edge vectors are this rank's slices (DDP, > 1 rank)."""
        shard = getattr(self.gram, "shard", None)
        return shard is not None and shard.sharded

    def _gather_v1(self, edge: EdgeState) -> None:
        """Keep the whole v_1 of ``edge`` (collective: one all-gather of a p-vector)."""
        assert self.gram is not None
        whole = self.gram.gather_vectors(edge.vectors[:1])[0]
        self._v1_whole = whole.to(self._params[0].device).contiguous()
        self._v1_edge = edge

    # ------------------------------------------------------------------ read-outs

    def extra_scalars(self) -> dict[str, float]:
        if self._stats is None:
            return {}
        steps, grad_energy, v1_energy, removed, opposed = self._stats.tolist()
        self._stats.zero_()
        out = {"decouple/steps": steps}
        if steps:
            out["decouple/opposed_frac"] = opposed / steps
        if grad_energy > 0:
            out["decouple/v1_grad_frac"] = v1_energy / grad_energy
            out["decouple/removed_frac"] = removed / grad_energy
        return out

    def state_dict(self) -> dict[str, Any]:
        stats = self._stats if self._stats is not None else self._pending_stats
        return {
            **super().state_dict(),
            "mode": self.mode,
            "stats": None if stats is None else stats.detach().cpu().clone(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        super().load_state_dict(state_dict)
        stats = state_dict.get("stats")
        if stats is not None:
            if self._stats is not None:
                self._stats.copy_(stats)
            else:
                self._pending_stats = stats.to(torch.float64)
