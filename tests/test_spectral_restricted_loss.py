"""Restricted/excluded loss against brute force: dense least squares on explicit bases."""

from __future__ import annotations

import math

import pytest
import torch

from grokedge.experiments.restricted_loss import (
    key_frequency_component,
    key_frequency_projector,
    restricted_excluded_logits,
    restricted_excluded_loss,
)

TOL = 1e-6
P, FREQS, OTHER = 13, [2, 5], 3


def grid(p: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """a, b, c as float64 [p, p, p] grids indexed [a, b, c]."""
    r = torch.arange(p, dtype=torch.float64)
    return torch.meshgrid(r, r, r, indexing="ij")


def basis(p: int, freqs: list[int], constant: bool) -> torch.Tensor:
    """[p², m] the explicit columns cos/sin(2πk(a + b)/p) (and a column of ones)."""
    r = torch.arange(p, dtype=torch.float64)
    a, b = torch.meshgrid(r, r, indexing="ij")
    columns = [torch.ones(p * p, dtype=torch.float64)] if constant else []
    for k in freqs:
        angle = (2 * math.pi * k * (a + b) / p).reshape(-1)
        columns += [torch.cos(angle), torch.sin(angle)]  # sin is all zeros at k = p / 2
    return torch.stack(columns, dim=1)


def lstsq_projection(logits: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Each answer's [p, p] slice projected onto the columns by dense least squares."""
    p = logits.shape[0]
    x = logits.to(torch.float64).reshape(p * p, p)
    coef = torch.linalg.lstsq(columns, x, driver="gelsd").solution  # rank-deficient-safe
    return (columns @ coef).reshape(p, p, p)


def cross_entropy(logits: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean −log softmax at c = (a + b) mod p over the masked pairs, pair by pair."""
    p = logits.shape[0]
    total, count = 0.0, 0
    for a in range(p):
        for b in range(p):
            if mask[a, b]:
                row = logits[a, b].to(torch.float64)
                total += float(torch.logsumexp(row, 0) - row[(a + b) % p])
                count += 1
    return total / count


def random_mask(p: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(p, p, generator=torch.Generator().manual_seed(seed)) < 0.4


def random_logits(p: int, seed: int = 1) -> torch.Tensor:
    return 2 * torch.randn(p, p, p, generator=torch.Generator().manual_seed(seed)).double()


@pytest.mark.parametrize(("p", "freqs"), [(P, FREQS), (12, [1, 6]), (7, [3])])
def test_key_component_is_the_least_squares_projection(p: int, freqs: list[int]):
    logits = random_logits(p)
    key = key_frequency_component(logits, freqs)
    torch.testing.assert_close(key, lstsq_projection(logits, basis(p, freqs, False)))
    # Idempotent, and the rest is orthogonal to it answer by answer.
    torch.testing.assert_close(key_frequency_component(key, freqs), key)
    rest = logits - key
    torch.testing.assert_close(
        (rest * key).sum(dim=(0, 1)), torch.zeros(p, dtype=torch.float64), atol=1e-9, rtol=0
    )
    assert float(key.abs().max()) > 0.1  # random logits do have a key part


def test_projector_is_a_symmetric_idempotent_of_the_right_rank():
    for p, freqs, rank in [(P, FREQS, 4), (12, [1, 6], 3)]:
        q = key_frequency_projector(p, freqs)
        torch.testing.assert_close(q, q.T)
        torch.testing.assert_close(q @ q, q)
        assert round(float(torch.trace(q))) == rank


def test_losses_match_brute_force_on_random_logits():
    logits, mask = random_logits(P), random_mask(P)
    restricted = lstsq_projection(logits, basis(P, FREQS, True))
    excluded = logits - lstsq_projection(logits, basis(P, FREQS, False))
    got = restricted_excluded_loss(logits, mask, FREQS)
    assert got == pytest.approx((cross_entropy(restricted, mask), cross_entropy(excluded, mask)))
    parts = restricted_excluded_logits(logits, FREQS)
    torch.testing.assert_close(parts[0], restricted)
    torch.testing.assert_close(parts[1], excluded)


def key_wave_logits(p: int, freqs: list[int]) -> torch.Tensor:
    """Σ_k α_k cos(2πk(a + b − c)/p) + β_k sin(...): an answer computed from key waves."""
    a, b, c = grid(p)
    out = torch.zeros(p, p, p, dtype=torch.float64)
    for i, k in enumerate(freqs):
        angle = 2 * math.pi * k * (a + b - c) / p
        out += (3.0 + i) * torch.cos(angle) + (0.5 - i) * torch.sin(angle)
    return out


def test_key_wave_logits_are_all_restricted():
    logits, mask = key_wave_logits(P, FREQS), random_mask(P)
    restricted, excluded = restricted_excluded_loss(logits, mask, FREQS)
    assert restricted == pytest.approx(cross_entropy(logits, mask), abs=TOL)
    assert excluded == pytest.approx(math.log(P), abs=TOL)  # constant logits: chance
    assert cross_entropy(logits, mask) < math.log(P) - 1  # the waves do predict the answer


def test_a_class_bias_stays_in_both():
    bias = torch.linspace(-1.0, 2.0, P, dtype=torch.float64)
    waves, mask = key_wave_logits(P, FREQS), random_mask(P)
    logits = waves + bias
    restricted, excluded = restricted_excluded_loss(logits, mask, FREQS)
    assert restricted == pytest.approx(cross_entropy(logits, mask), abs=TOL)
    assert excluded == pytest.approx(cross_entropy(bias.expand(P, P, P), mask), abs=TOL)


def test_other_frequencies_and_non_sum_terms_are_all_excluded():
    a, b, c = grid(P)
    mask = random_mask(P, seed=2)
    # Another frequency of a + b − c, plus a key frequency of a alone (not of a + b).
    logits = 3 * torch.cos(2 * math.pi * OTHER * (a + b - c) / P)
    logits = logits + torch.cos(2 * math.pi * FREQS[0] * a / P) * torch.sin(2 * math.pi * c / P)
    restricted, excluded = restricted_excluded_loss(logits, mask, FREQS)
    assert restricted == pytest.approx(math.log(P), abs=TOL)
    assert excluded == pytest.approx(cross_entropy(logits, mask), abs=TOL)
    # With the other frequency a key frequency too, the wave moves to the restricted side.
    restricted, _ = restricted_excluded_loss(logits, mask, [*FREQS, OTHER])
    wave_only = 3 * torch.cos(2 * math.pi * OTHER * (a + b - c) / P)
    assert restricted == pytest.approx(cross_entropy(wave_only, mask), abs=TOL)


def test_float32_logits_give_the_float64_losses():
    logits, mask = random_logits(P), random_mask(P)
    single = restricted_excluded_loss(logits.float(), mask, FREQS)
    double = restricted_excluded_loss(logits.float().double(), mask, FREQS)
    assert single == pytest.approx(double, abs=1e-12)


@pytest.mark.parametrize("freqs", [[], [0], [P // 2 + 1], [2, 2], [2.0], [True]])
def test_bad_freqs_are_named(freqs: list[object]):
    with pytest.raises(ValueError, match=r"^freqs="):
        restricted_excluded_loss(random_logits(P), random_mask(P), freqs)


def test_bad_logits_mask_and_p_are_named():
    logits, mask = random_logits(P), random_mask(P)
    with pytest.raises(ValueError, match=r"^logits.shape="):
        restricted_excluded_loss(logits[:, :, :-1], mask, FREQS)
    with pytest.raises(ValueError, match=r"^logits.dtype="):
        restricted_excluded_loss(logits.long(), mask, FREQS)
    with pytest.raises(ValueError, match=r"^logits="):
        restricted_excluded_loss(logits * float("inf"), mask, FREQS)
    with pytest.raises(ValueError, match=r"^train_mask="):
        restricted_excluded_loss(logits, mask.double(), FREQS)
    with pytest.raises(ValueError, match=r"^train_mask="):
        restricted_excluded_loss(logits, mask[:-1], FREQS)
    with pytest.raises(ValueError, match=r"^train_mask="):
        restricted_excluded_loss(logits, torch.zeros(P, P, dtype=torch.bool), FREQS)
    with pytest.raises(ValueError, match=r"^p="):
        key_frequency_projector(2, [1])
