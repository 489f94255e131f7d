"""CholeskyRidge and the quadratic probe built on it, against scikit-learn's Ridge."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import Ridge
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import PolynomialFeatures, StandardScaler

from grokedge.experiments.probes import ProbeConfig, score_probes
from grokedge.experiments.ridge import DEFAULT_BLOCK, CholeskyRidge, gram_rows

UNIT_ROUNDOFF_32 = 2.0**-24


def hidden_like(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Correlated, badly scaled features (a rank-6 code plus noise, column scales over
    3 orders, as raw hidden states can be) and a quadratic target of the code."""
    rng = np.random.default_rng(seed)
    code = rng.normal(size=(n, 6))
    x = code @ rng.normal(size=(6, d)) + 0.05 * rng.normal(size=(n, d))
    x *= np.logspace(-2, 1, d)
    y = code[:, 0] * code[:, 1] + 0.3 * code[:, 2] ** 2 + 0.1 * rng.normal(size=n)
    return x, y


@pytest.mark.parametrize(("n", "dim"), [(120, 400), (400, 60)], ids=["dual", "primal"])
def test_cholesky_ridge_is_sklearn_ridge(n: int, dim: int) -> None:
    """Both normal systems in float64, with sample weights and an intercept: the
    coefficients, intercept and predictions of Ridge(alpha) to float64 rounding."""
    x, y = hidden_like(n, dim)
    x = StandardScaler().fit_transform(x)
    w = np.random.default_rng(1).integers(1, 5, size=n).astype(float)
    ours = CholeskyRidge(alpha=3.0, gram_dtype="float64").fit(x, y, sample_weight=w)
    ref = Ridge(alpha=3.0).fit(x, y, sample_weight=w)
    np.testing.assert_allclose(
        ours.coef_, ref.coef_, rtol=1e-7, atol=1e-9 * np.abs(ref.coef_).max()
    )
    assert ours.intercept_ == pytest.approx(ref.intercept_, rel=1e-9, abs=1e-12)
    x_new = x[: n // 2] + 0.1
    scale = np.std(ref.predict(x_new))
    assert np.max(np.abs(ours.predict(x_new) - ref.predict(x_new))) <= 1e-9 * scale


@pytest.mark.parametrize(("n", "dim"), [(120, 400), (400, 60)], ids=["dual", "primal"])
def test_float32_products_keep_held_out_r2(n: int, dim: int) -> None:
    """Float32 products on nearly rank-deficient features (a rank-6 code in 60-400
    columns: condition number ~λ_max/α ≫ 1/u): the fit moves (predictions by < 1e-3 of
    their spread) but its held-out R², the probe's figure, stays within 1e-5 relative."""
    from sklearn.metrics import r2_score

    x, _ = hidden_like(2 * n, dim)
    x = StandardScaler().fit_transform(x)
    rng = np.random.default_rng(3)
    y = x[:, :3].sum(axis=1) + 0.3 * rng.normal(size=2 * n)  # a linearly readable target
    w = np.random.default_rng(1).integers(1, 5, size=2 * n).astype(float)
    fit, held_out = slice(0, n), slice(n, 2 * n)
    ours = CholeskyRidge(alpha=3.0, gram_dtype="float32").fit(x[fit], y[fit], sample_weight=w[fit])
    ref = Ridge(alpha=3.0).fit(x[fit], y[fit], sample_weight=w[fit])
    pred, ref_pred = ours.predict(x[held_out]), ref.predict(x[held_out])
    assert np.max(np.abs(pred - ref_pred)) < 1e-3 * np.std(ref_pred)
    assert r2_score(y[held_out], ref_pred) > 0.5
    assert not np.array_equal(pred, ref_pred)  # the float32 path did run in float32
    r2 = r2_score(y[held_out], pred, sample_weight=w[held_out])
    assert r2 == pytest.approx(r2_score(y[held_out], ref_pred, sample_weight=w[held_out]), rel=1e-5)


def test_float32_gram_within_its_bound() -> None:
    """Float32 products in blocks, summed in float64, against the float64 product: every
    entry within (block + 2)·u·Σ|x_a x_b| (the documented worst case) and within 1e-5 of
    √(K_aa K_bb) (the scale the ridge sees)."""
    x, _ = hidden_like(300, 5000)
    x = StandardScaler().fit_transform(x)
    exact = x @ x.T
    fast = gram_rows(x, "float32")
    error = np.abs(fast - exact)
    bound = (DEFAULT_BLOCK + 2) * UNIT_ROUNDOFF_32 * (np.abs(x) @ np.abs(x).T)
    assert np.all(error <= bound)
    diag = np.sqrt(np.diag(exact))
    assert np.max(error / np.outer(diag, diag)) < 1e-5
    assert np.max(error) > 0  # the float32 path did run in float32


def literal_quadratic_probe(config: ProbeConfig) -> Pipeline:
    """The quadratic probe as scikit-learn spells it: scaler, degree-2 features, scaler, Ridge."""
    poly = PolynomialFeatures(
        2, interaction_only=config.quadratic_interaction_only, include_bias=False
    )
    return Pipeline(
        [("scale", StandardScaler()), ("poly", poly), ("scale_poly", StandardScaler()),
         ("ridge", Ridge(alpha=config.quadratic_alpha))]
    )  # fmt: skip


@pytest.mark.parametrize("quadratic_dtype", ["float32", "float64"])
def test_quadratic_probe_scores_as_the_sklearn_pipeline(quadratic_dtype: str) -> None:
    """score_probes' quadratic R² per fold (grouped 3-fold, row weights) equals the literal
    scikit-learn pipeline's on the same folds to 1e-5 relative."""
    from sklearn.metrics import r2_score

    from grokedge.experiments.probes import probe_splits

    x, y = hidden_like(900, 40)  # D = 860 > 600 training positions: the dual system
    groups = np.arange(len(y)) // 4
    w = np.random.default_rng(2).integers(1, 4, size=len(y)).astype(float)
    config = ProbeConfig(quadratic_dtype=quadratic_dtype)
    ours = score_probes(x, y, groups, ("quadratic",), 3, sample_weight=w, config=config)
    expected = []
    for train, test in probe_splits(groups, 3):
        probe = literal_quadratic_probe(config)
        fit_weights = {"scale__sample_weight": w[train], "scale_poly__sample_weight": w[train],
                       "ridge__sample_weight": w[train]}  # fmt: skip
        probe.fit(x[train], y[train], **fit_weights)
        expected.append(r2_score(y[test], probe.predict(x[test]), sample_weight=w[test]))
    assert min(expected) > 0.5  # a target the quadratic probe does learn
    np.testing.assert_allclose(ours["quadratic"].per_fold, expected, rtol=1e-5)


def test_bad_arguments_are_named() -> None:
    x, y = hidden_like(20, 30)
    with pytest.raises(ValueError, match="alpha=0"):
        CholeskyRidge(alpha=0).fit(x, y)
    with pytest.raises(ValueError, match="gram_dtype='float16'"):
        CholeskyRidge(gram_dtype="float16").fit(x, y)
    with pytest.raises(ValueError, match="quadratic_dtype='float16'"):
        score_probes(
            x, y, np.arange(20), ("quadratic",), 2, config=ProbeConfig(quadratic_dtype="float16")
        )
