"""Restricted and excluded loss: Nanda et al.'s progress measures for (a + b) mod p.

A network that has grokked modular addition computes its answer logits from a few key
frequencies ω_k = 2πk/p through cos(ω_k(a + b − c)) = cos(ω_k(a + b))cos(ω_k c) +
sin(ω_k(a + b))sin(ω_k c). The two measures split the logits along those frequencies.

Definitions (Nanda et al. 2023, "Progress measures for grokking via mechanistic
interpretability"). Take the logits L[a, b, c] on all p² input pairs (a, b) and answer
classes c, and, for each answer c separately, view L[·, ·, c] as a function on the p × p
grid of pairs with the plain inner product Σ_{a,b}. Split it orthogonally into

- its constant part: the mean over all pairs, μ(c) = (1/p²) Σ_{a,b} L[a, b, c];
- its key part K[a, b, c]: the orthogonal projection onto
  span{cos(ω_k(a + b)), sin(ω_k(a + b)) : k ∈ freqs} (the 2-D Fourier terms over (a, b)
  that depend on a + b alone, at the key frequencies);
- the rest, L − μ − K.

Then, both evaluated by cross-entropy against c = (a + b) mod p on the TRAIN pairs only,

- restricted loss = CE(μ + K): the logits with everything but the constant and the key
  terms ablated — low once the key-frequency circuit alone predicts the answer;
- excluded loss = CE(L − K): the logits with exactly the key terms removed — rises when
  the network stops relying on memorisation and leans on the key frequencies.

The coupled directions cos/sin(ω_k(a + b − c)) lie in the key part (for each c they are a
combination of cos and sin of ω_k(a + b)), so logits made of them are all key part.

The key part is cheap: the functions of s = (a + b) mod p are a subspace (constant on the p
diagonals, each of p pairs), so K is the projection of the diagonal means
g_c(s) = (1/p) Σ_a L[a, (s − a) mod p, c] onto the frequencies within functions on Z_p —
the [p, p] matrix :func:`key_frequency_projector` — read back at s = (a + b) mod p.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from grokedge.checks import not_allowed

MIN_MODULUS = 3
"""The smallest p with a non-constant frequency k in 1..p // 2 (as in experiments.fourier)."""


def _check_freqs(p: int, freqs: Sequence[int]) -> list[int]:
    """Distinct integers in 1..p // 2, at least one; else ValueError naming ``freqs``."""
    items = list(freqs)
    ok = bool(items) and all(
        isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= p // 2 for k in items
    )
    if not ok or len(set(items)) != len(items):
        raise not_allowed("freqs", items, f"a non-empty list of distinct integers in 1..{p // 2}")
    return items


def key_frequency_projector(p: int, freqs: Sequence[int]) -> Tensor:
    """[p, p] float64: the orthogonal projector, on functions g(s) of s ∈ Z_p, onto
    span{cos(2πks/p), sin(2πks/p) : k ∈ freqs} (frequencies k and p − k span the same plane,
    hence k ∈ 1..p // 2; at k = p / 2 the sine vanishes and only the cosine is kept).

    Symmetric and idempotent; (Q g)(s) = Σ_k (2/p) Σ_t cos(2πk(s − t)/p) g(t) for k < p / 2.
    """
    if isinstance(p, bool) or not isinstance(p, int) or p < MIN_MODULUS:
        raise not_allowed("p", p, f"an integer >= {MIN_MODULUS}")
    s = torch.arange(p, dtype=torch.float64)
    projector = torch.zeros(p, p, dtype=torch.float64)
    for k in _check_freqs(p, freqs):
        angle = 2 * math.pi * k * s / p
        columns = [torch.cos(angle)]
        if 2 * k != p:  # sin(πs) = 0 on the integers: no sine direction at the Nyquist k
            columns.append(torch.sin(angle))
        # Distinct frequencies and cos/sin are orthogonal on Z_p: the projector is the sum
        # of the rank-one projectors of the columns.
        for column in columns:
            projector += torch.outer(column, column) / column.dot(column)
    return projector


