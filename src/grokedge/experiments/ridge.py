"""Ridge regression by a Cholesky solve of its smaller normal system, products in float32.

The quadratic probe (docs/theory.md §3.5) fits a ridge on D = d + d(d+1)/2 degree-2
features of d-dimensional hidden states (Dyck: d = 128, D = 8,384) from n ≈ 2,350 training
positions per fold. With the weighted centring and √w row scaling of scikit-learn's
``Ridge(fit_intercept=True)``,

    X̃ = diag(√w) (X − x̄),   ỹ = √w ⊙ (y − ȳ),     x̄, ȳ the w-weighted means,

the fit is ``coef = X̃ᵀ (X̃ X̃ᵀ + α I_n)⁻¹ ỹ`` (dual, when D > n) or
``coef = (X̃ᵀ X̃ + α I_D)⁻¹ X̃ᵀ ỹ`` (primal, when n ≥ D): the same minimiser, and the same
one as ``sklearn.linear_model.Ridge(alpha)`` to float64 rounding
(``tests/test_spectral_ridge.py``); ``intercept = ȳ − x̄ · coef``. Almost all of the cost
is the normal matrix (n²D/2 multiply-adds in the dual), so:

- ``gram_dtype="float32"`` (the probes' default) forms it from float32 products over
  blocks of ``block`` summed-over columns, adding each block's result in float64, and
  factorises in float64. An entry's error is at most ≈ (block + 2)·u·Σ_f |x̃_af x̃_bf|
  (u = 2⁻²⁴, float32's unit roundoff; the 2u are the inputs' own rounding) and typically
  ≈ √block·u of √(K_aa K_bb): ~1e-6 relative at block = 1,024. On Dyck's probe data the
  R² moves by < 1e-7 relative (docs/benchmarks.md, "Probes"). Half the time of float64
  on this CPU (``ssyrk`` vs ``dsyrk``). The solve stays float64 because the system's
  condition number (λ_max/α, ~10⁷ for the probe) is beyond float32's resolution: a fully
  float32 ridge would amplify its rounding by that much.
- the factorisation is a Cholesky (``scipy.linalg.cho_factor``), where scikit-learn's
  ``Ridge`` goes through a general ``scipy.linalg.solve``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy.linalg import cho_factor, cho_solve
from sklearn.base import BaseEstimator, RegressorMixin

# scikit-learn and SciPy load in ~1 s: import this module only where a probe is fitted
# (grokedge.experiments.probes.make_probe does), never at a package's import.

GRAM_DTYPES = ("float32", "float64")
"""Precisions of the normal matrix's products (the solve is float64 either way)."""

# Summed-over columns per float32 product block: 1,024 columns of ~2,350 rows is ~9 MiB
# of float32 (cache-friendly copies) and keeps the in-block rounding near √1024·u ≈ 2e-6.
DEFAULT_BLOCK = 1024


def gram_rows(x: np.ndarray, gram_dtype: str = "float64", block: int = DEFAULT_BLOCK) -> np.ndarray:
    """x xᵀ [n, n] float64 from x [n, m] float64.

    ``gram_dtype="float64"``: one float64 product (BLAS ``syrk`` through numpy).
    ``"float32"``: float32 products over blocks of ``block`` of the m columns, each block's
    [n, n] result added in float64 (error bound in the module docstring).
    """
    if gram_dtype not in GRAM_DTYPES:
        raise ValueError(f"gram_dtype={gram_dtype!r}; allowed: {GRAM_DTYPES}")
    if block < 1:
        raise ValueError(f"block={block}; must be >= 1")
    if gram_dtype == "float64":
        return x @ x.T
    gram = np.zeros((x.shape[0], x.shape[0]), dtype=np.float64)
    for start in range(0, x.shape[1], block):
        part = np.ascontiguousarray(x[:, start : start + block], dtype=np.float32)
        gram += part @ part.T
    return gram


class CholeskyRidge(RegressorMixin, BaseEstimator):
    """``sklearn.linear_model.Ridge(alpha)`` (with intercept and sample weights) solved by
    Cholesky on the smaller of its dual [n, n] and primal [D, D] normal systems.

    A scikit-learn regressor: it fits in a Pipeline, which routes ``sample_weight`` to it.

    Args:
        alpha: the ridge penalty (> 0), scikit-learn's ``alpha``.
        gram_dtype: arithmetic of the normal matrix's products: ``float64`` (default) or
            ``float32`` (blocks added in float64; the solve is float64 either way).
        block: summed-over columns per float32 product block.

    Attributes after ``fit``: ``coef_`` [D] and ``intercept_`` (float), as ``Ridge``'s.

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(50, 200))
        >>> CholeskyRidge(alpha=1.0).fit(x, x[:, 0] - 2 * x[:, 1]).predict(x[:2]).shape
        (2,)
    """

    def __init__(
        self, alpha: float = 1.0, gram_dtype: str = "float64", block: int = DEFAULT_BLOCK
    ) -> None:
        self.alpha = alpha
        self.gram_dtype = gram_dtype
        self.block = block

    def fit(
        self, x: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | None = None
    ) -> CholeskyRidge:
        """Fit on x [n, D] and y [n] (``sample_weight`` [n] ≥ 0; None: ones)."""
        if not self.alpha > 0:
            raise ValueError(f"alpha={self.alpha}; must be > 0")
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.ndim != 2 or y.shape != (x.shape[0],):
            raise ValueError(f"x must be [n, D] and y [n], got {x.shape}, {y.shape}")
        w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, np.float64)
        x_mean = np.average(x, axis=0, weights=w)
        y_mean = float(np.average(y, weights=w))
        root_w = np.sqrt(w)
        x_scaled = (x - x_mean) * root_w[:, None]
        y_scaled = root_w * (y - y_mean)
        n, dim = x_scaled.shape
        dual = dim > n  # dual: coef = X̃ᵀ (X̃X̃ᵀ + αI)⁻¹ ỹ; primal: (X̃ᵀX̃ + αI)⁻¹ X̃ᵀ ỹ
        normal = gram_rows(x_scaled if dual else x_scaled.T, self.gram_dtype, self.block)
        normal.flat[:: normal.shape[0] + 1] += self.alpha
        factor = cho_factor(normal, lower=True, overwrite_a=True)
        if dual:
            self.coef_ = cho_solve(factor, y_scaled) @ x_scaled
        else:
            self.coef_ = cho_solve(factor, y_scaled @ x_scaled)
        self.intercept_ = y_mean - float(x_mean @ self.coef_)
        return self

    def predict(self, x: ArrayLike) -> np.ndarray:
        """[n] predictions for x [n, D]."""
        return np.asarray(x, dtype=np.float64) @ self.coef_ + self.intercept_
