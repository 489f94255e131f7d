"""Multi-head attention written out as matmul + softmax.

``torch.nn.MultiheadAttention`` and ``F.scaled_dot_product_attention`` dispatch to fused
kernels that lack double-backward or forward-mode AD on some devices, which the curvature
analyses (Hessian-vector products through ``torch.func``) need. This module computes the
same function with plain differentiable ops, and keeps torch's parameter layout so that
weights can be copied either way and the spectral analysis can select ``in_proj_weight``
and ``out_proj.weight`` by name.

Initialisation is torch's ``nn.MultiheadAttention`` one: ``in_proj_weight`` xavier-uniform,
``in_proj_bias`` and ``out_proj.bias`` zero, ``out_proj.weight`` the default ``nn.Linear``
init (kaiming-uniform with a = sqrt(5)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

N_PROJECTIONS = 3
"""Query, key and value projections are stacked in ``in_proj_weight``."""


class MultiheadAttention(nn.Module):
    """Multi-head scaled dot-product attention (batch first), self or cross.

    Parameters (shapes as in ``nn.MultiheadAttention``):
        in_proj_weight [3d, d]: W_Q, W_K, W_V stacked along dim 0.
        in_proj_bias   [3d]
        out_proj.weight [d, d], out_proj.bias [d]

    Args:
        d_model: model width d.
        n_heads: number of heads H; must divide d.
        dropout: dropout probability on the attention weights (training only).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(N_PROJECTIONS * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.empty(N_PROJECTIONS * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch's ``nn.MultiheadAttention`` initialisation (see the module docstring)."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        self.out_proj.reset_parameters()
        nn.init.zeros_(self.out_proj.bias)

    def _split_heads(self, x: Tensor) -> Tensor:
        """[B, T, d] -> [B, H, T, d/H]."""
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)

    def _project(self, query: Tensor, key_value: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Q, K, V, each [B, T, d], from the one packed projection."""
        if key_value is None:
            return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(
                N_PROJECTIONS, dim=-1
            )
        d = self.d_model
        q = F.linear(query, self.in_proj_weight[:d], self.in_proj_bias[:d])
        k, v = F.linear(key_value, self.in_proj_weight[d:], self.in_proj_bias[d:]).chunk(2, -1)
        return q, k, v

    def forward(
        self,
        query: Tensor,
        key_value: Tensor | None = None,
        *,
        causal: bool = False,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from ``query`` to ``key_value`` (to ``query`` itself when None).

        Args:
            query: [B, Tq, d].
            key_value: [B, Tk, d] for cross-attention; None for self-attention.
            causal: position i attends only to keys j <= i (requires Tq == Tk).
            key_padding_mask: bool [B, Tk], True where the key is padding (ignored).
            need_weights: also return the per-head attention weights.

        Returns:
            ``(out [B, Tq, d], weights [B, H, Tq, Tk] or None)``. The weights are the
            softmax probabilities before attention dropout. A query whose keys are all
            masked gets uniform weights rather than NaN.
        """
        q, k, v = self._project(query, key_value)
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # [B, H, Tq, Tk]

        masked = _disallowed(scores.shape[-2], scores.shape[-1], causal, key_padding_mask, q.device)
        if masked is not None:
            # The most negative finite value, not -inf: exp() still gives exactly 0, and a
            # fully masked row stays finite (uniform) instead of turning into NaN.
            scores = scores.masked_fill(masked, torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=-1)
        dropped = F.dropout(weights, self.dropout, self.training) if self.dropout else weights

        out = (dropped @ v).transpose(1, 2).reshape(query.shape[0], query.shape[1], self.d_model)
        return self.out_proj(out), (weights if need_weights else None)


class MultiheadSelfAttention(MultiheadAttention):
    """Self-attention: :class:`MultiheadAttention` with the keys and values taken from ``x``."""

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        *,
        causal: bool = False,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """``x`` [B, T, d] -> ``(out [B, T, d], weights [B, H, T, T] or None)``."""
        return super().forward(
            x, None, causal=causal, key_padding_mask=key_padding_mask, need_weights=need_weights
        )


def _disallowed(
    len_q: int,
    len_k: int,
    causal: bool,
    key_padding_mask: Tensor | None,
    device: torch.device,
) -> Tensor | None:
    """Bool mask broadcastable to [B, H, Tq, Tk], True where a query may not attend."""
    mask: Tensor | None = None
    if causal:
        if len_q != len_k:
            raise ValueError(f"causal attention needs Tq == Tk, got {len_q} and {len_k}")
        mask = torch.ones(len_q, len_k, dtype=torch.bool, device=device).triu(diagonal=1)
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be bool, got {key_padding_mask.dtype}")
        pad = key_padding_mask[:, None, None, :]  # [B, 1, 1, Tk]
        mask = pad if mask is None else mask | pad
    return mask
