"""Fourier read-outs of a cyclic task variable (modular arithmetic's answer c ∈ Z_p).

No linear read-out recovers a cyclic variable read as a number (c = p − 1 and c = 0 are
neighbours on the circle, not opposite ends), so the functional R² of modular arithmetic
probes the answer's *Fourier features* instead: cos(2πkc/p) and sin(2πkc/p) at the
network's key frequencies k (docs/classes.md, "functional targets").

The key frequencies are read from the network's own output: for each example, the logits
over the p answer classes, centred, are a function on Z_p; a network that computes the
answer through a few frequencies (the known mechanism of grokked modular addition)
concentrates their power there. :func:`answer_power_spectrum` is that power, averaged
over the examples; :func:`key_frequencies` takes its largest non-zero frequencies. Using
the logits needs nothing beyond the functional protocol's ``evaluate`` (any module works);
the embedding would need to know where a module keeps it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def answer_power_spectrum(logits: Tensor) -> Tensor:
    """Mean power of the answer logits at each frequency.

    Args:
        logits: [n, p] logits (or log-probabilities) over the p answer classes c = 0..p−1.
    Returns:
        [p // 2 + 1] float64: P(k) = mean over rows of |Σ_c (ℓ_c − mean ℓ) e^{−2πikc/p}|²,
        k = 0..⌊p/2⌋ (k and p − k carry the same power for real logits). P(0) = 0.
    """
    if logits.ndim != 2 or logits.shape[1] < 3:
        raise ValueError(f"logits must be [n, p] with p >= 3, got {list(logits.shape)}")
    x = logits.detach().to(torch.float64)
    x = x - x.mean(dim=1, keepdim=True)
    return torch.fft.rfft(x, dim=1).abs().pow(2).mean(dim=0)


def key_frequencies(power: Tensor, n: int) -> list[int]:
    """The ``n`` frequencies k >= 1 of largest ``power`` [p // 2 + 1], ascending (ties: the
    lower k). Fewer if the spectrum has fewer non-zero frequencies."""
    if n < 1:
        raise ValueError(f"need n >= 1 key frequencies, got {n}")
    candidates = sorted(range(1, power.numel()), key=lambda k: (-float(power[k]), k))
    return sorted(candidates[:n])


def fourier_features(
    values: Sequence[int] | np.ndarray, modulus: int, freqs: Sequence[int]
) -> np.ndarray:
    """[n, 2·len(freqs)] float64: cos(2πkc/p), sin(2πkc/p) of each value c for each k."""
    c = np.asarray(values, dtype=np.float64).reshape(-1)
    columns = []
    for k in freqs:
        angle = 2 * np.pi * k * c / modulus
        columns += [np.cos(angle), np.sin(angle)]
    return np.stack(columns, axis=1) if columns else np.zeros((c.size, 0))
