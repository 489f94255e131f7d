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

Thresholds and the meaning of "late": :mod:`grokedge.experiments.universality`, docs/classes.md.

Under DDP with a sharded GramCallback (``trainer=ddp``) every rank holds its slice of v_1:
the rotation is :class:`~grokedge.experiments.direction_rotation.DirectionRotation`'s (one
all-reduce per window; whole vectors in checkpoints, so that a run resumes on any number
of ranks), and the functional R² gathers v_1 whole once per call. Every rank computes the
same numbers; rank 0 writes them. On one process nothing is communicated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import lightning as L
import torch

from grokedge.analysis.background import Result
from grokedge.analysis.probe_targets import (
    BASES,
    FOURIER,
    VALUE,
    FunctionalReadout,
    FunctionalTarget,
    check_functional_target,
    check_names_declared,
    functional_readout,
    probe_target_tensors,
    task_label,
)
from grokedge.callbacks.common import AnalysisCallback
from grokedge.callbacks.gap_flow import GapFlowCallback
from grokedge.checks import check_choice, check_float, check_float_map, check_int, not_allowed
from grokedge.config_checks import names_python_arguments
from grokedge.edge.decomposition import energy_fractions
from grokedge.edge.spectrum import EdgeState
from grokedge.experiments.direction_rotation import DirectionRotation
from grokedge.experiments.universality import (
    PAPER_EPS_FRACTION,
    THRESHOLD_BOUNDS,
    ClassThresholds,
    ClassWindow,
    classify_run,
    functional_epsilon,
)
from grokedge.functional import EVALUATE, TRACE, analysed_module, check_block, trace_of

