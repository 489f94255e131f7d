"""window_memory_bytes against what a real GramCallback allocates."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from torch import nn

from grokedge.callbacks.gram import GramCallback
from grokedge.edge.memory import window_memory, window_memory_bytes


def _live_storages() -> dict[int, int]:
    """data_ptr -> nbytes of every storage some live tensor uses (found through gc)."""
    out: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance on deprecated torch objects warns
        warnings.simplefilter("ignore")
        objects = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for obj in objects:
        if obj.device.type == "cpu":
            storage = obj.untyped_storage()
            if storage.nbytes():
                out[storage.data_ptr()] = storage.nbytes()
    return out


class TwoLinear(nn.Module):
    """p = 2·d² selected elements plus unselected biases."""

    def __init__(self, d: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.a = nn.Linear(d, d, dtype=dtype)
        self.b = nn.Linear(d, d, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize(
    "buffer_dtype,param_dtype",
    [("float32", torch.float32), ("bfloat16", torch.float32), ("float64", torch.float64)],
)
def test_prediction_equals_the_bytes_gram_callback_allocates(
    buffer_dtype: str, param_dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    d, window, top_k = 96, 3, 2
    model = TwoLinear(d, param_dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.5)
    x = torch.randn(8, d, dtype=param_dtype)

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        model(x).square().mean().backward()
        opt.step()

    step()  # optimizer state and gradients exist before the callback does
    gc.collect()
    before = _live_storages()
    gram = GramCallback(
        select=["a.weight", "b.weight"],
        interval=1,
        window=window,
        top_k=top_k,
        buffer_dtype=buffer_dtype,
    )
    gram.attach(model, opt)
    for i in range(window + 2):  # fill and wrap the ring; both vector buffers in use
        step()
        assert gram.capture(i + 1)
    assert gram.edge is not None and gram.previous is not None
    # Drop the transient EdgeState tensors that are not buffers: only storages alive
    # because of the callback's own buffers count (the states' vectors live in them).
    gc.collect()
    after = _live_storages()
    new = {ptr: n for ptr, n in after.items() if ptr not in before}
    p = 2 * d * d
    multiples = gram.interval_multiples  # the default derives N = 2·N0 and 3·N0 windows too
    predicted = window_memory(
        p, window, top_k, buffer_dtype, param_dtype=param_dtype, interval_multiples=multiples
    )
    # Every p-sized buffer is counted exactly; the only other new storages are the W×W
    # matrices (a few hundred bytes) and the EdgeStates' tiny CPU float64 read-outs.
    big = sum(n for n in new.values() if n >= 4096)
    assert big == predicted.persistent - predicted.matrices - predicted.derived_matrices
    assert predicted.matrices in new.values()
    assert window_memory_bytes(
        p, window, top_k, buffer_dtype, param_dtype=param_dtype, interval_multiples=multiples
    ) == (predicted.persistent)


def test_the_leading_term_is_two_w_p_bytes() -> None:
    """At large p the window is 2·W·p·b and the total (2W + 2k + 3)·p·4 for float32."""
    p, window, top_k = 50_000_000, 5, 4
    m = window_memory(p, window, top_k, "float32")
    assert m.window == 2 * window * p * 4
    assert m.vectors == 2 * top_k * p * 4
    assert window_memory_bytes(p, window, top_k, "float32") == pytest.approx(
        (2 * window + 2 * top_k + 3) * p * 4, rel=0.01
    )
    half = window_memory(p, window, top_k, torch.bfloat16)
    assert half.window == m.window // 2 and half.transient == 2 * p * 2


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="float8"):
        window_memory_bytes(10, 5, 4, "float8")
    with pytest.raises(ValueError, match="window >= 2"):
        window_memory_bytes(10, 1, 4, "float32")
