"""What a model exposes about its internals when asked with ``return_trace=True``."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class ModelTrace:
    """Intermediate activations of one forward pass.

    Attributes:
        hidden: output of every (decoder) block, in order, each [B, T, d]; taken before the
            final LayerNorm, so ``hidden[-1]`` is the last block's residual stream (what the
            probes read).
        attn: (decoder) self-attention weights of every block, each [B, H, T, T]; rows sum
            to one, entries masked out (future or padding) are zero.
        encoder_hidden: encoder block outputs of an encoder-decoder model, each [B, S, d];
            empty for encoder-only models.
        cross_attn: cross-attention weights of every decoder block, each [B, H, T, S];
            empty for encoder-only models.
    """

    hidden: list[Tensor] = field(default_factory=list)
    attn: list[Tensor] = field(default_factory=list)
    encoder_hidden: list[Tensor] = field(default_factory=list)
    cross_attn: list[Tensor] = field(default_factory=list)
