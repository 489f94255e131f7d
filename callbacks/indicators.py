"""IndicatorCallback: time series of signals that may announce grokking, beside the edge.

Keys (metrics.jsonl): at every evaluation ``indicator/theta_norm`` (‖θ‖, every parameter),
``indicator/theta_norm_selected`` (‖θ_sel‖, the GramCallback's selection) and
``indicator/loss_gap`` (test/loss − train/loss, nats); on their cadences
``indicator/sharpness`` (λ₁ of the training-loss Hessian w.r.t. θ_sel on a fixed training
subset, by Lanczos on exact HVPs) with ``indicator/edge_hessian_overlap`` (cos²(v₁, its
eigenvector)), ``indicator/llc`` (local learning coefficient by SGLD on training
minibatches) with ``indicator/llc_converged`` (1/0), and on modular addition
``indicator/restricted_loss`` / ``indicator/excluded_loss``. One ``indicators`` row per
cadenced call holds the full vectors. The live run is never touched: copies of θ go through
``evaluate``, SGLD draws from a generator seeded from (``llc_seed``, step). Math:
:mod:`grokedge.experiments.sharpness`, ``.llc``, ``.restricted_loss``, ``.fourier``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import partial, reduce
from typing import Any, ClassVar

import lightning as L
import torch

from grokedge.analysis.background import Deferred, Result
from grokedge.analysis.probe_targets import pad_id_of
from grokedge.analysis.subsets import fixed_subset, loader_batches
from grokedge.analysis_log import log_scalars
from grokedge.batch import IGNORE_INDEX, Batch, to_device
from grokedge.callbacks.common import CADENCE, GROK, AnalysisCallback
from grokedge.callbacks.gram import find_gram_callback
from grokedge.checks import (
    ConfigError,
    check_choice,
    check_float,
    check_int,
    check_optional_int,
    not_allowed,
)
from grokedge.config_checks import names_python_arguments
from grokedge.edge.selection import ParameterSelector
from grokedge.experiments.fourier import answer_power_spectrum, key_frequencies
from grokedge.experiments.llc import (
    DEFAULT_BURN_IN,
    DEFAULT_CHAINS,
    DEFAULT_CONVERGENCE_TOL,
    DEFAULT_DRAWS,
    DEFAULT_LOCALIZATION,
    DEFAULT_R_HAT_MAX,
    DEFAULT_STEP_SIZE,
    SGLDConfig,
    effective_n_beta,
    estimate_llc,
)
from grokedge.experiments.perturbation import BucketedEvaluate, flat_evaluator
from grokedge.experiments.restricted_loss import restricted_excluded_loss
from grokedge.experiments.sharpness import edge_hessian_overlap, flat_hvp, top_hessian_eigenpairs
from grokedge.experiments.subspaces import theta_norms
from grokedge.functional import analysed_module

INDICATORS_KEY = "callbacks.indicators"
INDICATORS = "indicators"
SHARPNESS, LLC, FOURIER = "sharpness", "llc", "fourier"
DTYPES = {"float32": torch.float32, "float64": torch.float64}
LLC_STREAM = 7919
"""Mixed into the SGLD generator's seed: a stream apart from the batches' ((seed, index))."""


@dataclass(frozen=True)
class SharpnessSettings:
    """Lanczos on the fixed training subset (the callback's knobs of the same names)."""

    k: int
    tol: float
    max_iter: int | None
    lanczos_seed: int
    hvp_dtype: str
    buckets: int


@dataclass(frozen=True)
class LLCSettings:
    """SGLD over θ_sel on training minibatches (the callback's ``llc_*`` knobs)."""

    sgld: SGLDConfig
    batch_size: int
    convergence_tol: float
    r_hat_max: float


class MinibatchLoss:
    """``(w [p], generator) -> mean loss`` on ``batch_size`` training sequences drawn with
    replacement (rows weighted by their multiplicity) from the whole training ``batch``.
    Module-level and picklable (it travels to the worker process)."""

    def __init__(self, pl_module: Any, selector: ParameterSelector, batch: Batch, size: int):
        self.evaluate = flat_evaluator(pl_module.evaluate, selector, analysed_module(pl_module))
        self.batch, self.size = batch, size
        # The draw's probabilities, once: __call__ runs at every SGLD step.
        self.weight = batch["weight"].to("cpu", torch.float64)

    def __call__(self, w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        rows = torch.multinomial(self.weight, self.size, replacement=True, generator=generator)
        rows = rows.to(self.batch["labels"].device)
        sub = {key: value[rows] for key, value in self.batch.items()}
        sub["weight"] = torch.ones_like(sub["weight"])  # the draw already weighted the rows
        return self.evaluate(w, sub)[0]


def sharpness_job(pl_module: Any, selector: ParameterSelector, theta: torch.Tensor,
                  batch: Batch, direction: torch.Tensor | None,
                  settings: SharpnessSettings) -> dict[str, Any]:  # fmt: skip
    """Top-k Hessian eigenvalues of the loss on ``batch`` at θ_sel = ``theta`` [p] and the
    squared cosines of ``direction`` [p] (v₁; None before the first window) with their
    eigenvectors. Module-level: it may run in the worker process, as the other jobs."""
    dtype, net = DTYPES[settings.hvp_dtype], analysed_module(pl_module)
    evaluate = BucketedEvaluate(pl_module.evaluate, selector, net, batch, settings.buckets, dtype)
    loss, point = evaluate.loss_fn(), theta.to(dtype)
    values, vectors = top_hessian_eigenpairs(
        flat_hvp(loss, point), point, settings.k, tol=settings.tol,
        max_iter=settings.max_iter, seed=settings.lanczos_seed,
    )  # fmt: skip
    overlap = None
    if direction is not None and float(direction.norm()) > 0:
        overlap = edge_hessian_overlap(vectors, direction.cpu()).tolist()
    return {"eigenvalues": values.tolist(), "overlap": overlap}


def llc_job(pl_module: Any, selector: ParameterSelector, theta: torch.Tensor, batch: Batch,
            settings: LLCSettings, seed: int) -> dict[str, Any]:  # fmt: skip
    """λ̂ at θ_sel = ``theta`` [p] (a copy; nothing is modified) on the training ``batch``
    (every training sequence, deduplicated rows with multiplicities); L_n(w*) is the loss
    on the whole of it."""
    n = int(round(float(batch["weight"].sum())))
    loss = MinibatchLoss(pl_module, selector, batch, settings.batch_size)
    with torch.no_grad():
        init_loss = float(loss.evaluate(theta, batch)[0])
    generator = torch.Generator().manual_seed(seed)
    est = estimate_llc(
        loss, theta.detach().clone(), n, settings.sgld, generator, init_loss=init_loss,
        convergence_tol=settings.convergence_tol, r_hat_max=settings.r_hat_max,
    )  # fmt: skip
    return {
        "llc": est.llc, "per_chain": est.per_chain, "init_loss": est.init_loss,
        "converged": est.converged, "r_hat": est.r_hat, "n": n,
        "n_beta": effective_n_beta(n, settings.sgld),
        "loss_trace": est.loss_trace.tolist(),
    }  # fmt: skip


def fourier_job(
    pl_module: Any, grid: Batch, index: torch.Tensor, train_mask: torch.Tensor, n_freq: int
) -> dict[str, Any]:
    """Restricted and excluded loss at the key frequencies of the answer logits of every
    pair (a, b): ``grid`` holds the p² examples, ``index`` [p²] their a·p + b,
    ``train_mask`` [p, p] the training pairs."""
    p = train_mask.shape[0]
    with torch.no_grad():
        logits = pl_module.evaluate({}, grid).logits
    answer = (grid["labels"] != IGNORE_INDEX).int().argmax(dim=1)  # the answer's position
    rows = logits[torch.arange(len(answer), device=logits.device), answer].cpu()
    full = torch.empty_like(rows).index_copy_(0, index, rows)  # row a·p + b is the pair (a, b)
    freqs = key_frequencies(answer_power_spectrum(full), n_freq)
    full = full.view(p, p, -1)
    restricted, excluded = restricted_excluded_loss(full, train_mask, freqs)
    return {"restricted": float(restricted), "excluded": float(excluded), "key_frequencies": freqs}


class IndicatorCallback(AnalysisCallback):
    """Indicators of grokking beside the spectral edge (see the module docstring).

    Needs a :class:`~grokedge.callbacks.gram.GramCallback` (its selected parameters θ_sel
    and its edge v₁). Cadenced parts run on the steps that are multiples of their own
    ``*_every`` (None: off), all of them once at the grok step (``at_grok``) and at the end
    (``at_end``).

    Args (each with its comment in conf/callbacks/indicator_series.yaml):
        sharpness_every, llc_every, fourier_every: steps between calls (None: off).
        n_sequences, sample, subset_seed, eval_set: the sharpness' fixed subset (training set).
        k, lanczos_tol, lanczos_max_iter, lanczos_seed, hvp_dtype, buckets: the Lanczos.
        llc_step_size, llc_localization, llc_n_beta, llc_chains, llc_draws, llc_burn_in:
            :class:`grokedge.experiments.llc.SGLDConfig`; llc_batch_size (sequences per
            minibatch), llc_convergence_tol, llc_r_hat_max, llc_seed: the rest of the SGLD.
        n_frequencies: key frequencies of the restricted/excluded loss.
        at_grok, at_end, tables, background, background_steps, config_key: as
            ``AblationCallback``.

    Example::

        >>> indicators = IndicatorCallback(sharpness_every=100, llc_every=200)
        >>> callbacks = [GramCallback(), indicators]  # the Gram first: θ_sel and v₁ are its
        >>> L.Trainer(callbacks=callbacks).fit(module, datamodule)  # doctest: +SKIP
    """

    analysis = INDICATORS
    supports_background = True
    needs_edge = False  # θ_sel from the selector; v₁ only where a window exists
    schedule_defaults: ClassVar[Mapping[str, Any]] = dict(
        n_sequences=512, eval_set="train", tables=False
    )

    @names_python_arguments
    def __init__(
        self,
        sharpness_every: int | None = 500,
        llc_every: int | None = 1000,
        fourier_every: int | None = 500,
        k: int = 3,
        lanczos_tol: float = 1e-3,
        lanczos_max_iter: int | None = None,
        lanczos_seed: int = 0,
        hvp_dtype: str = "float32",
        buckets: int = 4,
        llc_step_size: float = DEFAULT_STEP_SIZE,
        llc_localization: float = DEFAULT_LOCALIZATION,
        llc_n_beta: float | None = None,
        llc_chains: int = DEFAULT_CHAINS,
        llc_draws: int = DEFAULT_DRAWS,
        llc_burn_in: int = DEFAULT_BURN_IN,
        llc_batch_size: int = 32,
        llc_convergence_tol: float = DEFAULT_CONVERGENCE_TOL,
        llc_r_hat_max: float = DEFAULT_R_HAT_MAX,
        llc_seed: int = 0,
        n_frequencies: int = 4,
        config_key: str = INDICATORS_KEY,
        **schedule: Any,
    ) -> None:
        key = config_key
        if "every" in schedule:  # the base cadence follows from the three below
            raise TypeError(f"{type(self).__name__}.__init__() got an unexpected keyword 'every'")
        self.cadences = {
            SHARPNESS: check_optional_int(f"{key}.sharpness_every", sharpness_every, 1),
            LLC: check_optional_int(f"{key}.llc_every", llc_every, 1),
            FOURIER: check_optional_int(f"{key}.fourier_every", fourier_every, 1),
        }
        on = [every for every in self.cadences.values() if every is not None]
        # One base cadence for the scheduler: the steps where at least one part may be due.
        super().__init__(config_key=key, every=reduce(math.gcd, on) if on else None, **schedule)
        self.sharpness = SharpnessSettings(
            check_int(f"{key}.k", k, 1),
            check_float(f"{key}.lanczos_tol", lanczos_tol, 0.0),
            check_optional_int(f"{key}.lanczos_max_iter", lanczos_max_iter, 1),
            check_int(f"{key}.lanczos_seed", lanczos_seed, 0),
            check_choice(f"{key}.hvp_dtype", hvp_dtype, tuple(DTYPES)),
            check_int(f"{key}.buckets", buckets, 1),
        )
        sgld = {
            "step_size": llc_step_size, "localization": llc_localization, "n_beta": llc_n_beta,
            "chains": llc_chains, "draws": llc_draws, "burn_in": llc_burn_in,
        }  # fmt: skip
        try:  # SGLDConfig's own checks, under this callback's names
            config = SGLDConfig(**sgld)
        except ConfigError as e:
            raise not_allowed(f"{key}.llc_{e.key}", e.value, e.allowed) from e
        tol = check_float(f"{key}.llc_convergence_tol", llc_convergence_tol, 0.0, None, True)
        r_hat = check_float(f"{key}.llc_r_hat_max", llc_r_hat_max, 1.0)
        batch = check_int(f"{key}.llc_batch_size", llc_batch_size, 1)
        self.llc = LLCSettings(config, batch, tol, r_hat)
        self.llc_seed = check_int(f"{key}.llc_seed", llc_seed, 0)
        self.n_frequencies = check_int(f"{key}.n_frequencies", n_frequencies, 1)
        self.selector: ParameterSelector | None = None
        self.modulus: int | None = None
        self.part_calls = {SHARPNESS: 0, LLC: 0, FOURIER: 0}
        self._trigger = GROK
        self._train_set: Batch | None = None
        self._grid: tuple[Batch, torch.Tensor, torch.Tensor] | None = None

    def idle_reason(self, max_steps: int, start_step: int, can_grok: bool) -> str | None:
        return None  # the cheap indicators fire at every evaluation

    @names_python_arguments
    def check_data(self, datamodule: Any) -> None:
        """``fourier_every`` on a modular task needs a + b mod p with every pair (a, b)."""
        if self.cadences[FOURIER] is None or datamodule is None:
            return
        p = getattr(datamodule, "answer_modulus", None)
        if p is None:
            return  # not a modular task: the Fourier part is simply off
        datamodule.setup("fit")
        operation = getattr(getattr(datamodule, "hparams", None), "operation", None)
        tokens = getattr(datamodule, "tokens", None)
        if operation != "add" or tokens is None or len(tokens) != p * p:
            raise not_allowed(
                f"{self.config_key}.fourier_every", self.cadences[FOURIER],
                f"null here: the restricted/excluded loss is defined for (a + b) mod p on all "
                f"p² pairs (ModularDataModule, operation add; this task: {operation})",
            )  # fmt: skip

    @names_python_arguments
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        # θ_sel is the Gram's selection: it must be in the run (else one error, the fix named).
        gram = self.gram or find_gram_callback(
            trainer, from_config=self.from_config, reader=self.label
        )
        self.selector = gram.make_selector(pl_module)
        self.modulus = getattr(trainer.datamodule, "answer_modulus", None)

    def norms(self, pl_module: L.LightningModule) -> dict[str, float]:
        """‖θ‖ over every parameter and ‖θ_sel‖ (parameter units, float64 sums)."""
        assert self.selector is not None
        return theta_norms(analysed_module(pl_module), self.selector)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.sanity_checking or self.selector is None:
            return
        values = {f"indicator/{k}": v for k, v in self.norms(pl_module).items()}
        metrics = trainer.callback_metrics
        if "test/loss" in metrics and "train/loss" in metrics:
            values["indicator/loss_gap"] = float(metrics["test/loss"] - metrics["train/loss"])
        log_scalars(trainer, pl_module, values, direct=True)

    def _run(
        self, trainer: L.Trainer, pl_module: L.LightningModule, trigger: str, direct: bool
    ) -> None:
        if trigger == CADENCE and not self.due(trainer.global_step, trigger):
            return  # a multiple of the base cadence where no part is due
        self._trigger = trigger  # analyse() runs every part at the grok step and the end
        super()._run(trainer, pl_module, trigger, direct)

    def due(self, step: int, trigger: str) -> list[str]:
        """The parts a call at ``step`` runs (every enabled one outside the cadence)."""
        parts = [name for name, every in self.cadences.items() if every is not None]
        if self.modulus is None and FOURIER in parts:
            parts.remove(FOURIER)
        if trigger != CADENCE:
            return parts
        return [name for name in parts if step % self.cadences[name] == 0]

    def training_set(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Batch:
        """Every training sequence, merged into one batch (rows with multiplicities)."""
        if self._train_set is None:
            dm = trainer.datamodule
            index = list(getattr(dm, "eval_names", ("test",))).index("train")
            loader = dm.val_dataloader()[index]
            batches = loader_batches(loader, getattr(pl_module, "batch_keys", None))
            batch = fixed_subset(batches, None, 0, pad_id=pad_id_of(dm))
            self._train_set = to_device(batch, pl_module.device)
        return self._train_set

    def pair_grid(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple:
        """Every pair (a, b) as one batch, its a·p + b and the [p, p] training mask."""
        if self._grid is None:
            dm, p = trainer.datamodule, self.modulus
            assert p is not None
            tokens, labels = dm.tokens, dm.labels
            grid = {"tokens": tokens, "labels": labels, "weight": torch.ones(len(tokens))}
            index = tokens[:, 0] * p + tokens[:, 2]
            mask = torch.zeros(p * p, dtype=torch.bool)
            mask[index[dm.train_rows]] = True
            self._grid = (to_device(grid, pl_module.device), index, mask.view(p, p))
        return self._grid

    def analyse(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> Deferred:
        """θ now, the deferred parts due at ``step`` (a worker can evaluate a copy)."""
        assert self.gram is not None and self.selector is not None
        parts = self.due(step, self._trigger)
        net = analysed_module(pl_module)
        theta = self.selector.flatten(net)
        edge = self.gram.edge
        direction = None if edge is None else edge.vectors[:1]
        if direction is not None and self.gram.shard is not None and self.gram.shard.sharded:
            direction = self.gram.gather_vectors(direction)  # whole v₁ for the overlap
        jobs: list[tuple[Any, tuple]] = []
        fields: dict[str, Any] = {"parts": parts, **self.norms(pl_module)}
        if SHARPNESS in parts:
            batch = self.subset(trainer, pl_module)
            fields["n"] = float(batch["weight"].sum())  # the subset's sequences, as drawn
            v1 = None if direction is None else direction[0].to(torch.float64)
            args = (pl_module, self.selector, theta, batch, v1, self.sharpness)
            jobs.append((sharpness_job, args))
        if LLC in parts:
            seed = hash((self.llc_seed, step, LLC_STREAM))  # ints: same in every process
            batch = self.training_set(trainer, pl_module)
            jobs.append((llc_job, (pl_module, self.selector, theta, batch, self.llc, seed)))
        if FOURIER in parts:
            jobs.append((fourier_job, (pl_module, *self.pair_grid(trainer, pl_module),
                                       self.n_frequencies)))  # fmt: skip
        fields.update(edge_step=None if edge is None else edge.step, p_selected=theta.numel())
        return Deferred(tuple(jobs), partial(self._result, parts, fields))

    def _result(self, parts: list[str], fields: dict[str, Any], outputs: list[Any]) -> Result:
        scalars: dict[str, float] = {}
        for name, out in zip(parts, outputs, strict=True):
            self.part_calls[name] += 1
            fields[name] = out
        if SHARPNESS in fields:
            s = fields[SHARPNESS]
            s.update(k=self.sharpness.k, n_sequences=fields.pop("n"), eval_set=self.eval_set)
            scalars["indicator/sharpness"] = s["eigenvalues"][0]
            if s["overlap"] is not None:
                scalars["indicator/edge_hessian_overlap"] = s["overlap"][0]
        if LLC in fields:
            fields[LLC]["sgld"] = asdict(self.llc.sgld)
            scalars["indicator/llc"] = fields[LLC]["llc"]
            scalars["indicator/llc_converged"] = float(fields[LLC]["converged"])
        if FOURIER in fields:
            scalars["indicator/restricted_loss"] = fields[FOURIER]["restricted"]
            scalars["indicator/excluded_loss"] = fields[FOURIER]["excluded"]
        return Result(scalars, fields)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()  # first: it collects the worker's finished calls
        return {**state, "part_calls": {**self.part_calls}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict:
            self.part_calls.update(state_dict.get("part_calls", {}))
