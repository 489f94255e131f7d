"""Plain ``nn.Module`` models whose attention supports double backward and ``torch.func``."""

from __future__ import annotations

from torch import nn

from grokedge.models.attention import MultiheadAttention, MultiheadSelfAttention
from grokedge.models.encoder import CausalTransformer
from grokedge.models.seq2seq import Seq2SeqTransformer
from grokedge.models.trace import ModelTrace


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters in ``module`` (shared tensors counted once)."""
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "CausalTransformer",
    "ModelTrace",
    "MultiheadAttention",
    "MultiheadSelfAttention",
    "Seq2SeqTransformer",
    "count_parameters",
]
