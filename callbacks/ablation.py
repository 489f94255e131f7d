"""AblationCallback: remove the spectral edge from θ and measure what the model loses.

docs/theory.md §3, experiment 2, with the control §5 asks for. On a fixed evaluation subset
of the test set, through the module's ``evaluate`` (``GrokModule``'s, or any module's
under the ``grokedge.functional`` protocol; functional: the live model and the
optimizer are never touched), with θ = the GramCallback's selected parameters and v_k
its newest edge vectors:

- ``edge``: θ − Σ_{k∈{1,2}} (θ·v_k) v_k (the paper's removal of span{v_1, v_2});
- ``v1``: θ − (θ·v_1) v_1;
- ``bulk``: the same removal of span{v_3, v_4};
- ``random``: the edge removal along ``n_random`` random orthonormal 2-D subspaces
  (QR of Gaussians; the paper's control);
- ``matched``: θ + Δθ for ``n_random`` random directions with ‖Δθ‖ = ‖θ − θ_edge‖, the
  edge removal's displacement (the norm-matched control: a random subspace holds only
  ~2/p of ‖θ‖², so the paper's control barely moves θ);
- ``shrink``: θ·(1 − d/‖θ‖), θ moved the same distance d = ‖θ − θ_edge‖ straight toward
  0 (clamped at 0 when d > ‖θ‖). Where the edge lies along θ its removal shortens θ,
  which a random displacement (nearly orthogonal to θ) does not; the shrink spends the
  whole distance on shortening θ, so it removes 1 − (1 − d/‖θ‖)² of ‖θ‖², never less
  than the edge's d²/‖θ‖² (both shares are recorded);
- ``shrink_norm``: the norm-equal shrink θ·‖θ_edge‖/‖θ‖ = θ·sqrt(1 − d²/‖θ‖²), θ
  shortened to exactly the norm the edge removal leaves: it deletes the edge's share
  d²/‖θ‖² of ‖θ‖² (by a displacement ≈ d²/(2‖θ‖), shorter than d).

Under DDP with a sharded GramCallback every rank runs the analysis on its slice of θ and
of the edge vectors: projections and norms are partial dot products summed over ranks,
and each ablated θ is all-gathered whole for the model evaluation (which needs every
parameter); see ``grokedge.experiments.ablation.sharded_ablation_experiment``. Every rank
gets the same numbers; rank 0 writes them.

The pure math lives in :mod:`grokedge.experiments.ablation`; this is the adapter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import lightning as L
import torch

from grokedge.analysis.background import Deferred, Result
from grokedge.batch import IGNORE_INDEX, Batch
from grokedge.callbacks.common import AnalysisCallback
from grokedge.checks import check_int
from grokedge.config_checks import names_python_arguments
from grokedge.edge.selection import ParameterSelector
from grokedge.edge.sharding import Shard
from grokedge.experiments.ablation import sharded_ablation_experiment
from grokedge.experiments.perturbation import DEFAULT_BUCKETS, BucketedEvaluate
from grokedge.experiments.subspaces import edge_basis, sharded_remove_subspace
from grokedge.functional import analysed_module

ABLATION_KEY = "callbacks.ablation"
ABLATION = "ablation"

EDGE_INDICES = (0, 1)
V1_INDICES = (0,)
BULK_INDICES = (2, 3)

TABLE_COLUMNS = ["removal", "index", "dacc", "dloss"]


def _unseen_accuracy(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> float:
    """Token accuracy over the rows flagged ``unseen`` (NaN without such rows)."""
    unseen = batch.get("unseen")
    if unseen is None:
        return math.nan
    labels = batch["labels"]
    mask = (labels != IGNORE_INDEX) & unseen[:, None]
    w = batch["weight"].to(torch.float64)[:, None].expand_as(labels)[mask]
    if w.numel() == 0 or float(w.sum()) == 0:
        return math.nan
    correct = (logits.argmax(-1) == labels)[mask].to(torch.float64)
    return float((correct * w).sum() / w.sum())


SHRINK_FIELDS = (
    "dacc",
    "dloss",
    "displacement",
    "theta_sq_removed_frac",
    "factor",
    "clamped",
    "ratio_resolved",
)


def _shrink_fields(result: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A shrink control's entry of the ``ablation`` row, from the experiment's
    ``<prefix>_*`` keys (``prefix``: ``shrink`` or ``shrink_norm``)."""
    return {name: result[f"{prefix}_{name}"] for name in SHRINK_FIELDS}


