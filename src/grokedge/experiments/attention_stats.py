"""Attention entropy (docs/theory.md §3, experiment 6).

The entropy of a query's attention row, −Σ_j a_ij ln a_ij (nats), is ln t for uniform
attention over t keys and 0 for attention on one key. Under a causal mask query i
(1-based) sees t = i keys, so perfectly uniform causal attention over a context of 24
averages to mean_{t=1..24} ln t = ln(24!)/24 ≈ 2.28: the value the paper reports for
ω = 2 (its "uniform attention" end point).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _layers(attn: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [attn] if isinstance(attn, Tensor) else list(attn)


def attention_entropies(
    attn: Tensor | Sequence[Tensor],
    valid_mask: Tensor,
    weight: Tensor | None = None,
) -> Tensor:
    """[L, H] float64: mean row entropy (nats) of every layer and head over valid queries.

    Args:
        attn: one layer [B, H, Tq, Tk] or a sequence of layers (``ModelTrace.attn``);
            rows sum to 1, masked keys are 0 (0 ln 0 = 0).
        valid_mask: [B, Tq] bool, the queries to average over (e.g. labelled positions).
        weight: [B] row weights (multiplicities); None = 1.
    Returns:
        [L, H]; NaN where no query is valid.
    """
    w = valid_mask.to(torch.float64)
    if weight is not None:
        w = w * weight.to(torch.float64)[:, None]
    w = w[:, None, :]  # [B, 1, Tq]
    out = []
    for a in _layers(attn):
        a = a.to(torch.float64)
        entropy = -torch.special.xlogy(a, a).sum(-1)  # [B, H, Tq]
        out.append((entropy * w).sum(dim=(0, 2)) / w.sum(dim=(0, 2)))
    return torch.stack(out)


def attention_entropy(
    attn: Tensor | Sequence[Tensor],
    valid_mask: Tensor,
    weight: Tensor | None = None,
) -> float:
    """Mean attention entropy (nats) over layers, heads and valid query positions.

    Every head of every layer averages over the same (weighted) queries, so this is the
    mean of :func:`attention_entropies`.
    """
    return float(attention_entropies(attn, valid_mask, weight).mean())
