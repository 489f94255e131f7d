"""DeltaRecorder without a Trainer: a tiny net trained by AdamW, its edge checked against a
dense SVD of the raw deltas, and a state round trip that continues bit for bit."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from grokedge.edge.recorder import DeltaRecorder

INTERVAL = 2
WINDOW = 4
TOP_K = 3


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def _step(net: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 5, generator=gen)
    y = torch.randn(16, 3, generator=gen)
    opt.zero_grad()
    (net(x) - y).square().mean().backward()
    opt.step()


def _flat(net: nn.Module) -> torch.Tensor:
    """θ in the recorder's layout: the parameters by sorted name, flattened."""
    named = sorted(net.named_parameters(), key=lambda item: item[0])
    return torch.cat([p.detach().reshape(-1) for _, p in named]).clone()


def _recorder() -> DeltaRecorder:
    return DeltaRecorder(interval=INTERVAL, window=WINDOW, top_k=TOP_K, edge_definition="paper")


def _train(
    rec: DeltaRecorder,
    net: nn.Module,
    opt: torch.optim.Optimizer,
    start: int,
    stop: int,
    deltas: list[torch.Tensor] | None = None,
) -> None:
    theta = _flat(net)
    for step in range(start, stop):
        _step(net, opt, step)
        if (step + 1) % INTERVAL == 0:
            assert rec.capture(step + 1)
            if deltas is not None:
                now = _flat(net)
                deltas.append(now - theta)
                theta = now


def test_edge_matches_a_dense_svd_of_the_raw_deltas() -> None:
    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.5)
    rec = _recorder()
    rec.attach(net.named_parameters(), opt, step=0)
    deltas: list[torch.Tensor] = []
    _train(rec, net, opt, 0, 7 * INTERVAL, deltas)  # 7 pushes: the window slid 3 times
    assert rec.edge is not None and rec.previous is not None
    assert rec.edge.count == WINDOW and rec.skipped_deltas == 0
    assert rec.edge.step == 7 * INTERVAL and rec.last_capture_step == 7 * INTERVAL
    assert rec.edge.spans == [(i * INTERVAL, (i + 1) * INTERVAL) for i in range(3, 7)]
    assert rec.evicted_dot == pytest.approx(float(deltas[2].double() @ deltas[6].double()))
    assert set(rec.spectra) == {"paper", "burn_in", "normalized"}
    assert rec.provenance is not None

    x = torch.stack(deltas[-WINDOW:]).double()  # [W, p], oldest first
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    torch.testing.assert_close(rec.edge.sigma, s, rtol=1e-5, atol=1e-9)
    vectors = rec.edge.vectors.double()
    assert vectors.shape == (TOP_K, x.shape[1])
    for k in range(TOP_K):
        assert abs(float(vectors[k] @ vh[k])) == pytest.approx(1.0, abs=1e-4)
    # grad + wd projections are the total deltas' projections on v_k.
    torch.testing.assert_close(rec.edge.total_proj, x @ vectors.T, rtol=1e-4, atol=1e-7)
    rec.detach()


def test_state_round_trip_continues_bit_identically() -> None:
    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.5)
    rec = _recorder()
    rec.attach(net.named_parameters(), opt, step=0)
    _train(rec, net, opt, 0, 5 * INTERVAL + 1)  # mid-interval: the WD part is partial
    assert rec.edge is not None

    buf = io.BytesIO()
    torch.save(rec.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # tensors and primitives only
    assert state.keys() == rec.state_dict().keys()
    net2 = copy.deepcopy(net)
    opt2 = torch.optim.AdamW(net2.parameters(), lr=0.05, weight_decay=0.5)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    fresh = _recorder()
    fresh.load_state_dict(state)  # before attach: waits for it
    fresh.attach(net2.named_parameters(), opt2, step=5 * INTERVAL + 1)
    assert fresh.previous is None and fresh.edge is not None
    assert torch.equal(fresh.edge.sigma, rec.edge.sigma)
    assert torch.equal(fresh.edge.vectors, rec.edge.vectors)

    end = 9 * INTERVAL
    _train(rec, net, opt, 5 * INTERVAL + 1, end)
    _train(fresh, net2, opt2, 5 * INTERVAL + 1, end)
    assert rec.edge.step == fresh.edge.step == end
    assert rec.previous is not None and fresh.previous is not None
    for a, b in ((rec.edge, fresh.edge), (rec.previous, fresh.previous)):
        assert a.step == b.step
        for name in ("sigma", "vectors", "grad_proj", "wd_proj", "gram", "cross_gram"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert rec.evicted_dot == fresh.evicted_dot
    assert rec.skipped_deltas == fresh.skipped_deltas == 0
    rec.detach()
    fresh.detach()


def test_load_refuses_another_interval_naming_the_key() -> None:
    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.5)
    rec = _recorder()
    rec.attach(net.named_parameters(), opt, step=0)
    _train(rec, net, opt, 0, 3 * INTERVAL)
    other = DeltaRecorder(interval=INTERVAL + 1, window=WINDOW, top_k=TOP_K, key="rec")
    other.load_state_dict(rec.state_dict())
    with pytest.raises(ValueError, match=r"rec\.interval=3 differs"):
        other.attach(net.named_parameters(), opt, step=3 * INTERVAL)
    other.detach()
    rec.detach()