CLASS_KEY = "callbacks.classes"
CLASSES = "classes"

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
        target: the task variable the functional R² reads, one of the task's
            ``probe_target_names`` (None: its first probe target); ``conf/task/*.yaml``
            declares each task's (``task.functional_target``).
        target_basis: ``value`` (the number) or ``fourier`` (cos/sin(2πkc/p) at the
            ``n_frequencies`` key frequencies of the answer logits; a cyclic answer:
            modular arithmetic). See ``grokedge.analysis.probe_targets``.
        min_late, tail: "late" windows are the ``late``-phase ones if there are at least
            ``min_late``, else the last ``tail`` windows.
        thresholds: the class rule's thresholds by name (``functional_grad_share``,
            ``functional_r2``, ``compression_grad_share``, ``compression_r2``,
            ``compression_rotation_deg`` (None: unused), ``functional_balance``,
            ``compression_balance``); those left out keep the defaults of
            :class:`grokedge.experiments.universality.ClassThresholds`.
        tables, config_key: as ``AblationCallback``.

    Logs (``global_step``): ``class/observed``, ``class/predicted`` (codes: functional 0,
    mixed 1, compression 2), ``class/late_grad_share``, ``class/late_rotation_deg``,
    ``class/functional_r2``, ``class/functional_r2_sd``, ``class/late_balance``,
    ``class/late_windows``, ``class/functional_eps``, ``class/functional_r2_{name}``
    (every declared target read as a number). Writes a ``classes`` row per call
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

    @names_python_arguments
    def __init__(
        self,
        eps_fraction: float = PAPER_EPS_FRACTION,
        block: int = -1,
        folds: int = 5,
        seed: int = 0,
        target: str | None = None,
        target_basis: str = VALUE,
        n_frequencies: int = 4,
        min_late: int = 3,
        tail: int = 10,
        thresholds: Mapping[str, float | None] | None = None,
        config_key: str = CLASS_KEY,
        **schedule: Any,
    ) -> None:
        super().__init__(config_key=config_key, **schedule)
        key = config_key
        self.eps_fraction = check_float(
            f"{key}.eps_fraction", eps_fraction, 0.0, strict_minimum=True
        )
        if isinstance(block, bool) or not isinstance(block, int):
            raise not_allowed(f"{key}.block", block, "an integer block index")
        self.block = block
        self.folds = check_int(f"{key}.folds", folds, 2)
        self.seed = check_int(f"{key}.seed", seed, 0)
        if target is not None and (not isinstance(target, str) or not target):
            raise not_allowed(f"{key}.target", target, "null or a target name")
        self.target = FunctionalTarget(
            target or "",
            check_choice(f"{key}.target_basis", target_basis, BASES),
            check_int(f"{key}.n_frequencies", n_frequencies, 1),
        )
        self.min_late = check_int(f"{key}.min_late", min_late, 1)
        self.tail = check_int(f"{key}.tail", tail, 1)
        checked = check_float_map(f"{key}.thresholds", thresholds or {}, THRESHOLD_BOUNDS)
        try:
            self.thresholds = ClassThresholds(**checked)
        except ValueError as e:
            raise ValueError(f"{key}.thresholds not allowed: {e}") from e
        self.windows: list[ClassWindow] = []
        # v_1 of the previous window (a copy: the Gram's own ``previous`` is gone after a
        # resume, and its buffer is reused two windows later).
        self.v1_turn = DirectionRotation()
        self.last: dict[str, Any] | None = None
        self.gap_flow: GapFlowCallback | None = None

    def required(self) -> tuple[str, ...]:
        # The Fourier basis reads the key frequencies off the answer logits.
        return (TRACE, EVALUATE) if self.target.basis == FOURIER else (TRACE,)

    @names_python_arguments
    def check_module(self, pl_module: Any) -> None:
        super().check_module(pl_module)
        check_block(f"{self.config_key}.block", self.block, pl_module)

    @names_python_arguments
    def check_data(self, datamodule: Any) -> None:
        """Before training: the target is one the task declares, in a basis it allows."""
        if self.target.name:
            check_functional_target(self.config_key, self.target, datamodule)

    @names_python_arguments
    def check_batch(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Before the first step, on the fixed subset: the protocol (``AnalysisCallback``)
        and the probe targets the functional R² reads (shaped as the labels)."""
        super().check_batch(trainer, pl_module)
        batch = self.subset(trainer, pl_module)  # built (and cached) by the check above
        declared = probe_target_tensors(trainer.datamodule, batch, self.config_key)
        if self.target.name:
            check_names_declared(
                f"{self.config_key}.target",
                self.target.name,
                list(declared),
                task_label(trainer.datamodule),
            )

    @names_python_arguments
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
        assert self.gram is not None
        valid = float(state.sigma[0]) > 0
        rotation = self.v1_turn.update(state.vectors[0], valid, self.gram.shard, self.gram.reduce)
        self.windows.append(ClassWindow(int(state.step), share, rotation))

    def _sharded(self) -> bool:
        """Whether the Gram's vectors are this rank's slices (DDP, more than one rank)."""
        shard = None if self.gram is None else self.gram.shard
        return shard is not None and shard.sharded

    # -------------------------------------------------------------------- the analysis

    @torch.no_grad()
    def functional_r2(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> tuple[FunctionalReadout | None, float]:
        """The functional readout on the current weights and edge v_1, and ε (None, NaN
        while σ_1 = 0).

        Collective under sharding: v_1 is gathered whole (one p-vector) when σ_1 > 0.
        """
        assert self.gram is not None and self.gram.edge is not None
        assert self.gram.selector is not None
        edge, selector = self.gram.edge, self.gram.selector
        if float(edge.sigma[0]) <= 0:
            return None, math.nan
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
        target = self.target
        fourier = bool(target.name) and target.basis == FOURIER  # unnamed: read as a number
        logits = pl_module.evaluate({}, batch)[2] if fourier else None
        readout = functional_readout(
            trainer.datamodule, pl_module, batch, base, perturbed, target, logits, self.folds,
            self.seed, self.config_key,
        )  # fmt: skip
        return readout, eps

    def classify(self, grok_step: int | None, r2: float) -> dict[str, Any]:
        """Observed and predicted class from the windows so far and the functional R²
        (:func:`~grokedge.experiments.universality.classify_run`)."""
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
        readout, eps = self.functional_r2(trainer, pl_module)
        nan = math.nan
        r2, r2_sd = (nan, nan) if readout is None else (readout.r2, readout.sd)
        decision = self.classify(getattr(pl_module, "grok_step", None), r2)
        by_target = {} if readout is None else readout.by_target
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
        } | {f"class/functional_r2_{name}": v for name, v in by_target.items()}
        fields = decision | {
            "functional_r2_sd": r2_sd,
            "functional_eps": eps,
            "n_positions": 0 if readout is None else readout.positions,
            "functional_target": self.target.name or None,
            "functional_basis": self.target.basis,
            "key_frequencies": [] if readout is None else readout.frequencies,
            "functional_r2_by_target": by_target,
            "eps_fraction": self.eps_fraction,
            "block": self.block,
            "thresholds": dict(self.thresholds.__dict__),
        }
        self.last = fields | {"step": step}
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
            "functional_target",
            "functional_basis",
            "key_frequencies",
            "margins",
        )
        return {
            "class_observed": self.last["observed"],
            "class_predicted": self.last["predicted"],
            **{f"class_{k}": self.last.get(k) for k in keys},  # .get: older checkpoints
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
            "prev_v1": self.v1_turn.whole(None if self.gram is None else self.gram.shard),
            "last": last,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore; ``prev_v1`` is whole and is sliced at its first use if sharded."""
        if not state_dict:
            return
        super().load_state_dict(state_dict)
        self.windows = [ClassWindow(*w) for w in state_dict.get("windows", [])]
        self.v1_turn.previous = state_dict.get("prev_v1")
        last = state_dict.get("last")
        self.last = None if last is None else dict(last)
