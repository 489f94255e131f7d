"""Models against torch's reference layers, plus the properties the analyses rely on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jvp

from grokedge.models import CausalTransformer, ModelTrace, Seq2SeqTransformer, count_parameters
from grokedge.models.attention import MultiheadAttention, MultiheadSelfAttention

ATOL = 1e-5
HVP_RTOL = 1e-5
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ATTENTION_SUFFIXES = ("in_proj_weight", "out_proj.weight")

# Small sizes keep the suite fast; the structure is what is under test.
D, HEADS, D_FF, LAYERS = 32, 4, 64, 2
PAD, BOS, EOS = 0, 1, 2


def attention_names(model: nn.Module) -> list[str]:
    """Names of the tensors the spectral analysis selects, sorted."""
    return sorted(n for n, _ in model.named_parameters() if n.endswith(ATTENTION_SUFFIXES))


def attention_count(model: nn.Module) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in attention_names(model))


def causal_bool_mask(length: int, device: torch.device | str = "cpu") -> Tensor:
    """True above the diagonal: the future, which torch's layers must not attend to."""
    return torch.ones(length, length, dtype=torch.bool, device=device).triu(1)


def right_padding(lengths: list[int], width: int, device: torch.device | str = "cpu") -> Tensor:
    """bool [B, width], True from each row's length on."""
    ends = torch.tensor(lengths, device=device)
    return torch.arange(width, device=device)[None, :] >= ends[:, None]


@torch.no_grad()
def perturb_(module: nn.Module, scale: float = 0.2) -> nn.Module:
    """Move every parameter off its init, so that zero biases and unit LayerNorm gains
    cannot hide a swapped norm or a dropped bias in an equivalence test."""
    for p in module.parameters():
        p.add_(scale * torch.randn_like(p))
    return module


def tiny_causal(**overrides: int) -> CausalTransformer:
    dims = dict(
        vocab_size=5,
        num_classes=7,
        max_len=12,
        d_model=D,
        n_layers=LAYERS,
        n_heads=HEADS,
        d_ff=D_FF,
    )
    dims.update(overrides)
    return CausalTransformer(**dims)


def tiny_seq2seq() -> Seq2SeqTransformer:
    return Seq2SeqTransformer(
        src_vocab_size=11,
        tgt_vocab_size=9,
        max_src_len=10,
        max_tgt_len=12,
        d_model=D,
        n_enc_layers=2,
        n_dec_layers=2,
        n_heads=HEADS,
        d_ff=D_FF,
        pad_id=PAD,
        bos_id=BOS,
        eos_id=EOS,
    )


# --------------------------------------------------------------------------- attention


@pytest.mark.parametrize("device", DEVICES)
def test_self_attention_matches_torch_causal_with_padding(device: str) -> None:
    torch.manual_seed(0)
    batch, length = 3, 7
    ref = perturb_(nn.MultiheadAttention(D, HEADS, batch_first=True)).to(device)
    ours = MultiheadSelfAttention(D, HEADS).to(device)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(batch, length, D, device=device)
    padding = right_padding([7, 4, 1], length, device)

    expected, expected_w = ref(
        x,
        x,
        x,
        attn_mask=causal_bool_mask(length, device),
        key_padding_mask=padding,
        need_weights=True,
        average_attn_weights=False,
    )
    out, weights = ours(x, causal=True, key_padding_mask=padding, need_weights=True)

    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(weights, expected_w, atol=ATOL, rtol=0)
    assert weights.shape == (batch, HEADS, length, length)


