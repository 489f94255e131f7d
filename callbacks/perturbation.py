"""PerturbationCallback: ε-sweeps and curvature along the edge directions.

docs/theory.md §3, experiments 3 and 4. On a fixed evaluation subset of the test set, through
the module's ``evaluate`` (``GrokModule``'s, or any module's under the
``grokedge.functional`` protocol; functional: the live model and the optimizer are never
touched), with θ = the GramCallback's selected parameters and v_k its newest edge vectors:

- ε-sweep: θ + ε v_k for k = 1..``n_directions`` and ε on ``grid_points`` evenly spaced
  values in [−``max_eps``, ``max_eps``] (absolute, parameter units; the paper: 25 points in
  [−0.03, 0.03]): loss, accuracy and KL(base ‖ perturbed) of the output distributions;
- curvature v_kᵀ H v_k of the subset's test loss, two ways: the paper's central second
  difference with ε = ``fd_eps_fraction``·‖θ_sel‖ (``curvature/fd_v{k}``) and the exact
  Hessian-vector product by forward-over-reverse autodiff (``curvature/hvp_v{k}``);
- the "path-norm" points of the paper: (σ_k, |ΔL| at the largest |ε|).

Under DDP with a sharded GramCallback each rank holds a slice of every v_k; the model is
evaluated at θ + εv_k and its curvature taken along v_k, both of which need the whole
direction, so the analysed directions are all-gathered once per call (k p-vectors) and
every rank then runs the same sweep on the whole (replicated) θ. Every rank gets the same
numbers; rank 0 writes them.

The pure math lives in :mod:`grokedge.experiments.perturbation` and
:mod:`grokedge.experiments.curvature`.
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
from grokedge.batch import Batch
from grokedge.callbacks.common import AnalysisCallback
from grokedge.checks import check_choice, check_float, check_int, not_allowed
from grokedge.config_checks import names_python_arguments
from grokedge.edge.selection import ParameterSelector
from grokedge.experiments.curvature import directional_curvature, finite_difference_curvature
from grokedge.experiments.perturbation import (
    DEFAULT_BUCKETS,
    BucketedEvaluate,
    epsilon_grid,
    epsilon_sweep,
    sweep_extremes,
)
from grokedge.functional import analysed_module

PERTURBATION_KEY = "callbacks.perturbation"
PERTURBATION = "perturbation"

DTYPES = {"float32": torch.float32, "float64": torch.float64}

TABLE_COLUMNS = ["direction", "epsilon", "loss", "acc", "kl", "delta_loss"]


@dataclass(frozen=True)
class PerturbationSettings:
    """What a perturbation call measures (the callback's knobs; see its docstring)."""

    grid: list[float]
    buckets: int
    curvature: bool
    fd_eps_fraction: float
    fd_dtype: str
    hvp_dtype: str


def perturbation_measurements(
    pl_module: Any,
    selector: ParameterSelector,
    theta: torch.Tensor,
    directions: torch.Tensor,
    batch: Batch,
    settings: PerturbationSettings,
) -> tuple[list[dict[str, float]], list[tuple[float, float]], float | None]:
    """The ε-sweep rows along ``directions`` [n, p] (numbered 1..n) around ``theta`` [p],
    and per direction (central difference, exact HVP) of the subset's loss with the
    finite-difference step (None without curvature). Reads nothing of a live run: it can
    run on a copy of the module in a worker process (module-level for that reason)."""
    if len(directions) == 0:
        return [], [], None
    net = analysed_module(pl_module)
    evaluate = BucketedEvaluate(pl_module.evaluate, selector, net, batch, settings.buckets)
    sweep = epsilon_sweep(evaluate, theta, directions, settings.grid, batch)
    if not settings.curvature:
        return sweep, [], None
    fd_eps = settings.fd_eps_fraction * float(torch.linalg.vector_norm(theta.double()))
    fd_type, hvp_type = DTYPES[settings.fd_dtype], DTYPES[settings.hvp_dtype]
    fd_loss, hvp_loss = (
        BucketedEvaluate(
            pl_module.evaluate, selector, net, batch, settings.buckets, dtype
        ).loss_fn()
        for dtype in (fd_type, hvp_type)
    )
    with torch.no_grad():  # L(θ), shared by the directions' central differences
        center = float(fd_loss(theta.to(fd_type)))
    curvatures = [
        (
            finite_difference_curvature(fd_loss, theta.to(fd_type), v, eps=fd_eps, center=center),
            directional_curvature(hvp_loss, theta.to(hvp_type), v),
        )
        for v in directions
    ]
    return sweep, curvatures, fd_eps


class PerturbationCallback(AnalysisCallback):
    """ε-sweeps, KL and curvature (finite difference and exact HVP) along v_1..v_k.

    Needs a :class:`~grokedge.callbacks.gram.GramCallback` (before it in the callback
    list); directions are its top ``n_directions`` edge vectors (those with σ_k > 0).

    Args:
        every: optimizer steps between analyses (None: only at the grok step).
        at_grok: also analyse once when the grok step is detected.
        at_end: also analyse once on the final weights.
        n_sequences: test sequences in the fixed evaluation subset (the paper: 200); None:
            the whole set. ``sample``, ``subset_seed``, ``eval_set``: see
            ``AblationCallback``.
        n_directions: edge directions swept (<= ``callbacks.gram.top_k``; the paper: 4).
        grid_points: ε values (>= 3, odd keeps ε = 0 in the grid; the paper: 25).
        max_eps: the grid spans [−max_eps, max_eps] (parameter units; the paper: 0.03).
        curvature: compute v_kᵀHv_k (both ways).
        fd_eps_fraction: finite-difference step as a fraction of ‖θ_sel‖ (the paper: 1e-3).
        fd_dtype: precision of the finite-difference losses (``float32``: the paper's).
        hvp_dtype: precision of the exact HVP: ``float32`` (default) or ``float64`` (the
            whole model evaluated in double, ~2x the cost). On Dyck both agree to six
            significant digits (docs/benchmarks.md), far below the central
            difference's own error.
        buckets: evaluate the subset in this many length buckets (see ``AblationCallback``).
        tables, background, background_steps, config_key: as ``AblationCallback``.

    Logs (``global_step``; k = 1..n_directions):
        ``perturb/max_kl_v{k}`` (nats), ``perturb/max_dloss_v{k}`` (max |ΔL| over the
        grid), ``perturb/max_dacc_v{k}``, ``perturb/path_dloss_v{k}`` (|ΔL| at the largest
        |ε|), ``curvature/fd_v{k}``, ``curvature/hvp_v{k}`` (loss per squared parameter
        unit), ``curvature/fd_eps``.

    Writes one ``perturbation`` row per call (the whole sweep, the curvatures, the
    path-norm points ``[{k, sigma, abs_dloss}]``) and the W&B table ``perturb/sweep_table``.

    Example:
        >>> callbacks = [GramCallback(interval=100), PerturbationCallback(every=500)]
        >>> L.Trainer(callbacks=callbacks).fit(module, datamodule)  # doctest: +SKIP
    """

    analysis = PERTURBATION
    supports_background = True
    needs_edge = True

    schedule_defaults: ClassVar[Mapping[str, Any]] = {"every": 2000, "n_sequences": 200}

    @names_python_arguments
    def __init__(
        self,
        n_directions: int = 4,
        grid_points: int = 25,
        max_eps: float = 0.03,
        curvature: bool = True,
        fd_eps_fraction: float = 1e-3,
        fd_dtype: str = "float32",
        hvp_dtype: str = "float32",
        buckets: int = DEFAULT_BUCKETS,
        config_key: str = PERTURBATION_KEY,
        **schedule: Any,
    ) -> None:
        super().__init__(
            config_key=config_key,
            **schedule,
        )
        key = config_key
        self.n_directions = check_int(f"{key}.n_directions", n_directions, 1)
        self.grid_points = check_int(f"{key}.grid_points", grid_points, 3)
        self.max_eps = check_float(f"{key}.max_eps", max_eps, 0.0, strict_minimum=True)
        if not isinstance(curvature, bool):
            raise not_allowed(f"{key}.curvature", curvature, "true or false")
        self.curvature = curvature
        self.fd_eps_fraction = check_float(
            f"{key}.fd_eps_fraction", fd_eps_fraction, 0.0, strict_minimum=True
        )
        self.fd_dtype = check_choice(f"{key}.fd_dtype", fd_dtype, tuple(DTYPES))
        self.hvp_dtype = check_choice(f"{key}.hvp_dtype", hvp_dtype, tuple(DTYPES))
        self.buckets = check_int(f"{key}.buckets", buckets, 1)
        self.grid = epsilon_grid(self.grid_points, self.max_eps)

    @names_python_arguments
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.gram is not None and self.n_directions > self.gram.top_k:
            raise not_allowed(
                f"{self.config_key}.n_directions",
                self.n_directions,
                f"at most callbacks.gram.top_k ({self.gram.top_k})",
            )

    def analyse(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> Deferred:
        """The directions and θ now; the sweep and curvatures deferred (a worker process
        evaluates a copy of the module at θ)."""
        assert self.gram is not None and self.gram.edge is not None
        assert self.gram.selector is not None
        edge, selector = self.gram.edge, self.gram.selector
        net = analysed_module(pl_module)
        batch = self.subset(trainer, pl_module)
        theta = selector.flatten(net)
        sigma = edge.sigma.tolist()
        ks = [k for k in range(1, self.n_directions + 1) if k <= len(sigma) and sigma[k - 1] > 0]
        directions = edge.vectors[[k - 1 for k in ks]]
        if self.gram.shard is not None and self.gram.shard.sharded:
            # θ + εv and the HVP along v need whole directions: one all-gather of k rows.
            directions = self.gram.gather_vectors(directions)
        directions = directions.to(theta.dtype)
        settings = PerturbationSettings(
            self.grid, self.buckets, self.curvature, self.fd_eps_fraction,
            self.fd_dtype, self.hvp_dtype,
        )  # fmt: skip
        args = (pl_module, selector, theta, directions, batch, settings)
        shape = {
            "edge_step": edge.step,
            "sigma": sigma[: self.n_directions],
            "n_sequences": float(batch["weight"].sum()),
            "n_rows": int(batch["labels"].shape[0]),
        }
        return Deferred(((perturbation_measurements, args),), partial(self._result, ks, shape))

    def _result(self, ks: list[int], shape: dict[str, Any], outputs: list[Any]) -> Result:
        ((sweep, curvature_rows, fd_eps),) = outputs
        sigma = shape["sigma"]
        for row in sweep:  # epsilon_sweep numbers the directions it was given 1..n
            row["direction"] = ks[row["direction"] - 1]
        extremes = sweep_extremes(sweep)
        top = max(abs(e) for e in self.grid)
        path_points = []
        scalars: dict[str, float] = {}
        for k in ks:
            ext = extremes[k]
            at_edge = [
                abs(r["delta_loss"])
                for r in sweep
                if r["direction"] == k and math.isclose(abs(r["epsilon"]), top)
            ]
            path = max(at_edge) if at_edge else math.nan
            path_points.append({"k": k, "sigma": sigma[k - 1], "abs_dloss": path})
            scalars[f"perturb/max_kl_v{k}"] = ext["max_kl"]
            scalars[f"perturb/max_dloss_v{k}"] = ext["max_abs_delta_loss"]
            scalars[f"perturb/max_dacc_v{k}"] = ext["max_abs_delta_acc"]
            scalars[f"perturb/path_dloss_v{k}"] = path

        curvatures: list[dict[str, Any]] = []
        if fd_eps is not None:
            scalars["curvature/fd_eps"] = fd_eps
        for k, (fd, exact) in zip(ks, curvature_rows, strict=True):
            curvatures.append({"k": k, "fd": fd, "hvp": exact})
            scalars[f"curvature/fd_v{k}"] = fd
            scalars[f"curvature/hvp_v{k}"] = exact

        fields = {
            **shape,
            "grid": self.grid,
            "sweep": sweep,
            "extremes": {str(k): v for k, v in extremes.items()},
            "curvature": curvatures,
            "fd_dtype": self.fd_dtype,
            "hvp_dtype": self.hvp_dtype,
            "path_points": path_points,
        }
        rows = [[r[c] for c in TABLE_COLUMNS] for r in sweep]
        return Result(scalars, fields, ("perturb/sweep_table", TABLE_COLUMNS, rows))
