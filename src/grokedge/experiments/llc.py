"""Local learning coefficient (LLC) by SGLD around the current weights (Lau et al. 2023).

Lau, Furman, Wang, Murfet & Wei, "Quantifying degeneracy in singular models via the learning
coefficient": sample the localized, tempered posterior

    p(w) ∝ exp(−nβ · L_n(w) − γ/2 · ‖w − w*‖²)

with stochastic-gradient Langevin dynamics (SGLD) started at w*, and read

    λ̂(w*) = nβ · (E_w[L_n(w)] − L_n(w*)),

with E_w estimated by the mean minibatch loss L_m(w) of the recorded draws. For a regular
model (positive-definite Hessian) λ = d/2, d the number of parameters; degenerate
directions lower it. nβ = n / log n is the WBIC temperature β* = 1/log n (Watanabe 2013).
Losses are per sample (a mean), in the caller's loss units; λ̂ is dimensionless only when the
loss is a negative log-likelihood per sample. Every random draw (noise, the caller's
minibatches) comes from one ``torch.Generator``, so an estimate is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from grokedge.checks import check_float, check_int, not_allowed

MinibatchLoss = Callable[[Tensor, torch.Generator], Tensor]
"""``(w [p], generator) -> scalar`` mean loss on a minibatch it draws with ``generator``."""

DEFAULT_STEP_SIZE = 1e-4
"""ε: the low end of the 1e-4–1e-3 range devinterp / Lau et al. use for small transformers
on modular arithmetic; SGLD is stable only while ε · nβ · (largest Hessian eigenvalue) is
well below ~2, so the cautious end."""
DEFAULT_LOCALIZATION = 100.0
"""γ: the value of Lau et al. and devinterp's examples. It biases λ̂ down in directions whose
curvature nβ·h is not ≫ γ (a factor nβh / (nβh + γ) for a quadratic loss)."""
DEFAULT_CHAINS = 4
"""Chains: R̂ needs at least two; four is the usual minimum for a between-chain check."""
DEFAULT_DRAWS = 300
"""Recorded draws per chain ("a few hundred", as in devinterp's examples)."""
DEFAULT_BURN_IN = 200
"""Discarded steps per chain: the localization alone relaxes on ~2/(εγ) = 200 steps."""
DEFAULT_CONVERGENCE_TOL = 0.5
"""Drift tolerance: |mean(second half of the draws) − mean(first half)| over the pooled
standard deviation of the trace (all chains' draws)."""
DEFAULT_R_HAT_MAX = 1.1
"""The classic Gelman–Rubin threshold (Gelman & Rubin 1992; Gelman et al., BDA)."""
DEFAULT_INIT_LOSS_DRAWS = 16
"""Minibatches averaged for L_n(w*) when ``init_loss`` is not given."""


@dataclass(frozen=True)
class SGLDConfig:
    """SGLD sampler settings (module constants ``DEFAULT_*`` explain each default)."""

    step_size: float = DEFAULT_STEP_SIZE  # ε; the injected noise has std √ε
    localization: float = DEFAULT_LOCALIZATION  # γ, the pull back to w*
    n_beta: float | None = None  # n·β; None: n / log n (β* = 1/log n)
    chains: int = DEFAULT_CHAINS
    draws: int = DEFAULT_DRAWS  # recorded draws per chain (after burn_in)
    burn_in: int = DEFAULT_BURN_IN  # SGLD steps per chain discarded first

    def __post_init__(self) -> None:
        check_float("step_size", self.step_size, 0.0, strict_minimum=True)
        check_float("localization", self.localization, 0.0)
        if self.n_beta is not None:
            check_float("n_beta", self.n_beta, 0.0, strict_minimum=True)
        check_int("chains", self.chains, 1)
        check_int("draws", self.draws, 2)  # the drift check compares two halves
        check_int("burn_in", self.burn_in, 0)


@dataclass(frozen=True)
class LLCEstimate:
    """One LLC estimate. NaN ``llc`` (and NaN for the diverged parts) if a chain diverged."""

    llc: float  # λ̂ = nβ · (mean over chains and draws of L_m(w) − L_n(w*))
    per_chain: list[float]  # λ̂ of each chain
    init_loss: float  # L_n(w*) as given/evaluated
    loss_trace: Tensor  # [chains, draws] float64 minibatch losses of the draws
    converged: bool  # R̂ <= r_hat_max (several chains) and no drift (see estimate_llc)
    r_hat: float | None  # Gelman–Rubin R̂ across chains (None with one chain)


def effective_n_beta(n: int, config: SGLDConfig) -> float:
    """The nβ an estimate on ``n`` samples uses: ``config.n_beta``, or n / log n."""
    return n / math.log(n) if config.n_beta is None else config.n_beta


def gelman_rubin(trace: Tensor) -> float:
    """Gelman–Rubin R̂ of ``trace`` [chains >= 2, draws >= 2] (float64): √(V̂ / W) with W the
    mean within-chain variance, B/N the variance of the chain means, V̂ = (N−1)/N·W + B/N.
    1.0 when the trace is constant; inf when only the chain means differ."""
    if trace.ndim != 2 or trace.shape[0] < 2 or trace.shape[1] < 2:
        raise not_allowed("trace.shape", tuple(trace.shape), "[chains >= 2, draws >= 2]")
    draws = trace.shape[1]
    within = float(trace.var(dim=1, unbiased=True).mean())
    between = float(trace.mean(dim=1).var(unbiased=True))  # B / N
    pooled = (draws - 1) / draws * within + between
    if within == 0.0:
        return 1.0 if between == 0.0 else math.inf
    return math.sqrt(pooled / within)


def drift(trace: Tensor) -> float:
    """|mean of the last half of the draws − mean of the first half| (all chains pooled) over
    the pooled standard deviation of ``trace`` [chains, draws]; 0 for a constant trace."""
    half = trace.shape[1] // 2
    gap = abs(float(trace[:, -half:].mean() - trace[:, :half].mean()))
    spread = float(trace.std(unbiased=True))
    return 0.0 if gap == 0.0 else gap / spread if spread > 0.0 else math.inf


def _run_chain(
    loss_fn: MinibatchLoss,
    theta: Tensor,
    n_beta: float,
    config: SGLDConfig,
    generator: torch.Generator,
) -> Tensor:
    """One SGLD chain from ``theta``; float64 [draws] losses L_m(w) of the recorded steps
    (each loss is evaluated at w before that step's update, on the step's minibatch). On a
    non-finite loss or weight the chain stops and its remaining draws are NaN."""
    losses = torch.full((config.draws,), math.nan, dtype=torch.float64)
    w = theta.clone()
    noise_scale = math.sqrt(config.step_size)
    for step in range(config.burn_in + config.draws):
        w.requires_grad_(True)
        loss = loss_fn(w, generator)
        if loss.ndim != 0:
            raise not_allowed("minibatch_loss(w) shape", tuple(loss.shape), "a scalar []")
        (grad,) = torch.autograd.grad(loss, w)
        value = float(loss.detach())
        if not (math.isfinite(value) and bool(torch.isfinite(grad).all())):
            break  # diverged: leave NaN rather than raise mid-run
        if step >= config.burn_in:
            losses[step - config.burn_in] = value
        # Noise drawn on the generator's device (a CPU generator may drive GPU weights).
        noise = torch.randn(w.shape, generator=generator, dtype=w.dtype, device=generator.device)
        with torch.no_grad():
            drift_term = n_beta * grad + config.localization * (w - theta)
            w = w - config.step_size / 2 * drift_term + noise_scale * noise.to(w.device)
    return losses


def estimate_llc(
    minibatch_loss: MinibatchLoss,
    theta: Tensor,
    n: int,
    config: SGLDConfig,
    generator: torch.Generator,
    init_loss: float | None = None,
    convergence_tol: float = DEFAULT_CONVERGENCE_TOL,
    r_hat_max: float = DEFAULT_R_HAT_MAX,
    init_loss_draws: int = DEFAULT_INIT_LOSS_DRAWS,
) -> LLCEstimate:
    """λ̂ at ``theta`` = w* [p] (not modified) by ``config.chains`` SGLD chains.

    Update (Lau et al.): w ← w − ε/2 · (nβ · ∇L_m(w) + γ (w − w*)) + N(0, ε I), the gradient
    by ``torch.autograd`` of ``minibatch_loss(w, generator)`` (scalar mean loss on a minibatch
    it draws with ``generator``). ``n``: the training-set size (nβ = n / log n when
    ``config.n_beta`` is None). ``init_loss``: L_n(w*), best the full training loss; if None,
    the mean of ``init_loss_draws`` minibatch losses at w* — its noise is not averaged away
    by the chains (it adds nβ · sd(L_m) / √init_loss_draws to λ̂'s error), so pass it when
    the full loss is at hand.

    Convergence knobs: ``converged`` is True when every chain stayed finite, R̂ (several
    chains) <= ``r_hat_max`` and :func:`drift` of the trace <= ``convergence_tol``. A
    diverged chain gives ``llc`` NaN, NaN in its ``per_chain`` entry and its trace after the
    divergence, ``r_hat`` NaN (several chains) and ``converged`` False; no inf anywhere.
    """
    if theta.ndim != 1:
        raise not_allowed("theta.shape", tuple(theta.shape), "a flat parameter vector [p]")
    check_int("n", n, 2)  # log n > 0
    check_float("convergence_tol", convergence_tol, 0.0, strict_minimum=True)
    check_float("r_hat_max", r_hat_max, 1.0)
    check_int("init_loss_draws", init_loss_draws, 1)
    n_beta = effective_n_beta(n, config)
    w_star = theta.detach().clone()
    if init_loss is None:
        with torch.no_grad():
            values = [float(minibatch_loss(w_star, generator)) for _ in range(init_loss_draws)]
        init_loss = sum(values) / init_loss_draws
    else:
        init_loss = check_float("init_loss", init_loss)

    trace = torch.stack(
        [
            _run_chain(minibatch_loss, w_star, n_beta, config, generator)
            for _ in range(config.chains)
        ]
    )
    finite = bool(torch.isfinite(trace).all()) and math.isfinite(init_loss)
    # NaN (never ±inf) for a diverged chain or a non-finite L_n(w*).
    per_chain = [
        n_beta * (float(row.mean()) - init_loss) if math.isfinite(init_loss) else math.nan
        for row in trace
    ]
    llc = n_beta * (float(trace.mean()) - init_loss) if finite else math.nan
    if config.chains == 1:
        r_hat = None
    else:
        r_hat = gelman_rubin(trace) if finite else math.nan
    converged = finite and drift(trace) <= convergence_tol
    converged = converged and (r_hat is None or r_hat <= r_hat_max)
    return LLCEstimate(
        llc=llc,
        per_chain=per_chain,
        init_loss=init_loss,
        loss_trace=trace,
        converged=converged,
        r_hat=r_hat,
    )
