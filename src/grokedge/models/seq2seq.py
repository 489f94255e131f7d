"""Pre-norm encoder-decoder Transformer (the SCAN model) with greedy decoding.

Initialisation is torch's default for every module (as ``nn.Transformer`` layers built with
``norm_first=True``): embeddings N(0, 1), LayerNorm 1/0, Linear kaiming-uniform (a = sqrt(5))
with uniform bias, attention as ``nn.MultiheadAttention`` (see
:mod:`grokedge.models.attention`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from grokedge.models.attention import MultiheadAttention, MultiheadSelfAttention
from grokedge.models.encoder import EncoderBlock, FeedForward, TokenPositionEmbedding
from grokedge.models.trace import ModelTrace


class DecoderBlock(nn.Module):
    """Pre-norm decoder block: causal self-attention, cross-attention, feed-forward.

    The same function as ``nn.TransformerDecoderLayer(norm_first=True, activation="gelu",
    batch_first=True)`` with a causal target mask.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = MultiheadSelfAttention(d_model, n_heads, dropout)
        self.drop1 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.cross_attn = MultiheadAttention(d_model, n_heads, dropout)
        self.drop2 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.drop3 = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        memory_padding_mask: Tensor | None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Run one block.

        Args:
            x: decoder stream [B, L, d].
            memory: encoder output [B, S, d].
            memory_padding_mask: bool [B, S], True at source padding.
            need_weights: also return attention weights.

        Returns:
            ``(x' [B, L, d], self-attn [B, H, L, L] or None, cross-attn [B, H, L, S] or None)``.
        """
        attended, self_w = self.self_attn(self.norm1(x), causal=True, need_weights=need_weights)
        x = x + self.drop1(attended)
        attended, cross_w = self.cross_attn(
            self.norm2(x),
            memory,
            key_padding_mask=memory_padding_mask,
            need_weights=need_weights,
        )
        x = x + self.drop2(attended)
        x = x + self.drop3(self.ff(self.norm3(x)))
        return x, self_w, cross_w


class Seq2SeqTransformer(nn.Module):
    """Encoder-decoder Transformer trained with teacher forcing.

    Args:
        src_vocab_size, tgt_vocab_size: vocabulary sizes (the target one is the head size).
        max_src_len, max_tgt_len: sizes of the source and target position tables.
        d_model, n_enc_layers, n_dec_layers, n_heads, d_ff: widths and depths.
        dropout: dropout probability everywhere.
        pad_id, bos_id, eos_id: special ids, shared by source (pad) and target vocabularies.
    """

    input_keys: tuple[str, ...] = ("src", "tgt_in")

    def __init__(
        self,
        *,
        src_vocab_size: int,
        tgt_vocab_size: int,
        max_src_len: int,
        max_tgt_len: int,
        d_model: int = 256,
        n_enc_layers: int = 3,
        n_dec_layers: int = 3,
        n_heads: int = 4,
        d_ff: int = 512,
        dropout: float = 0.0,
        pad_id: int = 0,
        bos_id: int = 1,
        eos_id: int = 2,
    ) -> None:
        super().__init__()
        self.max_tgt_len = max_tgt_len
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.src_embed = TokenPositionEmbedding(src_vocab_size, max_src_len, d_model, dropout)
        self.tgt_embed = TokenPositionEmbedding(tgt_vocab_size, max_tgt_len, d_model, dropout)
        self.encoder_blocks = nn.ModuleList(
            EncoderBlock(d_model, n_heads, d_ff, dropout) for _ in range(n_enc_layers)
        )
        self.decoder_blocks = nn.ModuleList(
            DecoderBlock(d_model, n_heads, d_ff, dropout) for _ in range(n_dec_layers)
        )
        self.encoder_norm = nn.LayerNorm(d_model)
        self.decoder_norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, tgt_vocab_size)

    def encode(self, src: Tensor, trace: ModelTrace | None = None) -> tuple[Tensor, Tensor]:
        """``src`` [B, S] -> ``(memory [B, S, d] after the encoder norm, pad mask bool [B, S])``.

        When ``trace`` is given, every encoder block's output is appended to
        ``trace.encoder_hidden``.
        """
        padding = src == self.pad_id
        x = self.src_embed(src)
        for block in self.encoder_blocks:
            x, _ = block(x, key_padding_mask=padding)
            if trace is not None:
                trace.encoder_hidden.append(x)
        return self.encoder_norm(x), padding

    def decode(
        self,
        tgt_in: Tensor,
        memory: Tensor,
        memory_padding_mask: Tensor,
        trace: ModelTrace | None = None,
    ) -> Tensor:
        """``tgt_in`` [B, L] attending to ``memory`` [B, S, d] -> logits [B, L, tgt_vocab].

        When ``trace`` is given, decoder block outputs and attention weights are appended.
        """
        x = self.tgt_embed(tgt_in)
        for block in self.decoder_blocks:
            x, self_w, cross_w = block(x, memory, memory_padding_mask, trace is not None)
            if trace is not None:
                trace.hidden.append(x)
                trace.attn.append(self_w)
                trace.cross_attn.append(cross_w)
        return self.head(self.decoder_norm(x))

    def forward(
        self, src: Tensor, tgt_in: Tensor, return_trace: bool = False
    ) -> Tensor | tuple[Tensor, ModelTrace]:
        """Teacher-forced pass: ``src`` [B, S], ``tgt_in`` [B, L] -> logits [B, L, tgt_vocab].

        With ``return_trace`` the result is ``(logits, ModelTrace)`` with decoder block
        outputs in ``hidden``, encoder block outputs in ``encoder_hidden``, decoder
        self-attention in ``attn`` and cross-attention in ``cross_attn``.
        """
        trace = ModelTrace() if return_trace else None
        memory, padding = self.encode(src, trace)
        logits = self.decode(tgt_in, memory, padding, trace)
        return (logits, trace) if trace is not None else logits

    @torch.no_grad()
    def generate(self, src: Tensor, max_len: int) -> Tensor:
        """Greedy decoding: ``src`` [B, S] -> LongTensor [B, n] with n <= ``max_len``.

        The output excludes BOS and includes each row's EOS; positions after a row's EOS are
        ``pad_id``. Decoding stops once every row has emitted EOS. The source is encoded
        once; the decoder is rerun on the growing prefix (no key/value cache: the targets
        are short). Uses the module in its current mode, so call ``eval()`` first when
        dropout is on.
        """
        if not 1 <= max_len <= self.max_tgt_len:
            raise ValueError(f"max_len must be in [1, {self.max_tgt_len}], got {max_len}")
        memory, padding = self.encode(src)
        prefix = torch.full((src.shape[0], 1), self.bos_id, dtype=torch.long, device=src.device)
        finished = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        emitted: list[Tensor] = []
        for _ in range(max_len):
            nxt = self.decode(prefix, memory, padding)[:, -1].argmax(dim=-1)
            nxt = nxt.masked_fill(finished, self.pad_id)
            emitted.append(nxt)
            finished |= nxt == self.eos_id
            if bool(finished.all()):
                break
            prefix = torch.cat([prefix, nxt[:, None]], dim=1)
        return torch.stack(emitted, dim=1)
