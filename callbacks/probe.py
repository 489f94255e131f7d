"""ProbeCallback: how well the hidden states encode the task's variables.

docs/theory.md §3, experiment 5, with the grouped cross-validation §5 asks for. On a fixed
evaluation subset of the test set, the hidden states of one block (default: the last
block's output before the final LayerNorm, what the paper probes) at every position where
the task declares a target (``datamodule.probe_targets(batch)``: Dyck the depth; modular
arithmetic the answer and both operands at the last position; SCAN the actions still to
emit) are regressed on that target by three scikit-learn probes: linear (Ridge α = 1),
quadratic (degree-2 features + Ridge α = 10) and an MLP (64 hidden, α = 0.01, early
stopping), each scored by R² under K-fold cross-validation grouped by string (all
positions of one string, in however many rows it appears, on one side of every split;
mean ± sd over the folds), or the paper's single random 70/30 split of positions.

The forward pass is a plain ``torch.no_grad`` read of the live network in eval mode; the
probes use their own seeds (numpy), so training is unaffected. The probes themselves live
in :mod:`grokedge.experiments.probes`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, ClassVar

import lightning as L

from grokedge.analysis.background import Deferred, Result
from grokedge.analysis.probe_targets import (
    check_names_declared,
    check_target_names,
    probe_data,
    probe_target_tensors,
    task_label,
)
from grokedge.callbacks.common import AnalysisCallback
from grokedge.checks import check_bool, check_choice, check_choices, check_int, not_allowed
from grokedge.config_checks import names_python_arguments
from grokedge.experiments.probes import (
    GROUPED_KFOLD,
    MLP,
    PROBE_KINDS,
    PROTOCOLS,
    ProbeConfig,
    ProbeScore,
    score_targets,
)
from grokedge.functional import TRACE, check_block, trace_of

PROBE_KEY = "callbacks.probe"
PROBE = "probe"

TABLE_COLUMNS = ["target", "kind", "r2", "r2_sd", "folds"]


def probe_metric(target: str, kind: str, primary: bool, suffix: str = "") -> str:
    """``probe/{kind}_r2{suffix}`` for the task's primary target, else
    ``probe/{target}_{kind}_r2{suffix}``."""
    return f"probe/{kind}_r2{suffix}" if primary else f"probe/{target}_{kind}_r2{suffix}"


class ProbeCallback(AnalysisCallback):
    """Linear, quadratic and MLP probes of the task variables in a block's hidden states.

    Does not need a GramCallback (it reads none of the edge); with one, its phases use
    the Gram interval like the other analyses.

    Args:
        every: optimizer steps between probe fits (None, the default: no cadence, only
            at the grok step and at the end). The quadratic and MLP probes cost tens of
            seconds a call on a small CPU (docs/benchmarks.md, "Cost of callbacks=full"):
            keep this sparse.
        at_grok: also probe once when the grok step is detected.
        at_end: also probe once on the final weights (the paper's "late" probes).
        n_sequences: test sequences in the fixed subset (the paper: 300); None: all.
            ``sample``, ``subset_seed``, ``eval_set``: see ``AblationCallback``.
        block: index into the model's blocks (``ModelTrace.hidden``; decoder blocks for
            seq2seq); -1, the default, is the last block's output before the final norm.
        kinds: probes to fit, any of ``linear``, ``quadratic``, ``mlp``.
        targets: names of the task's probe targets to score (None: all it declares; the
            first declared is the *primary* one).
        protocol: ``grouped_kfold`` (folds grouped by string, mean ± sd) or
            ``paper_split`` (one random 70/30 split of positions, sd undefined).
        folds: K of the grouped K-fold (>= 2; capped at the number of strings). The
            default 3 trains each probe on 2/3 of the sequences, close to the paper's 70 %,
            and keeps the quadratic probe (a ridge on 8,384 features, O(n²) in the
            positions) at ~4 s a call on one CPU thread; 5 folds cost ~2x.
        seed: seed of the folds, the paper split and the MLP.
        mlp_max_iter: MLP epochs at most (early stopping usually ends sooner).
        quadratic_interaction_only: products x_i x_j only, no squares (the paper's literal
            "interaction features"; default false, see ``grokedge.experiments.probes``).
        quadratic_dtype: products of the quadratic ridge's normal matrix, ``float32``
            (default; summed in float64, solved in float64) or ``float64`` (~2x the
            time, the same R² to 1e-7 on Dyck; see ``grokedge.experiments.ridge``).
        background: fit the probes in a worker process while training goes on (the
            forward pass stays on the training thread): ``auto`` (default) when torch
            leaves a core idle (``torch_threads`` below the cores, one process), ``true``,
            ``false``. The same numbers; the row and scalars are written
            ``background_steps`` steps later, labelled with their own step
            (``AnalysisCallback``; docs/design.md).
        tables, background_steps, config_key: as ``AblationCallback``.

    Logs (``global_step``; kind in ``kinds``):
        ``probe/{kind}_r2`` and ``probe/{kind}_r2_sd`` for the primary target (Dyck:
        depth; modular: answer; SCAN: remaining), ``probe/{target}_{kind}_r2`` and
        ``_sd`` for every other target, ``probe/n_samples`` (positions probed).

    Writes one ``probe`` row per call (every score with its folds) and the W&B table
    ``probe/table``.

    Example:
        >>> L.Trainer(callbacks=[ProbeCallback(every=1000)]).fit(module, dm)  # doctest: +SKIP
    """

    analysis = PROBE
    supports_background = True
    background_needs_cpu = False  # the fits read numpy arrays only
    needs_edge = False
    requires = (TRACE,)

    schedule_defaults: ClassVar[Mapping[str, Any]] = {"at_end": True}

    @names_python_arguments
    def __init__(
        self,
        block: int = -1,
        kinds: Sequence[str] = PROBE_KINDS,
        targets: Sequence[str] | None = None,
        protocol: str = GROUPED_KFOLD,
        folds: int = 3,
        seed: int = 0,
        mlp_max_iter: int = 200,
        quadratic_interaction_only: bool = False,
        quadratic_dtype: str = "float32",
        config_key: str = PROBE_KEY,
        **schedule: Any,
    ) -> None:
        super().__init__(config_key=config_key, **schedule)
        key = config_key
        if isinstance(block, bool) or not isinstance(block, int):
            raise not_allowed(f"{key}.block", block, "a block index (-1: the last)")
        self.block = block
        self.kinds = check_choices(f"{key}.kinds", kinds, PROBE_KINDS)
        if targets is None:
            self.targets: tuple[str, ...] | None = None
        else:
            names = [targets] if isinstance(targets, str) else list(targets)
            if not names or not all(isinstance(n, str) for n in names):
                raise not_allowed(
                    f"{key}.targets",
                    targets,
                    "null (all the task's probe targets) or a non-empty list of their names",
                )
            self.targets = tuple(names)
        self.protocol = check_choice(f"{key}.protocol", protocol, PROTOCOLS)
        self.folds = check_int(f"{key}.folds", folds, 2)
        self.seed = check_int(f"{key}.seed", seed, 0)
        self.mlp_max_iter = check_int(f"{key}.mlp_max_iter", mlp_max_iter, 1)
        self.quadratic_interaction_only = check_bool(
            f"{key}.quadratic_interaction_only", quadratic_interaction_only
        )
        # The ridge lives beside its precisions; its module loads scikit-learn (~1 s).
        from grokedge.experiments.ridge import GRAM_DTYPES

        self.config = ProbeConfig(
            mlp_max_iter=self.mlp_max_iter,
            quadratic_interaction_only=self.quadratic_interaction_only,
            quadratic_dtype=check_choice(f"{key}.quadratic_dtype", quadratic_dtype, GRAM_DTYPES),
        )

    @names_python_arguments
    def check_module(self, pl_module) -> None:
        super().check_module(pl_module)
        check_block(f"{self.config_key}.block", self.block, pl_module)

    @names_python_arguments
    def check_data(self, datamodule: Any) -> None:
        """Before training: every chosen target is one the task declares."""
        if self.targets is not None:
            check_target_names(f"{self.config_key}.targets", list(self.targets), datamodule)

    @names_python_arguments
    def check_batch(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Before the first step, on the fixed subset: the trace (``AnalysisCallback``) and
        the probe targets (one tensor per name, shaped as the labels) and the chosen names
        among them; else one ValueError naming the DataModule and the fix."""
        super().check_batch(trainer, pl_module)
        batch = self.subset(trainer, pl_module)  # built (and cached) by the check above
        declared = probe_target_tensors(trainer.datamodule, batch, self.config_key)
        self._chosen_targets(declared, trainer.datamodule)

    def _chosen_targets(self, declared: dict, datamodule: Any) -> list[str]:
        if self.targets is None:
            return list(declared)
        # The targets returned, for a task that does not declare their names beforehand.
        key = f"{self.config_key}.targets"
        check_names_declared(key, list(self.targets), list(declared), task_label(datamodule))
        return list(self.targets)

    def analyse(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> Deferred:
        """The forward pass and the probe samples now; the fits (numpy only) deferred."""
        batch = self.subset(trainer, pl_module)
        trace = trace_of(pl_module, batch)
        hidden = trace.hidden[self.block]
        declared = probe_target_tensors(trainer.datamodule, batch, self.config_key)
        primary = next(iter(declared))
        samples = {
            name: probe_data(trainer.datamodule, pl_module, batch, hidden, declared[name])
            for name in self._chosen_targets(declared, trainer.datamodule)
        }
        shape = {
            "n_sequences": float(batch["weight"].sum()),
            "n_rows": int(batch["labels"].shape[0]),
            "n_samples": max(len(data.targets) for data in samples.values()),
        }
        # Two independent jobs, the MLP apart (each about half the work): after training
        # they run side by side, on the training thread and the worker.
        split = [[k for k in self.kinds if k != MLP], [k for k in self.kinds if k == MLP]]
        jobs = tuple(
            (score_targets, (samples, kinds, self.folds, self.seed, self.protocol, self.config))
            for kinds in split
            if kinds
        )
        return Deferred(jobs, partial(self._result, primary, shape, step))

    def _result(
        self,
        primary: str,
        shape: dict[str, Any],
        step: int,
        job_scores: list[dict[str, dict[str, ProbeScore]]],
    ) -> Result:
        scalars: dict[str, float] = {}
        scores: dict[str, dict] = {}
        rows = []
        not_converged = 0  # MLP fits stopped by mlp_max_iter
        for name in job_scores[0]:
            by_kind = {kind: s for job in job_scores for kind, s in job[name].items()}
            scores[name] = {}
            for kind in self.kinds:
                score = by_kind[kind]
                not_converged += score.not_converged
                is_primary = name == primary
                scalars[probe_metric(name, kind, is_primary)] = score.mean
                scalars[probe_metric(name, kind, is_primary, "_sd")] = score.sd
                scores[name][kind] = {
                    "mean": score.mean,
                    "sd": score.sd,
                    "per_fold": list(score.per_fold),
                }
                rows.append([name, kind, score.mean, score.sd, len(score.per_fold)])
        scalars["probe/n_samples"] = float(shape["n_samples"])
        if not_converged:
            warnings.warn(
                f"{self.label}: {not_converged} MLP probe fit(s) stopped at "
                f"mlp_max_iter={self.mlp_max_iter} before converging (step {step}); raise "
                f"{self.argument('mlp_max_iter', self.mlp_max_iter)} for a tighter MLP R²",
                RuntimeWarning,
                stacklevel=2,
            )
        fields = {
            "block": self.block,
            "primary": primary,
            "protocol": self.protocol,
            **shape,
            "mlp_not_converged": not_converged,
            "scores": scores,
        }
        return Result(scalars, fields, ("probe/table", TABLE_COLUMNS, rows))