@pytest.mark.parametrize("device", DEVICES)
def test_cross_attention_matches_torch(device: str) -> None:
    torch.manual_seed(1)
    batch, len_q, len_k = 3, 5, 8
    ref = perturb_(nn.MultiheadAttention(D, HEADS, batch_first=True)).to(device)
    ours = MultiheadAttention(D, HEADS).to(device)
    ours.load_state_dict(ref.state_dict())
    query = torch.randn(batch, len_q, D, device=device)
    memory = torch.randn(batch, len_k, D, device=device)
    padding = right_padding([8, 6, 2], len_k, device)

    expected, expected_w = ref(
        query,
        memory,
        memory,
        key_padding_mask=padding,
        need_weights=True,
        average_attn_weights=False,
    )
    out, weights = ours(query, memory, key_padding_mask=padding, need_weights=True)

    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(weights, expected_w, atol=ATOL, rtol=0)
    assert weights.shape == (batch, HEADS, len_q, len_k)


def test_attention_parameter_layout_and_init() -> None:
    attn = MultiheadAttention(D, HEADS)
    shapes = {n: tuple(p.shape) for n, p in attn.named_parameters()}
    assert shapes == {
        "in_proj_weight": (3 * D, D),
        "in_proj_bias": (3 * D,),
        "out_proj.weight": (D, D),
        "out_proj.bias": (D,),
    }
    assert torch.count_nonzero(attn.in_proj_bias) == 0
    assert torch.count_nonzero(attn.out_proj.bias) == 0
    xavier_bound = (6 / (D + 3 * D)) ** 0.5
    assert attn.in_proj_weight.abs().max() <= xavier_bound


def test_fully_masked_query_gives_finite_output() -> None:
    attn = MultiheadSelfAttention(D, HEADS)
    x = torch.randn(2, 4, D)
    everything_padded = torch.ones(2, 4, dtype=torch.bool)
    out, weights = attn(x, key_padding_mask=everything_padded, need_weights=True)
    assert torch.isfinite(out).all() and torch.isfinite(weights).all()


# ----------------------------------------------------------------- causal transformer


class ReferenceCausal(nn.Module):
    """Same architecture from ``nn.TransformerEncoderLayer`` (norm_first, GELU)."""

    def __init__(self, model: CausalTransformer) -> None:
        super().__init__()
        self.model = model
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                D,
                HEADS,
                D_FF,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in model.blocks
        )
        renamed = {}
        for name, value in model.blocks.state_dict().items():
            for ours, theirs in (
                (".attn.", ".self_attn."),
                (".ff.fc1.", ".linear1."),
                (".ff.fc2.", ".linear2."),
            ):
                name = name.replace(ours, theirs)
            renamed[name] = value
        self.layers.load_state_dict(renamed)  # strict: every tensor must find its twin
        self.layers.train()  # train mode with p = 0 keeps torch off its fused fast path

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.model.embed(tokens)
        mask = causal_bool_mask(tokens.shape[1], tokens.device)
        for layer in self.layers:
            x = layer(x, src_mask=mask, is_causal=True)
        return self.model.head(self.model.final_norm(x))


def test_causal_transformer_matches_torch_encoder_layers() -> None:
    torch.manual_seed(2)
    model = perturb_(tiny_causal())
    tokens = torch.randint(0, 5, (4, 12))
    torch.testing.assert_close(model(tokens), ReferenceCausal(model)(tokens), atol=ATOL, rtol=0)


def test_causality() -> None:
    torch.manual_seed(3)
    model = tiny_causal()
    tokens = torch.randint(0, 5, (2, 10))
    t = 6
    changed = tokens.clone()
    changed[:, t] = (changed[:, t] + 1) % 5
    before, after = model(tokens), model(changed)
    assert torch.equal(before[:, :t], after[:, :t])
    assert not torch.allclose(before[:, t:], after[:, t:], atol=ATOL)


def test_rejects_too_long_input() -> None:
    model = tiny_causal(max_len=4)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 5, dtype=torch.long))


