"""Modular arithmetic's functional target: key frequencies and Fourier-feature R².

Brute force: the power spectrum against an explicit DFT sum; the functional R² on
synthetic hidden-state changes that carry the answer through Fourier features (high),
through a random low-dimensional code of the answer (low), and the answer read as a
number (low even for the Fourier network: why the old target failed).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from grokedge.experiments.fourier import answer_power_spectrum, fourier_features, key_frequencies
from grokedge.experiments.probes import functional_r2

P = 97
KEYS = [5, 17, 41]


def _answers(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, P, n), rng.integers(0, P, n)
    return a, b, (a + b) % P


def _fourier_logits(a: np.ndarray, b: np.ndarray) -> torch.Tensor:
    # The grokked mechanism: logit_c = Σ_k w_k cos(2πk(a + b − c)/p).
    c = np.arange(P)
    s = (a + b)[:, None] - c[None, :]
    logits = sum(
        w * np.cos(2 * np.pi * k * s / P) for k, w in zip(KEYS, (3.0, 2.0, 1.0), strict=True)
    )
    return torch.as_tensor(logits)


def test_power_spectrum_matches_an_explicit_dft_and_finds_the_planted_frequencies() -> None:
    a, b, _ = _answers(200, 0)
    logits = _fourier_logits(a, b) + 0.1 * torch.randn(
        200, P, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    power = answer_power_spectrum(logits)
    x = (logits - logits.mean(1, keepdim=True)).numpy()
    c = np.arange(P)
    for k in (0, 1, 5, 17, 48):
        basis = np.exp(-2j * np.pi * k * c / P)
        brute = np.mean(np.abs(x @ basis) ** 2)
        assert float(power[k]) == pytest.approx(brute, rel=1e-9, abs=1e-9)
    assert key_frequencies(power, 3) == KEYS
    assert key_frequencies(power, 1) == [5]  # the largest weight


def test_fourier_features_are_cos_and_sin_at_each_frequency() -> None:
    feats = fourier_features([0, 1, 96], P, [5, 17])
    assert feats.shape == (3, 4)
    assert feats[1, 0] == pytest.approx(math.cos(2 * math.pi * 5 / P))
    assert feats[1, 3] == pytest.approx(math.sin(2 * math.pi * 17 / P))
    assert feats[2, 1] == pytest.approx(math.sin(2 * math.pi * 5 * 96 / P))


def _changes(code: np.ndarray, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hidden states before and after a small step whose change is a linear map of
    ``code`` [n, m] into d dimensions, plus a little noise."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(code.shape[0], d))
    mix = rng.normal(size=(code.shape[1], d))
    moved = base + 1e-3 * (code @ mix + 0.05 * rng.normal(size=(code.shape[0], d)))
    return base, moved


def test_fourier_target_separates_a_fourier_network_from_a_random_one() -> None:
    a, b, c = _answers(1500, 2)
    groups = np.arange(c.size)
    target = fourier_features(c, P, KEYS)  # [n, 6]

    fourier_net = _changes(fourier_features(c, P, KEYS), 16, 3)
    high = functional_r2(*fourier_net, target, groups, folds=5)
    assert high.mean > 0.95

    # A random 8-dimensional code of the answer's one-hot: no Fourier structure.
    onehot = np.eye(P)[c]
    random_code = onehot @ np.random.default_rng(4).normal(size=(P, 8))
    random_net = _changes(random_code, 16, 5)
    low = functional_r2(*random_net, target, groups, folds=5)
    assert low.mean < 0.3

    # The answer read as a number: no linear read-out, even from the Fourier network.
    as_number = functional_r2(*fourier_net, c.astype(float), groups, folds=5)
    assert as_number.mean < 0.3


def test_multi_column_r2_is_the_mean_of_the_columns_per_fold() -> None:
    a, b, c = _answers(600, 6)
    groups = np.arange(c.size)
    target = fourier_features(c, P, KEYS[:2])
    base, moved = _changes(fourier_features(c, P, KEYS[:1]), 8, 7)  # carries k = 5 only
    whole = functional_r2(base, moved, target, groups, folds=3)
    columns = [functional_r2(base, moved, target[:, j], groups, folds=3) for j in range(4)]
    per_fold = np.mean([col.per_fold for col in columns], axis=0)
    assert whole.per_fold == pytest.approx(tuple(per_fold), rel=1e-12)
    assert columns[0].mean > 0.9 and columns[2].mean < 0.3  # k = 5 carried, k = 17 not
