"""The SGLD local learning coefficient on regular models, where the theory is exact.

Linear regression y = Xw + σ·noise with the per-sample Gaussian negative log-likelihood of
known σ, L(w) = mean ½(y − xᵀw)²/σ² (the constant ½ log 2πσ² dropped: it cancels in
L_m(w) − L_n(w*)), is regular with d parameters, so λ = d/2. With localization γ the sampled
posterior is Gaussian and the estimator's target is exactly ½ Σ_i nβh_i / (nβh_i + γ), h_i
the eigenvalues of the Hessian XᵀX/(nσ²); γ ≪ nβh gives d/2. The step ε is small enough that
the Langevin discretization's own bias (a factor 1/(1 − ε(nβh + γ)/4), here ~1.5 %) stays well
inside the tolerance, and the draws many enough that the estimate's noise (~2.5 %) does too.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from grokedge.experiments.llc import SGLDConfig, drift, estimate_llc, gelman_rubin

N = 5000
BATCH = 2500  # half the data per minibatch: keeps the minibatch noise of L_m small
SIGMA = 1.0
STEP = 1e-4  # ε·nβ·h ≈ 0.06 with nβ = n / log n ≈ 587, h ≈ 1
WEAK_PULL = 1.0  # γ ≪ nβh: the localization changes λ̂ by < 0.2 %
REL_TOL = 0.10  # the acceptance: within 10 % of d/2


def regression(
    d: int, seed: int
) -> tuple[Callable[[Tensor, torch.Generator], Tensor], Tensor, float, Tensor]:
    """(minibatch loss, least-squares w* [d], L_n(w*), Hessian eigenvalues [d])."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(d, generator=gen, dtype=torch.float64)
    y = y + SIGMA * torch.randn(N, generator=gen, dtype=torch.float64)
    w_star = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1)

    def minibatch_loss(w: Tensor, generator: torch.Generator) -> Tensor:
        rows = torch.randperm(N, generator=generator)[:BATCH]  # without replacement
        return (0.5 * (y[rows] - x[rows] @ w) ** 2 / SIGMA**2).mean()

    full_loss = float((0.5 * (y - x @ w_star) ** 2 / SIGMA**2).mean())
    hessian = x.T @ x / (N * SIGMA**2)
    return minibatch_loss, w_star, full_loss, torch.linalg.eigvalsh(hessian)


def config(**overrides: float | int | None) -> SGLDConfig:
    settings = dict(
        step_size=STEP, localization=WEAK_PULL, n_beta=None, chains=4, draws=300, burn_in=200
    )
    settings.update(overrides)
    return SGLDConfig(**settings)  # type: ignore[arg-type]


@pytest.mark.parametrize(("d", "draws"), [(10, 4000), (4, 6000)])
def test_regular_model_gives_half_the_parameter_count(d: int, draws: int) -> None:
    loss, w_star, full_loss, _ = regression(d, seed=d)
    before = w_star.clone()
    est = estimate_llc(
        loss, w_star, N, config(draws=draws), torch.Generator().manual_seed(1), full_loss
    )
    assert est.llc == pytest.approx(d / 2, rel=REL_TOL)
    assert est.converged and est.r_hat is not None and est.r_hat < 1.1
    assert est.loss_trace.shape == (4, draws) and est.loss_trace.dtype == torch.float64
    n_beta = N / math.log(N)  # the default nβ, applied to the recorded trace by hand
    assert est.llc == pytest.approx(n_beta * (float(est.loss_trace.mean()) - full_loss))
    assert sum(est.per_chain) / 4 == pytest.approx(est.llc)
    assert est.init_loss == full_loss
    assert torch.equal(w_star, before)  # w* is not moved by the sampler


def test_localization_lowers_the_estimate_as_the_gaussian_formula_predicts() -> None:
    loss, w_star, full_loss, h = regression(10, seed=3)
    n_beta = N / math.log(N)
    pull = n_beta  # γ = nβ: every direction's share drops to about one half
    expected = float(0.5 * (n_beta * h / (n_beta * h + pull)).sum())
    cfg = config(localization=pull, step_size=STEP / 2, draws=2000)
    est = estimate_llc(loss, w_star, N, cfg, torch.Generator().manual_seed(2), full_loss)
    assert expected < 0.6 * 10 / 2  # far from d/2: the test tells the two apart
    assert est.llc == pytest.approx(expected, rel=REL_TOL)


def test_same_seed_same_estimate_other_seed_other_estimate() -> None:
    loss, w_star, full_loss, _ = regression(4, seed=0)
    runs = [
        estimate_llc(loss, w_star, N, config(), torch.Generator().manual_seed(s), full_loss)
        for s in (7, 7, 8)
    ]
    assert runs[0].llc == runs[1].llc
    assert torch.equal(runs[0].loss_trace, runs[1].loss_trace)
    assert runs[0].llc != runs[2].llc