def test_causal_trace_shapes_and_consistency() -> None:
    torch.manual_seed(4)
    model = tiny_causal()
    batch, length = 3, 9
    tokens = torch.randint(0, 5, (batch, length))
    logits, trace = model(tokens, return_trace=True)

    assert isinstance(trace, ModelTrace)
    assert logits.shape == (batch, length, 7)
    assert [h.shape for h in trace.hidden] == [(batch, length, D)] * LAYERS
    assert [a.shape for a in trace.attn] == [(batch, HEADS, length, length)] * LAYERS
    assert trace.encoder_hidden == [] and trace.cross_attn == []
    # hidden[-1] is the residual stream before the final norm: norm + head give the logits.
    torch.testing.assert_close(model.head(model.final_norm(trace.hidden[-1])), logits)
    torch.testing.assert_close(model(tokens), logits)
    for weights in trace.attn:
        torch.testing.assert_close(weights.sum(-1), torch.ones(batch, HEADS, length))
        assert torch.all(weights[..., causal_bool_mask(length)] == 0)


# --------------------------------------------------------------------- parameter counts


def block_params(d: int, d_ff: int, n_attn: int, n_norms: int) -> int:
    """One pre-norm block: attentions (packed QKV + out, with biases), norms, FFN."""
    attention = 4 * d * d + 4 * d
    norms = 2 * d
    ffn = d * d_ff + d_ff + d_ff * d + d
    return n_attn * attention + n_norms * norms + ffn


def test_parameter_counts_dyck_and_modular() -> None:
    d, d_ff, layers = 128, 256, 2
    for vocab, classes, max_len in ((3, 13, 24), (3, 13, 48), (102, 97, 4)):
        model = CausalTransformer(vocab_size=vocab, num_classes=classes, max_len=max_len)
        assert attention_count(model) == 2 * 4 * 128**2 == 131_072
        expected = (
            (vocab + max_len) * d  # token + position embeddings
            + layers * block_params(d, d_ff, n_attn=1, n_norms=2)
            + 2 * d  # final norm
            + d * classes
            + classes  # head
        )
        assert count_parameters(model) == expected
    dyck_48 = CausalTransformer(vocab_size=3, num_classes=13, max_len=48)
    assert count_parameters(dyck_48) == 273_421  # the paper's ~273K (position table of 48)


def test_parameter_counts_scan() -> None:
    d, d_ff, layers = 256, 512, 3
    src_vocab, tgt_vocab, max_src, max_tgt = 14, 9, 9, 49
    model = Seq2SeqTransformer(
        src_vocab_size=src_vocab,
        tgt_vocab_size=tgt_vocab,
        max_src_len=max_src,
        max_tgt_len=max_tgt,
    )
    # 3 encoder self-attentions + 3 decoder self- and 3 cross-attentions, 4 d x d each.
    assert attention_count(model) == 9 * 4 * 256**2 == 2_359_296
    expected = (
        (src_vocab + max_src + tgt_vocab + max_tgt) * d
        + layers * block_params(d, d_ff, n_attn=1, n_norms=2)
        + layers * block_params(d, d_ff, n_attn=2, n_norms=3)
        + 2 * 2 * d  # encoder and decoder final norms
        + d * tgt_vocab
        + tgt_vocab
    )
    assert count_parameters(model) == expected == 3_977_737