def _check_logits(logits: Tensor) -> int:
    shape = list(logits.shape)
    if logits.ndim != 3 or len(set(shape)) != 1 or shape[0] < MIN_MODULUS:
        raise not_allowed(
            "logits.shape", shape, f"[p, p, p] (a, b, answer c) with p >= {MIN_MODULUS}"
        )
    if not logits.is_floating_point():
        raise not_allowed("logits.dtype", logits.dtype, "a floating-point dtype")
    if not bool(torch.isfinite(logits).all()):
        raise not_allowed("logits", "non-finite values", "finite logits")
    return shape[0]


def _sums(p: int, device: torch.device) -> Tensor:
    """[p, p] long: s = (a + b) mod p at [a, b]."""
    a = torch.arange(p, device=device)
    return (a[:, None] + a[None, :]) % p


def key_frequency_component(logits: Tensor, freqs: Sequence[int]) -> Tensor:
    """K [p, p, p] float64: for each answer c, the orthogonal projection of L[·, ·, c] onto
    span{cos(ω_k(a + b)), sin(ω_k(a + b)) : k ∈ freqs} (see the module docstring).

    Args:
        logits: [p, p, p] logits L[a, b, c] on all pairs, any floating dtype.
        freqs: the key frequencies, distinct integers in 1..p // 2.
    """
    p = _check_logits(logits)
    projector = key_frequency_projector(p, freqs).to(logits.device)
    x = logits.detach().to(torch.float64)
    sums = _sums(p, x.device)
    # g[s, c] = mean over the p pairs on the diagonal a + b = s (mod p): the projection onto
    # functions of s, which contain every key direction.
    diagonal_means = torch.zeros(p, p, dtype=torch.float64, device=x.device)
    diagonal_means.index_add_(0, sums.reshape(-1), x.reshape(p * p, p))
    diagonal_means /= p
    return (projector @ diagonal_means)[sums]


def restricted_excluded_logits(logits: Tensor, freqs: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(μ + K, L − K), both [p, p, p] float64: the restricted and the excluded logits."""
    key = key_frequency_component(logits, freqs)
    x = logits.detach().to(torch.float64)
    constant = x.mean(dim=(0, 1), keepdim=True)
    return constant + key, x - key


def restricted_excluded_loss(
    logits: Tensor, train_mask: Tensor, freqs: Sequence[int]
) -> tuple[float, float]:
    """(restricted loss, excluded loss) in nats: the mean cross-entropy, over the TRAIN pairs,
    of the restricted logits μ + K and of the excluded logits L − K (module docstring).

    Args:
        logits: [p, p, p] logits L[a, b, c] on ALL p² pairs (a, b) over the answer classes c,
            any floating dtype (computed in float64); the label of (a, b) is (a + b) mod p.
        train_mask: [p, p] bool, True at the training pairs (at least one).
        freqs: the key frequencies (e.g. ``fourier.key_frequencies``), distinct integers in
            1..p // 2.
    Returns:
        Two floats; a network that uses only the key frequencies has a restricted loss near
        its train loss and an excluded loss near or above log p (chance).
    """
    p = _check_logits(logits)
    if train_mask.shape != (p, p) or train_mask.dtype != torch.bool:
        allowed = f"a bool [{p}, {p}] mask (a, b)"
        raise not_allowed("train_mask", f"{train_mask.dtype} {list(train_mask.shape)}", allowed)
    if not bool(train_mask.any()):
        raise not_allowed("train_mask", "no True entry", "at least one training pair")
    restricted, excluded = restricted_excluded_logits(logits, freqs)
    mask = train_mask.to(restricted.device)
    labels = _sums(p, restricted.device)[mask]
    return (
        float(F.cross_entropy(restricted[mask], labels)),
        float(F.cross_entropy(excluded[mask], labels)),
    )
