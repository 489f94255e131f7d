"""The paper code's initialisation of the Dyck model, draw for draw.

The paper's code seeds torch's global generator, then builds its model from torch's own
modules: token and position embeddings, *one* ``nn.TransformerEncoderLayer`` that
``nn.TransformerEncoder`` deep-copies into every layer (so all layers start identical),
a final LayerNorm and the head. Its training batches are then ``torch.randint`` draws
from the same global generator. :func:`init_like_paper_` re-initialises a
:class:`~grokedge.models.CausalTransformer` consuming the global generator in exactly that
order, so that with the same seed grokedge starts from the paper's weights and (with
``batch_stream=paper`` in the Dyck data) trains on the paper's batch sequence.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from grokedge.models.encoder import CausalTransformer


def _linear_(layer: nn.Linear) -> None:
    # nn.Linear.reset_parameters: kaiming-uniform weight, then a uniform bias.
    layer.reset_parameters()


@torch.no_grad()
def init_like_paper_(
    net: CausalTransformer, paper_classes: int, extra_seed: int = 0
) -> torch.Tensor:
    """Re-initialise ``net`` as the paper's code initialises its Dyck model.

    Args:
        net: the model; every block gets the first block's initial weights.
        paper_classes: classes of the paper's head (13). Rows of a larger head (classes
            sized to an out-of-distribution set) beyond these are drawn from a separate
            generator seeded ``extra_seed``, so the global stream stays the paper's.
        extra_seed: seed of that separate generator.

    Returns:
        The global generator's state right after the paper's last draw: where its
        training-batch stream starts.
    """
    nn.init.normal_(net.embed.token.weight)
    nn.init.normal_(net.embed.position.weight)
    first = net.blocks[0]
    attn = first.attn
    # nn.MultiheadAttention builds out_proj (a Linear: draws) before its own reset.
    _linear_(attn.out_proj)
    nn.init.xavier_uniform_(attn.in_proj_weight)
    nn.init.zeros_(attn.in_proj_bias)
    nn.init.zeros_(attn.out_proj.bias)
    _linear_(first.ff.fc1)
    _linear_(first.ff.fc2)
    for norm in (first.norm1, first.norm2, net.final_norm):
        norm.reset_parameters()
    for block in net.blocks[1:]:
        block.load_state_dict(first.state_dict())
    head = net.head
    classes = head.out_features
    if classes < paper_classes:
        raise ValueError(f"head has {classes} classes, fewer than the paper's {paper_classes}")
    weight, bias = _paper_head(head.in_features, paper_classes)
    state = torch.get_rng_state()
    head.weight[:paper_classes] = weight
    head.bias[:paper_classes] = bias
    if classes > paper_classes:
        generator = torch.Generator().manual_seed(extra_seed)
        bound = 1.0 / math.sqrt(head.in_features)
        extra = classes - paper_classes
        head.weight[paper_classes:] = _kaiming_rows(extra, head.in_features, generator)
        head.bias[paper_classes:] = torch.empty(extra).uniform_(-bound, bound, generator=generator)
    return state


def _paper_head(in_features: int, classes: int) -> tuple[Tensor, Tensor]:
    layer = nn.Linear(in_features, classes)  # its construction draws as the paper's head
    return layer.weight.detach(), layer.bias.detach()


def _kaiming_rows(rows: int, in_features: int, generator: torch.Generator) -> Tensor:
    # kaiming_uniform_(a=sqrt(5)) bound for fan_in = in_features: 1/sqrt(fan_in).
    bound = 1.0 / math.sqrt(in_features)
    return torch.empty(rows, in_features).uniform_(-bound, bound, generator=generator)
