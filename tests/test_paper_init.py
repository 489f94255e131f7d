"""The paper protocol: the paper code's initial weights and batch stream, draw for draw."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from grokedge.models import CausalTransformer
from grokedge.tasks.dyck import DyckDataModule


class PaperModel(nn.Module):
    """The paper's Dyck model built from torch's modules, in its construction order."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(3, 128)
        self.pos = nn.Embedding(48, 128)
        layer = nn.TransformerEncoderLayer(
            128, 4, 256, 0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(128)
        self.head = nn.Linear(128, 13)


@pytest.mark.parametrize("seed", [42, 137])
def test_initial_weights_and_batch_stream_are_the_papers(seed: int) -> None:
    torch.manual_seed(seed)
    ref = PaperModel()
    ref_batches = [torch.randint(0, 50, (50,)) for _ in range(4)]

    dm = DyckDataModule()
    dm.setup()
    net = CausalTransformer(**dm.model_dims())
    dm.init_model_(net, seed)
    pairs = [
        (net.embed.token.weight, ref.tok.weight),
        (net.embed.position.weight, ref.pos.weight),
        (net.head.weight, ref.head.weight),
        (net.head.bias, ref.head.bias),
    ]
    for block, layer in zip(net.blocks, ref.encoder.layers, strict=True):
        pairs += [
            (block.attn.in_proj_weight, layer.self_attn.in_proj_weight),
            (block.attn.out_proj.weight, layer.self_attn.out_proj.weight),
            (block.ff.fc1.weight, layer.linear1.weight),
            (block.ff.fc1.bias, layer.linear1.bias),
            (block.ff.fc2.weight, layer.linear2.weight),
        ]
    for ours, theirs in pairs:
        assert torch.equal(ours, theirs)

    # Batch k holds the paper's k-th draw, in any order of asking (resume-safe).
    for k in (2, 0, 3, 1):
        drawn = dm.sample_train_batch(k)
        distinct = dm.train_distinct
        expected = torch.bincount(distinct.index[ref_batches[k]], minlength=len(distinct.strings))
        got = torch.zeros_like(expected)
        for row, count in zip(drawn["tokens"], drawn["weight"], strict=True):
            match = (distinct.tokens[:, : row.shape[0]] == row).all(1) & (
                distinct.lengths <= row.shape[0]
            )
            got[match.nonzero()[0]] += int(count)
        assert torch.equal(got, expected)


def test_paper_protocol_off_keeps_the_models_own_initialisation() -> None:
    dm = DyckDataModule(paper_protocol=False)
    dm.setup()
    torch.manual_seed(0)
    net = CausalTransformer(**dm.model_dims())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    dm.init_model_(net, 0)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
