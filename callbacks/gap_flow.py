"""GapFlowCallback: the terms of the gap flow equation, measured at the Gram windows.

docs/theory.md §1 (the equation), docs/gap_flow.md (how every symbol is estimated). At each
analysed window (every ``every`` optimizer steps, on the GramCallback's newest edge) it
evaluates, through the module's ``evaluate`` (``grokedge.functional``) on the whole
training set (functional: the live model and the optimizer are never touched): the
curvatures h_k, h_{k+1} of the training loss along v_k, v_{k+1} (exact HVP), the gradient
projections G_k, G_{k+1}, and with the window's signal strengths d_j = σ_j², η, ω and W
the three terms, their sum (the predicted dg/dt) and the balance Term 3 / |Term 2|.

The observed dg/dt comes from the spectra alone (a listener on every Gram window, no
p-sized work): the change of g = d_k − d_{k+1} (the analysed window's k) over the interval
*before* the analysed window (``observed_dgdt``, known at once) and over the interval
*after* it (the forward pair: a genuine prediction, completed at the next window). The
running agreement of predicted and observed (Pearson, Spearman, sign agreement) is logged
as pairs complete and written to ``summary.json``. The math lives in
:mod:`grokedge.experiments.gap_flow`.

Under DDP with a sharded GramCallback (``trainer=ddp``) the edge vectors, and the modes
beyond ``top_k`` formed from the window, are this rank's slices; the curvatures and the
gradient projections are taken on the whole (replicated) θ_sel, so each analysed window
all-gathers the two vectors v_k, v_{k+1} it needs (every rank calls it, with the same k:
σ is global). Everything else (σ, the newest delta's projections) comes from the Gram's
summed W×W matrices. Every rank computes the same terms; rank 0 writes them. On one
process nothing is communicated and the numbers are the unsharded ones bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import lightning as L
import torch
from torch import Tensor

from grokedge.analysis.background import Result
from grokedge.analysis_log import log_scalars, log_table
from grokedge.callbacks.common import AnalysisCallback
from grokedge.checks import check_choice, check_int, check_optional_int, not_allowed
from grokedge.config_checks import names_python_arguments
from grokedge.edge.geometry import kstar_ratio
from grokedge.edge.spectrum import EdgeState
from grokedge.experiments.gap_flow import gap_flow_at, mode_coefficients, newest_grad_projections
from grokedge.experiments.gap_flow_record import (
    BACKWARD,
    DRIVINGS,
    EFFECTIVE,
    FORWARD,
    RAW,
    GapFlowRecord,
)
from grokedge.experiments.perturbation import BucketedEvaluate
from grokedge.functional import analysed_module
from grokedge.optimizer_facts import decay_of, lr_of, optimizer_for

GAP_FLOW_KEY = "callbacks.gap_flow"
GAP_FLOW = "gap_flow"
GAP_FLOW_SUMMARY = "gap_flow_summary"

DTYPES = {"float32": torch.float32, "float64": torch.float64}

TERM_METRICS = {  # GapFlowTerms field -> gapflow/* metric
    "k": "gapflow/k",
    "gap": "gapflow/gap",
    "d_k": "gapflow/d_k",
    "d_k1": "gapflow/d_k1",
    "h_k": "gapflow/h_k",
    "h_k1": "gapflow/h_k1",
    "grad_k": "gapflow/grad_k",
    "grad_k1": "gapflow/grad_k1",
    "lr": "gapflow/lr",
    "weight_decay": "gapflow/weight_decay",
    "window": "gapflow/window",
    "term1": "gapflow/term1",
    "term2": "gapflow/term2",
    "term3": "gapflow/term3",
    "predicted": "gapflow/predicted_dgdt",
    "balance": "gapflow/balance",
    "grad_eff_k": "gapflow/grad_eff_k",
    "grad_eff_k1": "gapflow/grad_eff_k1",
    "term3_eff": "gapflow/term3_eff",
    "predicted_eff": "gapflow/predicted_eff_dgdt",
    "balance_eff": "gapflow/balance_eff",
}


class GapFlowCallback(AnalysisCallback):
    """The gap flow equation's terms, its predicted dg/dt and the observed one, per window.

    Needs a :class:`~grokedge.callbacks.gram.GramCallback` before it in the callback list.

    Args:
        every: optimizer steps between analysed windows (None: none). A multiple of the
            Gram interval (each analysed step is then a window step); the default, the
            Gram interval, analyses every window.
        at_grok, at_end: also analyse at the detected grok step / on the final weights
            (their edge is the newest window, possibly older than the weights).
        n_sequences: training sequences the training loss runs over (None: the whole
            training set, the default; its evaluation set ``eval_set``, "train").
        sample, subset_seed: as ``AblationCallback``.
        eval_set: the evaluation set whose loss is "the training loss" (default "train").
        k: the mode whose gap is followed, 1-based (None: k* = argmax σ_j/σ_{j+1} of each
            analysed window; modes beyond ``callbacks.gram.top_k`` are formed from the
            window's deltas).
        hvp_dtype: precision of the HVPs and the gradient (``float32`` | ``float64``).
        driving: which gradient projection feeds the balance the predicted class reads
            (``gapflow/balance_used``): ``raw`` (G_j = ∇L·v_j, the equation as written)
            or ``effective`` (G_j^eff from the newest delta's gradient part; see
            :mod:`grokedge.experiments.gap_flow`). Both are always logged.
        buckets: length buckets of the evaluation (see ``AblationCallback``; default 1:
            a training set is small, and on Dyck's 36 rows one bucket costs 0.57 of four).
        tables, config_key: as ``AblationCallback``.

    Logs (``global_step``): ``gapflow/{k, gap, d_k, d_k1, h_k, h_k1, grad_k, grad_k1, lr,
    weight_decay, window, term1, term2, term3, predicted_dgdt, balance}`` and their
    effective-gradient forms ``gapflow/{grad_eff_k, grad_eff_k1, term3_eff,
    predicted_eff_dgdt, balance_eff}`` at each analysed window, ``gapflow/balance_used``;
    ``gapflow/observed_dgdt`` (change of g per step over the interval before it);
    ``gapflow/{corr, spearman, sign_agreement, pairs}_{backward,forward}`` and
    ``..._eff_{backward,forward}`` (running agreement of the predicted and observed dg/dt;
    forward pairs complete one window later).

    Writes one ``gap_flow`` row per analysed window and a ``gap_flow_summary`` row (all
    pairs and their agreement) at the end of training; ``summary_fields()`` puts the
    agreement and the late balance into ``summary.json``.

    Example:
        >>> callbacks = [GramCallback(interval=100), GapFlowCallback(every=100)]
        >>> L.Trainer(callbacks=callbacks).fit(module, datamodule)  # doctest: +SKIP
        >>> callbacks[1].agreement("forward")["spearman"]           # doctest: +SKIP
    """

    analysis = GAP_FLOW
    needs_edge = True

    schedule_defaults: ClassVar[Mapping[str, Any]] = {
        "every": 100,
        "at_grok": False,
        "n_sequences": None,
        "eval_set": "train",
    }

    @names_python_arguments
    def __init__(
        self,
        k: int | None = None,
        hvp_dtype: str = "float32",
        driving: str = RAW,
        buckets: int = 1,
        config_key: str = GAP_FLOW_KEY,
        **schedule: Any,
    ) -> None:
        super().__init__(config_key=config_key, **schedule)
        key = config_key
        self.k = check_optional_int(f"{key}.k", k, 1)
        self.hvp_dtype = check_choice(f"{key}.hvp_dtype", hvp_dtype, tuple(DTYPES))
        self.driving = check_choice(f"{key}.driving", driving, DRIVINGS)
        self.buckets = check_int(f"{key}.buckets", buckets, 1)
        self.record = GapFlowRecord()  # pairs, balances and agreement (Lightning-free)

    @names_python_arguments
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or self.gram is None:
            return
        key, interval = self.config_key, self.gram.interval
        if self.every is not None and self.every % interval:
            raise not_allowed(
                f"{key}.every",
                self.every,
                f"a multiple of the Gram interval ({interval}), so that every analysed step is a "
                "window",
            )
        if self.k is not None and self.k + 1 > self.gram.top_k:
            raise not_allowed(
                f"{key}.k", self.k, f"k + 1 <= callbacks.gram.top_k ({self.gram.top_k})"
            )
        if self.gram.top_k < 2:
            raise ValueError(
                f"{key}: needs callbacks.gram.top_k >= 2 (modes k and k+1), got {self.gram.top_k}"
            )
        self.gram.add_listener(self.on_edge)

    # ------------------------------------------------------------- every Gram window

    def on_edge(self, trainer: L.Trainer, pl_module: L.LightningModule, state: EdgeState) -> None:
        """Record the window's spectrum and complete a pending forward comparison."""
        if self.record.on_window(state.step, state.sigma):
            log_scalars(trainer, pl_module, self.record.agreement_scalars(FORWARD))

    # -------------------------------------------------------------- analysed windows

    def analyse(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> Result:
        assert self.gram is not None and self.gram.edge is not None
        assert self.gram.selector is not None
        edge, selector = self.gram.edge, self.gram.selector
        net = analysed_module(pl_module)
        found = optimizer_for(trainer.optimizers, net, selector.names[0])
        group = found[1] if found is not None else None
        lr = lr_of(group) if group is not None else math.nan
        wd = decay_of(group) if group is not None else math.nan
        batch = self.subset(trainer, pl_module)
        dtype = DTYPES[self.hvp_dtype]
        theta = selector.flatten(net).to(dtype)
        loss_fn = BucketedEvaluate(
            pl_module.evaluate, selector, net, batch, self.buckets, dtype
        ).loss_fn()
        k = kstar_ratio(edge.sigma) if self.k is None else self.k
        vectors, newest = edge.vectors, edge.grad_proj[-1]
        if k + 1 > edge.top_k and k + 1 <= edge.count and self.gram.window is not None:
            # k* beyond the materialised edge vectors (k* = 4 of W = 5 is common): form
            # v_k, v_k+1 from the window (the edge's own, still unchanged at this step).
            modes = list(range(1, k + 2))
            coeffs = mode_coefficients(edge.sigma, edge.eigvecs, modes)
            vectors = self.gram.window.combine(coeffs)
            newest = newest_grad_projections(edge.sigma, edge.eigvecs, edge.cross_gram, modes)
        if self.gram.shard is not None and self.gram.shard.sharded:
            vectors = self._whole_modes(vectors, k)
        terms = gap_flow_at(
            edge.sigma,
            vectors,
            edge.count,
            loss_fn,
            theta,
            lr,
            wd,
            k,
            grad_proj_newest=newest,
            steps_per_delta=self.gram.interval,
        )
        fields: dict[str, Any] = {
            "edge_step": edge.step,
            "n_sequences": float(batch["weight"].sum()),
            "eval_set": self.eval_set,
            "hvp_dtype": self.hvp_dtype,
        }
        if terms is None:
            fields["skipped"] = "modes k and k+1 not both available"
            return Result({}, fields)

        scalars = {metric: float(getattr(terms, name)) for name, metric in TERM_METRICS.items()}
        observed = self.record.record(edge.step, terms, step)
        scalars["gapflow/observed_dgdt"] = observed
        scalars["gapflow/balance_used"] = (
            terms.balance if self.driving == RAW else terms.balance_eff
        )
        scalars.update(self.record.agreement_scalars(BACKWARD))
        fields.update(terms.as_dict(), observed_dgdt=observed)
        return Result(scalars, fields)

    def _whole_modes(self, vectors: Tensor, k: int) -> Tensor:
        """Rows k−1, k (v_k, v_{k+1}, 0-based) of the sliced ``vectors`` [m, n_local]
        gathered whole, at their own row indices of an [min(k + 1, m), p] tensor.

        ``gap_flow_at`` reads only those two rows (and the row count, to decide whether
        both modes exist), so the rows before them are left zero instead of being
        gathered. Collective: one all-gather of at most two rows, on every rank.
        """
        assert self.gram is not None
        lo, hi = max(k - 1, 0), min(k + 1, vectors.shape[0])
        pair = self.gram.gather_vectors(vectors[lo:hi])
        whole = pair.new_zeros(hi, pair.shape[-1])
        whole[lo:hi] = pair
        return whole

    # ------------------------------------------------------------------- agreement

    def agreement(self, which: str, driving: str = RAW) -> dict[str, float]:
        """``prediction_agreement`` of the ``backward`` or ``forward`` pairs so far."""
        return self.record.agreement(which, driving)

    def late_balances(self, grok_step: int | None) -> tuple[list[float], list[str]]:
        """Balances (of the ``driving`` estimator) of the analysed windows and their
        phases, for the predicted class."""
        assert self.phases is not None
        balances = self.record.balances_of(self.driving)
        return (
            [float(b) for _, b in balances],
            [self.phases.label(int(step), grok_step) for step, _ in balances],
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        assert self.phases is not None and self.analysis_log is not None
        grok = getattr(pl_module, "grok_step", None)
        step, record = trainer.global_step, self.record
        self.analysis_log.write(
            GAP_FLOW_SUMMARY,
            step,
            self.phases.label(step, grok),
            grok,
            driving=self.driving,
            backward=record.agreement(BACKWARD),
            forward=record.agreement(FORWARD),
            backward_eff=record.agreement(BACKWARD, EFFECTIVE),
            forward_eff=record.agreement(FORWARD, EFFECTIVE),
            backward_pairs=record.backward,
            forward_pairs=record.forward,
            balances=record.balances,
        )
        if self.tables and record.backward:
            columns = ["step", "k", "predicted", "predicted_eff", "observed_backward"]
            rows = [list(p) for p in record.backward]
            log_table(trainer, "gapflow/pairs_table", columns, rows, step)
        # Lightning forbids self.log in on_train_end: straight to the loggers.
        log_scalars(trainer, pl_module, record.agreement_scalars(FORWARD), direct=True)

    def summary_fields(self) -> dict[str, Any]:
        """Fields for ``summary.json``: the predictive agreement of the equation."""
        return self.record.summary_fields(self.driving)

    # -------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | self.record.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        super().load_state_dict(state_dict)
        self.record.load_state_dict(state_dict)
