"""ClassCallback: the run's universality class, observed and predicted (docs/theory.md §3).

At every Gram window (a listener, W×W and two p-sized dot products) it records v_1's
gradient energy share and its rotation from the previous window. When it runs (by
default once, on the final weights) it measures the **functional R²** — the linear
probe's R² of the task variable (the task's primary probe target: Dyck depth, SCAN the
actions still to emit, modular the answer) on the change of the last block's hidden state
when θ_sel moves by ε = 0.005‖θ_sel‖ along v_1 — on a fixed test subset, through
the module's functional ``trace(params, batch)`` (``grokedge.functional``; the live model
is never touched), and decides:

- the **observed** class from the late windows' mean gradient share and rotation and the
  functional R²;
- the **predicted** class from the late median of the gap flow balance Term 3 / |Term 2|
  measured by the :class:`~grokedge.callbacks.gap_flow.GapFlowCallback` (if the run has
  one).

Thresholds and the meaning of "late": :mod:`grokedge.spectral.classes`, docs/classes.md.

Under DDP with a sharded GramCallback (``trainer=ddp``) every rank holds its slice of v_1:
the rotation is finished from the [2, 2] Gram of (v_1 previous; v_1) summed over the ranks
(one all-reduce per window, called by every rank in the Gram's listener), the kept
previous v_1 is this rank's slice (whole vectors in checkpoints, so that a run resumes on
any number of ranks), and the functional R² gathers v_1 whole once per call (the model is
evaluated at θ + εv_1). Every rank computes the same numbers; rank 0 writes them. On one
process nothing is communicated and the numbers are the unsharded ones bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import lightning as L
import torch
from torch import Tensor

from grokedge.callbacks.common import AnalysisCallback, Result, trace_of
from grokedge.callbacks.gap_flow import GapFlowCallback
from grokedge.config_checks import check_float, check_int
from grokedge.functional import TRACE, analysed_module, check_block
from grokedge.spectral import EdgeState, energy_fractions, rotation_finish, rotation_partial
from grokedge.spectral.classes import (
    PAPER_EPS_FRACTION,
    ClassThresholds,
    ClassWindow,
    classify_run,
    functional_epsilon,
)
from grokedge.spectral.probes import functional_r2 as functional_r2_score
from grokedge.tasks.probe_targets import probe_data, probe_target_tensors

CLASS_KEY = "callbacks.classes"
CLASSES = "classes"

THRESHOLD_BOUNDS = {  # (minimum, maximum, minimum excluded) of each threshold
    "functional_grad_share": (0.0, 1.0, False),
    "functional_r2": (None, 1.0, False),
    "compression_grad_share": (0.0, 1.0, False),
    "compression_r2": (None, 1.0, False),
    "compression_rotation_deg": (0.0, 90.0, False),
    "functional_balance": (None, None, False),
    "compression_balance": (0.0, None, True),
}
OPTIONAL_THRESHOLDS = ("compression_rotation_deg",)  # None: criterion not used

TABLE_COLUMNS = (
    "observed",
    "predicted",
    "late_grad_share",
    "late_rotation_deg",
    "functional_r2",
    "late_balance",
)


class ClassCallback(AnalysisCallback):
    """Observed and predicted universality class of the run (``class/*``).

    Needs a :class:`~grokedge.callbacks.gram.GramCallback` before it; for the predicted
    class also a :class:`~grokedge.callbacks.gap_flow.GapFlowCallback` (else it is
    ``undetermined``).

    Args:
        every: optimizer steps between classifications (None, the default: only at the end).
        at_grok: also once at the detected grok step.
        at_end: classify on the final weights (default true: the paper's "late").
        n_sequences: test sequences of the functional-R² subset (default 300, as the
            probes); None: the whole set. ``sample``, ``subset_seed``, ``eval_set``: as
            ``AblationCallback``.
        eps_fraction: ε = eps_fraction · ‖θ_sel‖ along v_1 (the paper: 0.005).
        block: block whose output is read (-1: the last, before the final LayerNorm).
        folds: K of the linear probe's grouped K-fold (capped at the number of strings).
        seed: seed of the folds.
        min_late, tail: "late" windows are the ``late``-phase ones if there are at least
            ``min_late``, else the last ``tail`` windows.
        functional_grad_share, functional_r2, compression_grad_share, compression_r2,
        compression_rotation_deg (None: unused), functional_balance, compression_balance:
            thresholds, see :class:`grokedge.spectral.classes.ClassThresholds`.
        tables, config_key: as ``AblationCallback``.

    Logs (``global_step``): ``class/observed``, ``class/predicted`` (codes: functional 0,
    mixed 1, compression 2), ``class/late_grad_share``, ``class/late_rotation_deg``,
    ``class/functional_r2``, ``class/functional_r2_sd``, ``class/late_balance``,
    ``class/late_windows``, ``class/functional_eps``. Writes a ``classes`` row per call
    (names, measurements, thresholds, which windows were late); ``summary_fields()`` puts
    ``class_observed``, ``class_predicted`` (names) and the measurements into
    ``summary.json``.

    Example:
        >>> callbacks = [GramCallback(interval=100), GapFlowCallback(), ClassCallback()]
        >>> L.Trainer(callbacks=callbacks).fit(module, datamodule)  # doctest: +SKIP
        >>> callbacks[2].summary_fields()["class_observed"]          # doctest: +SKIP
        'mixed'
    """

    analysis = CLASSES
    needs_edge = True
    requires = (TRACE,)

    schedule_defaults: ClassVar[Mapping[str, Any]] = {"at_grok": False, "at_end": True}

    def __init__(
        self,
        eps_fraction: float = PAPER_EPS_FRACTION,
        block: int = -1,
        folds: int = 5,
        seed: int = 0,
        min_late: int = 3,
        tail: int = 10,
        functional_grad_share: float = 0.90,
        functional_r2: float = 0.90,
        compression_grad_share: float = 0.50,
        compression_r2: float = 0.30,
        compression_rotation_deg: float | None = 12.0,
        functional_balance: float = 2.0,
        compression_balance: float = 0.5,
        config_key: str = CLASS_KEY,
        **schedule: Any,
    ) -> None:
        super().__init__(config_key=config_key, **schedule)
        key = config_key
        self.eps_fraction = check_float(
            f"{key}.eps_fraction", eps_fraction, 0.0, strict_minimum=True
        )
        if isinstance(block, bool) or not isinstance(block, int):
            raise ValueError(f"{key}.block={block!r} is not allowed: an integer block index")
        self.block = block
        self.folds = check_int(f"{key}.folds", folds, 2)
        self.seed = check_int(f"{key}.seed", seed, 0)
        self.min_late = check_int(f"{key}.min_late", min_late, 1)
        self.tail = check_int(f"{key}.tail", tail, 1)
        given = {
            "functional_grad_share": functional_grad_share,
            "functional_r2": functional_r2,
            "compression_grad_share": compression_grad_share,
            "compression_r2": compression_r2,
            "compression_rotation_deg": compression_rotation_deg,
            "functional_balance": functional_balance,
            "compression_balance": compression_balance,
        }
        checked = {
            name: None
            if value is None and name in OPTIONAL_THRESHOLDS
            else check_float(f"{key}.{name}", value, *THRESHOLD_BOUNDS[name])
            for name, value in given.items()
        }
        try:
            self.thresholds = ClassThresholds(**checked)
        except ValueError as e:
            raise ValueError(f"{key}: thresholds not allowed: {e}") from e
        self.windows: list[ClassWindow] = []
        # v_1 of the previous window (a copy: the Gram's own ``previous`` is gone after a
        # resume, and its buffer is reused two windows later).
        self.prev_v1: torch.Tensor | None = None
        self.last: dict[str, Any] | None = None
        self.gap_flow: GapFlowCallback | None = None

    def check_module(self, pl_module: Any) -> None:
        super().check_module(pl_module)
        check_block(f"{self.config_key}.block", self.block, pl_module)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        found = [c for c in trainer.callbacks if isinstance(c, GapFlowCallback)]
        self.gap_flow = found[0] if found else None
        if self.gram is not None:
            self.gram.add_listener(self.on_edge)

    def on_edge(self, trainer: L.Trainer, pl_module: L.LightningModule, state: EdgeState) -> None:
        """Record v_1's gradient share and rotation of the new window.

        Collective under sharding (every rank runs the Gram's listeners): one all-reduce
        of the [2, 2] Gram of the two v_1 slices when a rotation is measured (σ_1 and
        ``prev_v1`` are the same on every rank, so all ranks reduce or none does).
        """
        share = float(energy_fractions(state.grad_proj[:, :1], state.wd_proj[:, :1])[0][0])
        rotation = math.nan
        v1 = state.vectors[0]
        if float(state.sigma[0]) > 0:
            prev = self._prev_v1_slice()
            if prev is not None:
                gram = rotation_partial(prev.to(v1.device, v1.dtype), v1)
                if self._sharded():
                    assert self.gram is not None
                    gram = self.gram.reduce(gram)
                rotation = float(rotation_finish(gram)[0])
            self.prev_v1 = v1.detach().clone()
        else:
            self.prev_v1 = None
        self.windows.append(ClassWindow(int(state.step), share, rotation))

    def _sharded(self) -> bool:
        """Whether the Gram's vectors are this rank's slices (DDP, more than one rank)."""
        shard = None if self.gram is None else self.gram.shard
        return shard is not None and shard.sharded

    def _prev_v1_slice(self) -> Tensor | None:
        """``prev_v1`` as this rank's slice: a whole vector restored from a checkpoint is
        cut down once the Gram's shard is known (no communication)."""
        prev = self.prev_v1
        if prev is not None and self._sharded():
            assert self.gram is not None and self.gram.shard is not None
            shard = self.gram.shard
            if prev.shape[-1] == shard.p:  # whole (a checkpoint's): keep this rank's slice
                self.prev_v1 = prev = shard.take(prev).clone()
        return prev

    # -------------------------------------------------------------------- the analysis

    @torch.no_grad()
    def functional_r2(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> tuple[float, float, float, int]:
        """(R² mean, R² sd, ε, positions) on the current weights and edge v_1.

        Collective under sharding: v_1 is gathered whole (one p-vector) when σ_1 > 0.
        """
        assert self.gram is not None and self.gram.edge is not None
        assert self.gram.selector is not None
        edge, selector = self.gram.edge, self.gram.selector
        if float(edge.sigma[0]) <= 0:
            return math.nan, math.nan, math.nan, 0
        net = analysed_module(pl_module)
        batch = self.subset(trainer, pl_module)
        theta = selector.flatten(net)
        eps = functional_epsilon(theta, self.eps_fraction)
        v1 = edge.vectors[0]
        if self._sharded():  # θ + εv_1 needs the whole direction: one all-gather
            v1 = self.gram.gather_vectors(edge.vectors[:1])[0]
        moved = theta + eps * v1.to(theta.dtype)
        params = selector.functional_params(moved, dict(net.named_parameters()))
        base = trace_of(pl_module, batch).hidden[self.block]
        perturbed = trace_of(pl_module, batch, params).hidden[self.block]
        declared = probe_target_tensors(trainer.datamodule, batch, self.config_key)
        target = declared[next(iter(declared))]
        a = probe_data(trainer.datamodule, pl_module, batch, base, target)
        b = probe_data(trainer.datamodule, pl_module, batch, perturbed, target)
        n_groups = len(set(a.groups.tolist()))
        if n_groups < 2:
            return math.nan, math.nan, eps, len(a.targets)
        score = functional_r2_score(
            a.features,
            b.features,
            a.targets,
            a.groups,
            folds=min(self.folds, n_groups),
            seed=self.seed,
            sample_weight=a.weights,
        )
        return score.mean, score.sd, eps, len(a.targets)

    def classify(self, grok_step: int | None, r2: float) -> dict[str, Any]:
        """Observed and predicted class from the windows so far and the functional R²
        (:func:`~grokedge.spectral.classes.classify_run`)."""
        assert self.phases is not None
        balances, b_phases = None, ()
        if self.gap_flow is not None:
            balances, b_phases = self.gap_flow.late_balances(grok_step)
        return classify_run(
            self.windows,
            [self.phases.label(w.step, grok_step) for w in self.windows],
            r2,
            self.thresholds,
            balances,
            b_phases,
            self.min_late,
            self.tail,
        )

    def analyse(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> Result:
        r2, r2_sd, eps, n = self.functional_r2(trainer, pl_module)
        decision = self.classify(getattr(pl_module, "grok_step", None), r2)
        self.last = decision | {"step": step, "functional_r2_sd": r2_sd}
        scalars = {
            "class/observed": decision["observed_code"],
            "class/predicted": decision["predicted_code"],
            "class/late_grad_share": decision["late_grad_share"],
            "class/late_rotation_deg": decision["late_rotation_deg"],
            "class/functional_r2": r2,
            "class/functional_r2_sd": r2_sd,
            "class/late_balance": decision["late_balance"],
            "class/late_windows": float(decision["late_windows"]),
            "class/functional_eps": eps,
        }
        fields = decision | {
            "functional_r2_sd": r2_sd,
            "functional_eps": eps,
            "n_positions": n,
            "eps_fraction": self.eps_fraction,
            "block": self.block,
            "thresholds": dict(self.thresholds.__dict__),
        }
        columns = list(TABLE_COLUMNS)
        return Result(scalars, fields, ("class/table", columns, [[decision[c] for c in columns]]))

    def summary_fields(self) -> dict[str, Any]:
        """``class_observed``, ``class_predicted`` and their measurements (last call)."""
        if self.last is None:
            return {}
        keys = (
            "late_grad_share",
            "late_rotation_deg",
            "functional_r2",
            "functional_r2_sd",
            "late_balance",
            "late_basis",
            "late_windows",
        )
        return {
            "class_observed": self.last["observed"],
            "class_predicted": self.last["predicted"],
            **{f"class_{k}": self.last[k] for k in keys},
        }

    # -------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Primitives and CPU tensors; ``prev_v1`` whole. Collective under sharding
        (Lightning builds the checkpoint on every rank): the slices are all-gathered."""
        last = None
        if self.last is not None:  # primitives only
            last = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.last.items()}
        return super().state_dict() | {
            "windows": [list(w) for w in self.windows],
            "prev_v1": self._whole_prev_v1(),
            "last": last,
        }

    def _whole_prev_v1(self) -> Tensor | None:
        """``prev_v1`` as a whole CPU vector (gathered from the ranks' slices if sharded)."""
        prev = self._prev_v1_slice()
        if prev is None:
            return None
        if self._sharded():
            assert self.gram is not None
            prev = self.gram.gather_vectors(prev.detach().reshape(1, -1))[0]
        return prev.detach().cpu()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore; ``prev_v1`` is whole and is sliced at its first use if sharded."""
        if not state_dict:
            return
        super().load_state_dict(state_dict)
        self.windows = [ClassWindow(*w) for w in state_dict.get("windows", [])]
        self.prev_v1 = state_dict.get("prev_v1")
        last = state_dict.get("last")
        self.last = None if last is None else dict(last)