@dataclass(frozen=True)
class AblationSettings:
    """What an ablation call measures (the callback's knobs; see its docstring)."""

    buckets: int
    n_random: int
    seed: int


def ablation_measurements(
    pl_module: Any,
    selector: ParameterSelector,
    theta: torch.Tensor,
    vectors: torch.Tensor,
    sigma: torch.Tensor,
    batch: Batch,
    shard: Shard,
    settings: AblationSettings,
) -> tuple[dict[str, Any], dict[str, dict[str, float]], float, int]:
    """The ablation experiment on ``theta`` [n_local] with the edge ``vectors`` [k, n_local]
    and ``sigma`` [k]: the experiment's result (base, edge removal, random and norm-matched
    controls, shrinks), the v1 and bulk removals, the edge removal's accuracy change on
    unseen rows and the edge's dimension. Reads nothing of a live run (single process: a
    copy of the module in a worker process can run it; module-level for that reason)."""
    net = analysed_module(pl_module)
    evaluate = BucketedEvaluate(pl_module.evaluate, selector, net, batch, settings.buckets)
    whole = shard.gather  # slices -> the whole vector the model needs (collective)
    with torch.no_grad():
        basis = edge_basis(vectors, sigma, EDGE_INDICES)
        result = sharded_ablation_experiment(
            evaluate, theta, basis, batch, shard, n_random=settings.n_random, seed=settings.seed
        )
        base_loss, base_acc = result["base_loss"], result["base_acc"]
        _, _, base_logits = evaluate(whole(theta), batch)
        edge_theta = whole(sharded_remove_subspace(theta, basis, shard))
        _, _, edge_logits = evaluate(edge_theta, batch)
        unseen_dacc = _unseen_accuracy(edge_logits, batch) - _unseen_accuracy(base_logits, batch)
        removals: dict[str, dict[str, float]] = {}
        for name, indices in (("v1", V1_INDICES), ("bulk", BULK_INDICES)):
            sub = edge_basis(vectors, sigma, indices)
            if sub.shape[0] == 0:  # σ_k = 0 (early windows) or top_k too small
                removals[name] = {"dacc": math.nan, "dloss": math.nan, "dim": 0}
                continue
            loss, acc, _ = evaluate(whole(sharded_remove_subspace(theta, sub, shard)), batch)
            removals[name] = {
                "dacc": float(acc) - base_acc,
                "dloss": float(loss) - base_loss,
                "dim": int(sub.shape[0]),
            }
    return result, removals, unseen_dacc, int(basis.shape[0])


