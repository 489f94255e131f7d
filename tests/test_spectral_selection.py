"""ParameterSelector on a toy module with attention and non-attention parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from grokedge.edge.selection import ParameterSelector, slice_bounds

D = 8
HEADS = 2


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.linear = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.self_attn(h, h, h, need_weights=False)[0] + self.linear(h)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, D)
        # registered out of alphabetical order on purpose
        self.layers = nn.ModuleList([Block(), Block()])
        self.decoy_out_proj = nn.Linear(D, D)  # "...out_proj.weight" is not a component match
        self.head = nn.Linear(D, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


ATTENTION_NAMES = (
    "layers.0.self_attn.in_proj_weight",
    "layers.0.self_attn.out_proj.weight",
    "layers.1.self_attn.in_proj_weight",
    "layers.1.self_attn.out_proj.weight",
)


@pytest.fixture
def toy() -> Toy:
    torch.manual_seed(0)
    return Toy()


def test_attention_selects_exactly_the_projection_weights(toy):
    sel = ParameterSelector.from_module(toy)
    assert sel.names == ATTENTION_NAMES
    assert list(sel.names) == sorted(sel.names)
    assert sel.shapes == ((3 * D, D), (D, D), (3 * D, D), (D, D))
    assert sel.p == 2 * (3 * D * D + D * D)
    assert sel.offsets[1] == 3 * D * D


def test_all_and_patterns(toy):
    assert ParameterSelector.from_module(toy, "all").names == tuple(
        sorted(n for n, _ in toy.named_parameters())
    )
    sel = ParameterSelector.from_module(toy, ["head.*", "layers.1.linear.weight"])
    assert sel.names == ("head.bias", "head.weight", "layers.1.linear.weight")


def test_empty_or_malformed_selection_names_key_value_and_allowed(toy):
    with pytest.raises(ValueError) as err:
        ParameterSelector.from_module(toy, ["nothing.*"])
    message = str(err.value)
    assert "callbacks.gram.select" in message and "nothing.*" in message
    assert "attention" in message and "fnmatch" in message
    with pytest.raises(ValueError, match="callbacks.gram.select='mlp'"):
        ParameterSelector.from_module(toy, "mlp")
    with pytest.raises(ValueError, match="my.key"):
        ParameterSelector(toy.named_parameters(), [], key="my.key")


def test_flatten_unflatten_round_trip_and_write_back(toy):
    sel = ParameterSelector.from_module(toy)
    flat = sel.flatten(toy)
    params = dict(toy.named_parameters())
    expected = torch.cat([params[n].detach().reshape(-1) for n in ATTENTION_NAMES])
    assert torch.equal(flat, expected)
    assert torch.equal(sel.flatten(params), flat)
    views = sel.unflatten(flat)
    assert list(views) == list(ATTENTION_NAMES)
    for name, view in views.items():
        assert torch.equal(view, params[name])
        assert view.data_ptr() >= flat.data_ptr()  # views, not copies
    new = torch.randn(sel.p)
    sel.write_back(new, toy)
    assert torch.equal(sel.flatten(toy), new)


def test_functional_params_leave_the_module_untouched(toy):
    sel = ParameterSelector.from_module(toy)
    tokens = torch.randint(0, 5, (2, 4))
    before = sel.flatten(toy)
    shifted = before + 0.1
    out = torch.func.functional_call(toy, sel.functional_params(shifted, toy), (tokens,))
    assert torch.equal(sel.flatten(toy), before)
    sel.write_back(shifted, toy)
    assert torch.allclose(out, toy(tokens), atol=1e-6)


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_slices_cover_the_vector_contiguously(toy, world_size):
    sel = ParameterSelector.from_module(toy)
    bounds = [sel.slice_bounds(r, world_size) for r in range(world_size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == sel.p
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1
    flat = sel.flatten(toy)
    parts = [sel.flatten(toy, a, b) for a, b in bounds]
    assert torch.equal(torch.cat(parts), flat)
    with pytest.raises(ValueError):
        slice_bounds(10, world_size, world_size)
