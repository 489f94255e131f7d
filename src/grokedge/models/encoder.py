"""Pre-norm Transformer building blocks and the causal encoder used for Dyck and modular tasks.

Initialisation is torch's default for every module, i.e. what ``nn.Embedding`` +
``nn.TransformerEncoderLayer`` + ``nn.Linear`` give: embeddings N(0, 1), LayerNorm weight 1
and bias 0, Linear layers kaiming-uniform (a = sqrt(5)) with uniform bias, and attention as
in ``nn.MultiheadAttention`` (see :mod:`grokedge.models.attention`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from grokedge.models.attention import MultiheadSelfAttention
from grokedge.models.trace import ModelTrace


class TokenPositionEmbedding(nn.Module):
    """Learned token embedding plus learned absolute position embedding.

    Args:
        vocab_size: number of token ids.
        max_len: number of positions in the table; longer inputs are rejected.
        d_model: embedding width d.
        dropout: dropout on the sum.
    """

    def __init__(self, vocab_size: int, max_len: int, d_model: int, dropout: float = 0.0):
        super().__init__()
        self.max_len = max_len
        self.token = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_len, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: Tensor) -> Tensor:
        """``tokens`` LongTensor [B, T] -> [B, T, d]."""
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len={self.max_len}")
        positions = torch.arange(length, device=tokens.device)
        return self.dropout(self.token(tokens) + self.position(positions))


class FeedForward(nn.Module):
    """Linear(d, d_ff) -> GELU (exact, erf) -> dropout -> Linear(d_ff, d)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        """[B, T, d] -> [B, T, d]."""
        return self.fc2(self.dropout(self.act(self.fc1(x))))


class EncoderBlock(nn.Module):
    """Pre-norm block: ``x + attn(LN(x))`` then ``x + ff(LN(x))``.

    The same function as ``nn.TransformerEncoderLayer(norm_first=True, activation="gelu",
    batch_first=True)``, with dropout in the same places.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = MultiheadSelfAttention(d_model, n_heads, dropout)
        self.drop1 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.drop2 = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        *,
        causal: bool = False,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """``x`` [B, T, d] -> ``(x' [B, T, d], attention weights [B, H, T, T] or None)``."""
        attended, weights = self.attn(
            self.norm1(x),
            causal=causal,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
        )
        x = x + self.drop1(attended)
        x = x + self.drop2(self.ff(self.norm2(x)))
        return x, weights


class CausalTransformer(nn.Module):
    """Decoder-only (causally masked) pre-norm Transformer with a per-position classifier.

    Embedding (token + position) -> ``n_layers`` causal :class:`EncoderBlock` s -> LayerNorm
    -> Linear head. Right padding needs no mask: under the causal mask no real position
    sees a later pad.

    Args:
        vocab_size: number of input token ids.
        num_classes: number of output classes per position.
        max_len: size of the position table (longest accepted input).
        d_model, n_layers, n_heads, d_ff: widths and depth.
        dropout: dropout probability everywhere (embedding, attention, residual, FFN).
    """

    input_keys: tuple[str, ...] = ("tokens",)

    def __init__(
        self,
        *,
        vocab_size: int,
        num_classes: int,
        max_len: int,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        d_ff: int = 256,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.max_len = max_len
        self.embed = TokenPositionEmbedding(vocab_size, max_len, d_model, dropout)
        self.blocks = nn.ModuleList(
            EncoderBlock(d_model, n_heads, d_ff, dropout) for _ in range(n_layers)
        )
        self.final_norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(
        self, tokens: Tensor, return_trace: bool = False
    ) -> Tensor | tuple[Tensor, ModelTrace]:
        """``tokens`` LongTensor [B, T] -> logits [B, T, num_classes] (and the trace).

        With ``return_trace`` the result is ``(logits, ModelTrace)``; the trace holds every
        block's output [B, T, d] (before the final norm) and attention weights [B, H, T, T].
        """
        trace = ModelTrace() if return_trace else None
        x = self.embed(tokens)
        for block in self.blocks:
            x, weights = block(x, causal=True, need_weights=return_trace)
            if trace is not None:
                trace.hidden.append(x)
                trace.attn.append(weights)
        logits = self.head(self.final_norm(x))
        return (logits, trace) if trace is not None else logits