class AblationCallback(AnalysisCallback):
    """Edge ablation with random, norm-matched and two shrink controls, on a cadence and at
    grok.

    Needs a :class:`~grokedge.callbacks.gram.GramCallback` (before it in the callback list)
    with ``top_k >= 2`` (``>= 4`` for the bulk removal).

    Args:
        every: optimizer steps between analyses (None: only at the grok step).
        at_grok: also analyse once when the grok step is detected.
        at_end: also analyse once on the final weights.
        n_sequences: test sequences in the fixed evaluation subset (the paper: 300); None:
            the whole set. See :func:`grokedge.analysis.subsets.fixed_subset`.
        sample: ``sequences`` (n original sequences, deduplicated with their counts as
            weights) or ``rows`` (n distinct rows keeping their full-set weights).
        subset_seed: seed of the subset draw.
        eval_set: evaluation set the subset is drawn from (``test``).
        n_random: random subspaces and norm-matched directions (the paper: 20).
        seed: seed of the random draws; the same subspaces are used at every call, so the
            control is the same through the run (and after a resume).
        buckets: evaluate the subset in this many length buckets (less padding, same
            numbers; see ``BucketedEvaluate``).
        tables: log a W&B table per call (no-op without W&B).
        background: evaluate in a worker process, on a copy of the module at the call's
            θ, while training goes on: ``auto`` (default: one CPU process whose torch
            threads leave a core idle), ``true``, ``false``; the same numbers.
        background_steps: steps after a call in the worker at which its row and scalars
            are written (``AnalysisCallback``; docs/design.md).
        config_key: config path named in error messages.

    Logs (``global_step``; Δ = ablated − base, accuracy in [0, 1], loss in nats):
        ``ablation/edge_dacc``, ``ablation/edge_dloss``, ``ablation/v1_dacc``,
        ``ablation/v1_dloss``, ``ablation/bulk_dacc``, ``ablation/bulk_dloss``,
        ``ablation/random_dacc_mean``, ``ablation/random_dacc_sd``,
        ``ablation/ratio`` = |Δ_edge acc| / |mean Δ_random acc| (the paper's; absent, with
        ``ablation/ratio_resolved`` = 0, when the control's |Δ acc| is below one labelled
        position's worth: the same for ``matched``, ``shrink`` and ``shrink_norm``),
        ``ablation/edge_z`` = (Δ_edge − mean Δ_random) / sd (absent when the random
        controls have no spread), ``ablation/matched_dacc_mean``,
        ``ablation/matched_dacc_sd``, ``ablation/matched_ratio`` (the ratio against the
        norm-matched control), ``ablation/matched_z``, ``ablation/shrink_dacc``,
        ``ablation/shrink_dloss``, ``ablation/shrink_ratio`` = |Δ_edge acc| /
        (|Δ_shrink acc| + 1e-8), ``ablation/shrink_factor`` (1 − d/‖θ‖, clamped at 0),
        ``ablation/shrink_norm_dacc``, ``ablation/shrink_norm_dloss``,
        ``ablation/shrink_norm_ratio`` = |Δ_edge acc| / (|Δ_shrink_norm acc| + 1e-8)
        (the norm-equal shrink),
        ``ablation/base_acc``, ``ablation/displacement`` (‖θ − θ_edge‖, parameter units),
        ``ablation/theta_sq_removed_frac`` and ``ablation/shrink_theta_sq_removed_frac``
        (share of ‖θ_sel‖² the edge removal and the shrink delete, 1 − ‖θ'‖²/‖θ‖²),
        ``ablation/edge_dacc_unseen`` (on the subset's rows unseen in training).

    Writes one ``ablation`` row per call to ``analyses.jsonl`` (every Δ, both summaries,
    ``edge``, ``shrink`` and ``shrink_norm`` each with ``dacc``, ``dloss``,
    ``displacement`` and ``theta_sq_removed_frac`` — the shrinks also ``factor`` and
    ``clamped`` —, ``theta_norm``, the edge's σ and step, the trigger and the seconds it
    took) and the W&B table ``ablation/table`` (one ``shrink`` and one ``shrink_norm``
    row).

    Example:
        >>> callbacks = [GramCallback(interval=100), AblationCallback(every=500)]
        >>> L.Trainer(callbacks=callbacks).fit(module, datamodule)  # doctest: +SKIP
    """

    analysis = ABLATION
    supports_background = True
    needs_edge = True

    schedule_defaults: ClassVar[Mapping[str, Any]] = {"every": 1000}

    @names_python_arguments
    def __init__(
        self,
        n_random: int = 20,
        seed: int = 0,
        buckets: int = DEFAULT_BUCKETS,
        config_key: str = ABLATION_KEY,
        **schedule: Any,
    ) -> None:
        super().__init__(
            config_key=config_key,
            **schedule,
        )
        self.n_random = check_int(f"{config_key}.n_random", n_random, 2)
        self.seed = check_int(f"{config_key}.seed", seed, 0)
        self.buckets = check_int(f"{config_key}.buckets", buckets, 1)

    @names_python_arguments
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.gram is not None and self.gram.top_k < 2:
            raise ValueError(
                f"{self.config_key}: needs callbacks.gram.top_k >= 2 (the edge is "
                f"span(v_1, v_2)), got {self.gram.top_k}"
            )

    def analyse(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> Deferred:
        """θ and the edge now; the evaluations deferred (a worker process evaluates a copy
        of the module)."""
        assert self.gram is not None and self.gram.edge is not None
        assert self.gram.selector is not None
        edge = self.gram.edge
        selector = self.gram.selector
        # One process: the whole vector, and every sharded call below is the plain one.
        shard = self.gram.shard if self.gram.shard is not None else Shard.of(selector.p)
        net = analysed_module(pl_module)
        batch = self.subset(trainer, pl_module)
        theta = selector.flatten(net, shard.start, shard.stop)  # [n_local]
        vectors = edge.vectors.to(theta.dtype)  # [k, n_local]
        args = (
            pl_module, selector, theta, vectors, edge.sigma, batch, shard,
            AblationSettings(self.buckets, self.n_random, self.seed),
        )  # fmt: skip
        shape = {
            "edge_step": edge.step,
            "sigma": edge.sigma[:4].tolist(),
            "n_sequences": float(batch["weight"].sum()),
            "n_rows": int(batch["labels"].shape[0]),
        }
        return Deferred(((ablation_measurements, args),), partial(self._result, shape))

    def _result(self, shape: dict[str, Any], outputs: list[Any]) -> Result:
        ((result, removals, unseen_dacc, edge_dim),) = outputs
        base_loss, base_acc = result["base_loss"], result["base_acc"]
        d_acc = result["edge_acc"] - base_acc
        d_loss = result["edge_loss"] - base_loss
        acc_r, acc_m = result["acc_random"], result["acc_matched"]
        scalars = {
            "ablation/edge_dacc": d_acc,
            "ablation/edge_dloss": d_loss,
            "ablation/v1_dacc": removals["v1"]["dacc"],
            "ablation/v1_dloss": removals["v1"]["dloss"],
            "ablation/bulk_dacc": removals["bulk"]["dacc"],
            "ablation/bulk_dloss": removals["bulk"]["dloss"],
            "ablation/random_dacc_mean": acc_r["random_mean"],
            "ablation/random_dacc_sd": acc_r["random_sd"],
            "ablation/ratio": acc_r["ratio"],
            "ablation/edge_z": acc_r["z"],
            "ablation/matched_dacc_mean": acc_m["random_mean"],
            "ablation/matched_dacc_sd": acc_m["random_sd"],
            "ablation/matched_ratio": acc_m["ratio"],
            "ablation/matched_z": acc_m["z"],
            "ablation/shrink_dacc": result["shrink_dacc"],
            "ablation/shrink_dloss": result["shrink_dloss"],
            "ablation/shrink_ratio": result["shrink_ratio"],
            "ablation/shrink_factor": result["shrink_factor"],
            "ablation/shrink_norm_dacc": result["shrink_norm_dacc"],
            "ablation/shrink_norm_dloss": result["shrink_norm_dloss"],
            "ablation/shrink_norm_ratio": result["shrink_norm_ratio"],
            "ablation/base_acc": base_acc,
            "ablation/displacement": result["displacement"],
            "ablation/theta_sq_removed_frac": result["theta_sq_removed_frac"],
            "ablation/shrink_theta_sq_removed_frac": result["shrink_theta_sq_removed_frac"],
            "ablation/edge_dacc_unseen": unseen_dacc,
            # 0: the control moved accuracy by less than one example's worth, so its ratio
            # is left out (NaN) instead of dividing by a floor.
            "ablation/ratio_resolved": float(acc_r["ratio_resolved"]),
            "ablation/matched_ratio_resolved": float(acc_m["ratio_resolved"]),
            "ablation/shrink_ratio_resolved": float(result["shrink_ratio_resolved"]),
            "ablation/shrink_norm_ratio_resolved": float(result["shrink_norm_ratio_resolved"]),
        }
        fields = {
            **shape,
            "edge_dim": edge_dim,
            "base_acc": base_acc,
            "base_loss": base_loss,
            "edge": {
                "dacc": d_acc,
                "dloss": d_loss,
                "displacement": result["displacement"],
                "theta_sq_removed_frac": result["theta_sq_removed_frac"],
            },
            "shrink": _shrink_fields(result, "shrink"),
            "shrink_norm": _shrink_fields(result, "shrink_norm"),
            "theta_norm": result["theta_norm"],
            "v1": removals["v1"],
            "bulk": removals["bulk"],
            "edge_dacc_unseen": unseen_dacc,
            "displacement": result["displacement"],
            "random_dacc": result["random_dacc"],
            "random_dloss": result["random_dloss"],
            "matched_dacc": result["matched_dacc"],
            "matched_dloss": result["matched_dloss"],
            "acc_random": acc_r,
            "loss_random": result["loss_random"],
            "acc_matched": acc_m,
            "loss_matched": result["loss_matched"],
        }
        rows: list[list[Any]] = [
            ["edge", 0, d_acc, d_loss],
            ["v1", 0, removals["v1"]["dacc"], removals["v1"]["dloss"]],
            ["bulk", 0, removals["bulk"]["dacc"], removals["bulk"]["dloss"]],
            ["shrink", 0, result["shrink_dacc"], result["shrink_dloss"]],
            ["shrink_norm", 0, result["shrink_norm_dacc"], result["shrink_norm_dloss"]],
        ]
        for kind in ("random", "matched"):
            pairs = zip(result[f"{kind}_dacc"], result[f"{kind}_dloss"], strict=True)
            rows += [[kind, i, a, lo] for i, (a, lo) in enumerate(pairs)]
        return Result(scalars, fields, ("ablation/table", TABLE_COLUMNS, rows))