# -------------------------------------------------------------- second-order autodiff


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("device", DEVICES)
def test_hvp_through_torch_func_matches_hessian_and_double_backward(device: str) -> None:
    torch.manual_seed(5)
    classes = 4
    model = (
        tiny_causal(num_classes=classes, max_len=6, d_model=8, n_layers=1, n_heads=2, d_ff=16)
        .double()
        .to(device)
    )
    tokens = torch.randint(0, 5, (3, 6), device=device)
    labels = torch.randint(0, classes, (3, 6), device=device)
    names = attention_names(model)
    all_params = {n: p.detach() for n, p in model.named_parameters()}
    params = {n: all_params[n] for n in names}

    def loss(selected: dict[str, Tensor]) -> Tensor:
        logits = functional_call(model, {**all_params, **selected}, (tokens,))
        return F.cross_entropy(logits.reshape(-1, classes), labels.reshape(-1))

    vec = {n: torch.randn_like(p) for n, p in params.items()}
    _, hvp_forward_over_reverse = jvp(grad(loss), (params,), (vec,))

    full = hessian(loss)(params)  # full[a][b]: shape a.shape + b.shape
    hvp_dense = {
        a: sum(torch.tensordot(full[a][b], vec[b], dims=vec[b].ndim) for b in names) for a in names
    }

    leaves = [params[n].clone().requires_grad_() for n in names]
    leaf_loss = loss(dict(zip(names, leaves, strict=True)))
    grads = torch.autograd.grad(leaf_loss, leaves, create_graph=True)
    directional = sum((g * vec[n]).sum() for g, n in zip(grads, names, strict=True))
    hvp_double_backward = torch.autograd.grad(directional, leaves)

    def flat(tensors: list[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    reference = flat([hvp_dense[n] for n in names])
    assert reference.norm() > 0
    for candidate in (
        flat([hvp_forward_over_reverse[n] for n in names]),
        flat(list(hvp_double_backward)),
    ):
        assert (candidate - reference).norm() / reference.norm() <= HVP_RTOL


# ---------------------------------------------------------------------------- seq2seq


def random_source(lengths: list[int], width: int, vocab: int = 11) -> Tensor:
    """Real tokens (never pad/bos/eos) right-padded to ``width``."""
    src = torch.randint(3, vocab, (len(lengths), width))
    return src.masked_fill(right_padding(lengths, width), PAD)


def test_seq2seq_matches_torch_layers() -> None:
    torch.manual_seed(6)
    model = perturb_(tiny_seq2seq())
    enc = nn.ModuleList(
        nn.TransformerEncoderLayer(D, HEADS, D_FF, 0.0, "gelu", batch_first=True, norm_first=True)
        for _ in model.encoder_blocks
    )
    dec = nn.ModuleList(
        nn.TransformerDecoderLayer(D, HEADS, D_FF, 0.0, "gelu", batch_first=True, norm_first=True)
        for _ in model.decoder_blocks
    )
    renames = (
        (".cross_attn.", ".multihead_attn."),
        (".attn.", ".self_attn."),
        (".ff.fc1.", ".linear1."),
        (".ff.fc2.", ".linear2."),
    )
    for ours, theirs in ((model.encoder_blocks, enc), (model.decoder_blocks, dec)):
        state = {}
        for name, value in ours.state_dict().items():
            for old, new in renames:
                name = name.replace(old, new)
            state[name] = value
        theirs.load_state_dict(state)
        theirs.train()  # p = 0; avoids torch's fused inference path

    src = random_source([6, 3, 1], 6)
    tgt_in = torch.randint(3, 9, (3, 5))
    tgt_in[:, 0] = BOS
    padding = src == PAD
    x = model.src_embed(src)
    for layer in enc:
        x = layer(x, src_key_padding_mask=padding)
    memory = model.encoder_norm(x)
    y = model.tgt_embed(tgt_in)
    for layer in dec:
        y = layer(
            y,
            memory,
            tgt_mask=causal_bool_mask(5),
            memory_key_padding_mask=padding,
            tgt_is_causal=True,
        )
    expected = model.head(model.decoder_norm(y))
    torch.testing.assert_close(model(src, tgt_in), expected, atol=ATOL, rtol=0)


def test_seq2seq_shapes_and_trace() -> None:
    torch.manual_seed(7)
    model = tiny_seq2seq()
    batch, src_len, tgt_len = 3, 6, 5
    src = random_source([6, 4, 2], src_len)
    tgt_in = torch.randint(3, 9, (batch, tgt_len))
    logits, trace = model(src, tgt_in, return_trace=True)
    assert logits.shape == (batch, tgt_len, 9)
    assert [h.shape for h in trace.hidden] == [(batch, tgt_len, D)] * 2
    assert [h.shape for h in trace.encoder_hidden] == [(batch, src_len, D)] * 2
    assert [a.shape for a in trace.attn] == [(batch, HEADS, tgt_len, tgt_len)] * 2
    assert [a.shape for a in trace.cross_attn] == [(batch, HEADS, tgt_len, src_len)] * 2
    # cross-attention never looks at source padding
    for weights in trace.cross_attn:
        assert torch.all(weights.masked_select((src == PAD)[:, None, None, :]) == 0)
    torch.testing.assert_close(model.head(model.decoder_norm(trace.hidden[-1])), logits)


def test_seq2seq_padding_invariance() -> None:
    torch.manual_seed(8)
    model = tiny_seq2seq()
    lengths = [5, 3, 1]
    src = random_source(lengths, 5)
    longer = torch.cat([src, torch.full((3, 4), PAD)], dim=1)
    tgt_in = torch.randint(3, 9, (3, 6))
    short_logits, short_trace = model(src, tgt_in, return_trace=True)
    long_logits, long_trace = model(longer, tgt_in, return_trace=True)
    torch.testing.assert_close(short_logits, long_logits, atol=ATOL, rtol=0)
    for row, n in enumerate(lengths):
        pairs = zip(short_trace.encoder_hidden, long_trace.encoder_hidden, strict=True)
        for short_h, long_h in pairs:
            torch.testing.assert_close(short_h[row, :n], long_h[row, :n], atol=ATOL, rtol=0)


def test_generate_matches_stepwise_argmax() -> None:
    torch.manual_seed(9)
    model = tiny_seq2seq().eval()
    src = random_source([6, 5, 4, 3, 2, 1], 6)
    max_len = 10
    generated = model.generate(src, max_len)

    rows = []
    for b in range(src.shape[0]):
        prefix, out = [BOS], []
        for _ in range(max_len):
            step = model(src[b : b + 1], torch.tensor([prefix]))[0, -1].argmax().item()
            out.append(step)
            if step == EOS:
                break
            prefix.append(step)
        rows.append(out)
    width = max(len(r) for r in rows)
    expected = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    assert generated.dtype == torch.long
    assert torch.equal(generated, expected)
    # the seed must exercise rows that stop at different steps (pads after an early EOS)
    assert len({len(r) for r in rows}) > 1 and (generated == PAD).any()


class ScriptedDecoder:
    """Stands in for ``decode``: row b emits a content token until step ends[b], then EOS."""

    def __init__(self, ends: list[int | None], vocab: int) -> None:
        self.ends, self.vocab, self.calls = ends, vocab, 0

    def __call__(self, prefix: Tensor, memory: Tensor, padding: Tensor, trace=None) -> Tensor:
        self.calls += 1
        step = prefix.shape[1]  # tokens emitted so far + 1
        logits = torch.zeros(prefix.shape[0], prefix.shape[1], self.vocab)
        for b, end in enumerate(self.ends):
            logits[b, -1, EOS if end == step else 3] = 1.0
        return logits


def test_generate_stops_on_eos_and_pads(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_seq2seq()
    script = ScriptedDecoder([2, 4, 1], vocab=9)
    monkeypatch.setattr(model, "decode", script)
    out = model.generate(random_source([3, 3, 3], 3), max_len=10)
    expected = torch.tensor([[3, EOS, PAD, PAD], [3, 3, 3, EOS], [EOS, PAD, PAD, PAD]])
    assert torch.equal(out, expected)
    assert script.calls == 4  # stopped as soon as every row had finished

    monkeypatch.setattr(model, "decode", ScriptedDecoder([2, None], vocab=9))
    out = model.generate(random_source([3, 3], 3), max_len=5)
    assert torch.equal(out, torch.tensor([[3, EOS, PAD, PAD, PAD], [3, 3, 3, 3, 3]]))


def test_generate_encodes_once_and_checks_max_len(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_seq2seq()
    calls = []
    original = model.encode
    monkeypatch.setattr(model, "encode", lambda *a, **k: calls.append(1) or original(*a, **k))
    model.generate(random_source([3, 2], 3), max_len=6)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="max_len"):
        model.generate(random_source([3], 3), max_len=model.max_tgt_len + 1)