def test_burn_in_steps_are_run_then_dropped() -> None:
    # One chain, one generator stream: burn-in k then D draws is the tail of k + D draws.
    loss, w_star, full_loss, _ = regression(4, seed=0)
    burn, draws = 30, 50
    short, long = (
        estimate_llc(loss, w_star, N, cfg, torch.Generator().manual_seed(9), full_loss)
        for cfg in (
            config(chains=1, burn_in=burn, draws=draws),
            config(chains=1, burn_in=0, draws=burn + draws),
        )
    )
    assert torch.equal(short.loss_trace[0], long.loss_trace[0, burn:])


def test_default_n_beta_is_n_over_log_n() -> None:
    loss, w_star, full_loss, _ = regression(4, seed=0)
    default, explicit = (
        estimate_llc(
            loss, w_star, N, config(n_beta=nb), torch.Generator().manual_seed(3), full_loss
        )
        for nb in (None, N / math.log(N))
    )
    assert default.llc == explicit.llc


def test_init_loss_is_the_minibatch_mean_at_w_star_when_not_given() -> None:
    loss, w_star, full_loss, _ = regression(4, seed=0)
    est = estimate_llc(loss, w_star, N, config(), torch.Generator().manual_seed(4))
    # Half-data minibatches: the mean of 16 is within a few of its standard errors of L_n.
    per_sample_sd = math.sqrt(0.5)  # ½z², z ~ N(0, 1)
    assert abs(est.init_loss - full_loss) < 4 * per_sample_sd / math.sqrt(BATCH * 16)
    assert est.init_loss != full_loss


def test_diverging_step_size_reports_nan_not_inf_and_not_converged() -> None:
    loss, w_star, full_loss, _ = regression(4, seed=0)
    est = estimate_llc(
        loss, w_star, N, config(step_size=1.0), torch.Generator().manual_seed(5), full_loss
    )
    assert not est.converged
    assert math.isnan(est.llc)
    assert est.r_hat is not None and math.isnan(est.r_hat)
    assert all(math.isnan(v) for v in est.per_chain)
    assert not torch.isinf(est.loss_trace).any()
    assert torch.isnan(est.loss_trace).any()


def test_drift_is_caught_where_r_hat_sees_none() -> None:
    # Started off the minimum, without burn-in or pull: every chain's loss falls alike.
    loss, w_star, full_loss, _ = regression(4, seed=0)
    start = w_star + 0.5
    cfg = config(step_size=1e-5, localization=0.0, burn_in=0, draws=400)
    est = estimate_llc(loss, start, N, cfg, torch.Generator().manual_seed(6), full_loss)
    assert est.r_hat is not None and est.r_hat < 1.1
    assert drift(est.loss_trace) > 0.5 and not est.converged


def test_disagreeing_chains_fail_the_r_hat_check() -> None:
    loss, w_star, full_loss, _ = regression(4, seed=0)
    cfg = config(draws=200, burn_in=50)
    calls = [0]

    def shifted(w: Tensor, generator: torch.Generator) -> Tensor:
        chain = calls[0] // (cfg.burn_in + cfg.draws)  # each chain sits at its own level
        calls[0] += 1
        return loss(w, generator) + 0.1 * chain

    est = estimate_llc(shifted, w_star, N, cfg, torch.Generator().manual_seed(7), full_loss)
    assert est.r_hat is not None and est.r_hat > 1.1 and not est.converged


def test_gelman_rubin_against_its_definition() -> None:
    gen = torch.Generator().manual_seed(0)
    iid = torch.randn(4, 2000, generator=gen, dtype=torch.float64)
    assert gelman_rubin(iid) == pytest.approx(1.0, abs=0.01)
    shifted = iid + torch.arange(4, dtype=torch.float64).unsqueeze(1)
    w = float(shifted.var(dim=1).mean())
    b = float(shifted.mean(dim=1).var())
    assert gelman_rubin(shifted) == pytest.approx(math.sqrt((1999 / 2000 * w + b) / w))
    assert gelman_rubin(torch.ones(3, 5, dtype=torch.float64)) == 1.0


def test_one_chain_has_no_r_hat() -> None:
    loss, w_star, full_loss, _ = regression(4, seed=0)
    est = estimate_llc(
        loss, w_star, N, config(chains=1), torch.Generator().manual_seed(8), full_loss
    )
    assert est.r_hat is None and len(est.per_chain) == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("step_size", 0.0),
        ("step_size", math.inf),
        ("localization", -1.0),
        ("n_beta", 0.0),
        ("chains", 0),
        ("draws", 1),
        ("burn_in", -1),
        ("chains", 2.5),
    ],
)
def test_config_validation_names_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"^{field}={value!r} is not allowed: "):
        config(**{field: value})


def test_bad_arguments_are_refused_by_name() -> None:
    loss, w_star, full_loss, _ = regression(4, seed=0)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="^n=1 is not allowed"):
        estimate_llc(loss, w_star, 1, config(), gen, full_loss)
    with pytest.raises(ValueError, match=r"^theta.shape=\(2, 2\) is not allowed"):
        estimate_llc(loss, w_star.reshape(2, 2), N, config(), gen, full_loss)
    with pytest.raises(ValueError, match="^convergence_tol=0.0 is not allowed"):
        estimate_llc(loss, w_star, N, config(), gen, full_loss, convergence_tol=0.0)
