"""Derived windows (every Gram interval N = k·N0 from one run) against brute force, against a
run recorded directly at N, through checkpoints and across ranks."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from torch import Tensor, nn

from grokedge.callbacks.gram import GramCallback
from grokedge.checks import ConfigError
from grokedge.edge.definitions import BURN_IN, EDGE_DEFINITIONS, NORMALIZED, PAPER
from grokedge.edge.derived_windows import materialise_edge
from grokedge.edge.memory import derived_memory
from grokedge.edge.readouts import definition_readouts
from grokedge.edge.recorder import DeltaRecorder
from grokedge.edge.spectrum import EdgeState, WindowSpectrum
from tests.test_spectral_sharding import _train_gram, run_ranks

DEFINITIONS = EDGE_DEFINITIONS

# ------------------------------------------------------------------- helpers


def _attached(
    p: int, multiples: list[int], window: int = 4, top_k: int = 3, **kwargs
) -> DeltaRecorder:
    """A recorder attached to a [p] parameter (its deltas are then pushed by hand)."""
    param = nn.Parameter(torch.zeros(p))
    opt = torch.optim.AdamW([param], lr=0.1, weight_decay=0.5)
    rec = DeltaRecorder(
        interval=10, window=window, top_k=top_k, interval_multiples=multiples, **kwargs
    )
    rec.attach([("w", param)], opt, step=0)
    return rec


def _brute_rows(
    totals: list[Tensor], wds: list[Tensor], spans: list[tuple[int, int]], definition: str, start
) -> tuple[Tensor, Tensor]:
    """X' and X'_wd [W'', p] float64 of a window under ``definition``, formed explicitly."""
    x, xw = torch.stack(totals).double(), torch.stack(wds).double()
    if definition == BURN_IN:
        keep = [i for i, (b, _) in enumerate(spans) if b >= start]
        x, xw = x[keep], xw[keep]
    elif definition == NORMALIZED:
        norms = x.norm(dim=1, keepdim=True)
        x, xw = x / norms, xw / norms
    return x, xw


def _brute_readouts(x: Tensor, xw: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """σ [W''], v_k [k, p], the grad and WD energy shares of v_1..v_k (dense SVD)."""
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    k = min(top_k, x.shape[0])
    v = vh[:k]
    grad, wd = (x - xw) @ v.T, xw @ v.T
    g, w = grad.pow(2).mean(0), wd.pow(2).mean(0)
    return s, v, g / (g + w), w / (g + w)


def assert_same_direction(got: Tensor, want: Tensor, tol: float) -> None:
    """Rows of ``got`` and ``want`` equal up to each row's sign, ‖v_a ∓ v_b‖ <= tol."""
    for a, b in zip(got.double(), want.double(), strict=True):
        err = min(float((a - b).norm()), float((a + b).norm()))
        assert err <= tol, err


# ------------------------------------------------------------ 1. brute force


def test_derived_spectra_equal_a_dense_svd_of_the_summed_deltas() -> None:
    """float64 buffers: σ, v_k and the grad/WD shares of every derived window, under every
    definition, equal a dense SVD of the explicitly summed deltas to 1e-9."""
    p, window, top_k, n0 = 40, 4, 3, 10
    rec = _attached(p, [1, 2, 3], window, top_k, buffer_dtype="float64")
    gen = torch.Generator().manual_seed(7)
    shared = torch.randn(p, generator=gen, dtype=torch.float64)
    totals, wds = [], []
    checked = dict.fromkeys((2, 3), 0)
    for i in range(20):
        scale = 30.0 if i == 0 else 1.0  # the large first delta, as in a real run
        total = scale * (shared + torch.randn(p, generator=gen, dtype=torch.float64))
        wd = -0.3 * total + 0.2 * torch.randn(p, generator=gen, dtype=torch.float64)
        totals.append(total)
        wds.append(wd)
        step = (i + 1) * n0
        assert rec.push_delta(total, wd, step, begin=step - n0)
        assert rec.derived is not None
        for k in rec.derived.published:
            blocks = (i + 1) // k
            assert (i + 1) % k == 0 and blocks >= 2
            sums = [sum(totals[j * k : (j + 1) * k]) for j in range(blocks)][-window:]
            wd_sums = [sum(wds[j * k : (j + 1) * k]) for j in range(blocks)][-window:]
            first = blocks - len(sums)
            spans = [((first + j) * k * n0, (first + j + 1) * k * n0) for j in range(len(sums))]
            spectra = rec.derived.spectra[k]
            assert spectra[PAPER].spans == spans
            start = rec.derived.start_step(k)
            assert start == k * n0
            for d in DEFINITIONS:
                x, xw = _brute_rows(sums, wd_sums, spans, d, start)
                spec = spectra[d]
                if x.shape[0] < 2:
                    assert spec is None, (k, d, step)
                    continue
                s, v, grad_frac, wd_frac = _brute_readouts(x, xw, top_k)
                torch.testing.assert_close(spec.sigma, s, rtol=1e-9, atol=1e-12 * float(s[0]))
                r = definition_readouts(spec)
                kk = len(grad_frac)
                torch.testing.assert_close(
                    torch.tensor(r["grad_frac"][:kk], dtype=torch.float64),
                    grad_frac,
                    rtol=1e-9,
                    atol=0,
                )
                torch.testing.assert_close(
                    torch.tensor(r["wd_frac"][:kk], dtype=torch.float64), wd_frac, rtol=1e-9, atol=0
                )
                edge = rec.derived.edge(k, d)
                assert isinstance(edge, EdgeState) and edge.vectors.shape == (top_k, p)
                assert_same_direction(edge.vectors[:kk], v, 1e-9)
                checked[k] += 1
    assert checked[2] >= 20 and checked[3] >= 12
    # The provenance is the raw derived window's: its first delta carries the large one.
    prov = rec.derived.provenance[2]
    assert prov is not None and prov.last_step == 200 and prov.first_step == 120


def test_a_block_with_a_skipped_delta_is_discarded_and_alignment_kept() -> None:
    p, n0 = 12, 10
    rec = _attached(p, [1, 2, 3], window=3, buffer_dtype="float64")
    gen = torch.Generator().manual_seed(2)
    totals = [torch.randn(p, generator=gen, dtype=torch.float64) for _ in range(12)]
    bad = 3  # base delta 4 (steps 30-40): in k = 2's block [2, 3], k = 3's [3, 4, 5]
    for i, total in enumerate(totals):
        step = (i + 1) * n0
        if i == bad:
            with pytest.warns(RuntimeWarning, match="non-finite update delta"):
                assert not rec.push_delta(torch.full((p,), math.nan), 0 * total, step, step - n0)
        else:
            assert rec.push_delta(total, 0.1 * total, step, step - n0)
    d = rec.derived
    assert d is not None and d.discarded == {2: 1, 3: 1} and d.base_pushes == 12
    assert d.windows[2].spans() == [(60, 80), (80, 100), (100, 120)]
    assert d.windows[3].spans() == [(0, 30), (60, 90), (90, 120)]
    want = totals[9] + totals[10] + totals[11]  # θ(120) − θ(90)
    torch.testing.assert_close(d.windows[3].deltas()[-1], want, rtol=1e-12, atol=0)
    torch.testing.assert_close(d.windows[3].wd_deltas()[-1], 0.1 * want, rtol=1e-12, atol=1e-15)


def test_base_window_is_bit_identical_and_nothing_is_allocated_for_one_multiple() -> None:
    p = 300
    base = _attached(p, [1])
    multi = _attached(p, [1, 2, 3])
    assert base.derived is None and multi.derived is not None
    gen = torch.Generator().manual_seed(5)
    for i in range(9):
        total = torch.randn(p, generator=gen)
        wd = 0.2 * torch.randn(p, generator=gen)
        assert base.push_delta(total, wd, (i + 1) * 10, i * 10)
        assert multi.push_delta(total, wd, (i + 1) * 10, i * 10)
        assert (base.edge is None) == (multi.edge is None)
        if base.edge is None:
            continue
        for name in ("sigma", "vectors", "grad_proj", "wd_proj", "gram", "cross_gram"):
            assert torch.equal(getattr(base.edge, name), getattr(multi.edge, name)), name
        for d in DEFINITIONS:
            a, b = base.spectra[d], multi.spectra[d]
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.equal(a.sigma, b.sigma) and torch.equal(a.grad_proj, b.grad_proj)
        assert base.provenance == multi.provenance
        assert base.evicted_dot == multi.evicted_dot
    derived_bytes, matrices = derived_memory(p, 4, "float32", (1, 2, 3))
    assert multi.predicted_bytes == base.predicted_bytes + derived_bytes + matrices
    assert "with derived windows N = 20, 30" in multi.describe_buffers()
    assert "derived" not in base.describe_buffers()
    assert "derived" not in base.state_dict() or base.state_dict()["derived"] is None


@pytest.mark.parametrize("buffer_dtype", ["float32", "bfloat16", "float64"])
def test_predicted_bytes_count_the_derived_buffers(buffer_dtype: str) -> None:
    p, window = 5000, 4
    rec = _attached(p, [1, 2, 3], window, buffer_dtype=buffer_dtype)
    gen = torch.Generator().manual_seed(1)
    for i in range(6):  # every derived window pushed (its scratch, if any, allocated)
        assert rec.push_delta(torch.randn(p, generator=gen), torch.zeros(p), i + 1, i)
    d = rec.derived
    assert d is not None
    allocated = 0
    for k in d.multiples:
        win = d.windows[k]
        allocated += win._buf.nbytes + d._acc[k].nbytes
        allocated += 0 if win._scratch is None else win._scratch.nbytes
    predicted, matrices = derived_memory(p, window, buffer_dtype, (1, 2, 3))
    assert allocated == predicted
    assert matrices == sum(d.windows[k]._mats.nbytes for k in d.multiples)


# --------------------------------------------- 2. a real run vs a direct run at N


class _Tiny(nn.Module):
    """A tiny attention model: an embedding, one multi-head attention and a readout."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(11, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.out = nn.Linear(16, 11)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.out(h)


def _run(
    interval: int, multiples: list[int], steps: int, buffer_dtype: str
) -> tuple[nn.Module, dict[int, dict]]:
    """Train the tiny model on a fixed task (predict the running max mod 11) with AdamW,
    a warm-up and gradient clipping; record with a DeltaRecorder every ``interval``.
    Returns the model and, per capture step, the recorded windows' read-outs."""
    torch.manual_seed(1)
    model = _Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 120))
    rec = DeltaRecorder(
        interval,
        window=5,
        top_k=3,
        edge_definition=PAPER,
        interval_multiples=multiples,
        buffer_dtype=buffer_dtype,
    )
    rec.attach(model.named_parameters(), opt, step=0)
    gen = torch.Generator().manual_seed(3)
    seen: dict[int, dict] = {}
    for step in range(1, steps + 1):
        tokens = torch.randint(0, 11, (32, 8), generator=gen)
        target = tokens.cummax(dim=1).values
        loss = nn.functional.cross_entropy(model(tokens).reshape(-1, 11), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % interval == 0:
            assert rec.capture(step)
            if rec.derived is not None and 2 in rec.derived.published:
                k, spectra, window = 2, rec.derived.spectra[2], rec.derived.windows[2]
                start = rec.derived.start_step(k)
            elif rec.derived is None and rec.spectra:
                spectra, window, start = rec.spectra, rec.window, rec.start_step
            else:
                continue
            seen[step] = {
                "spectra": spectra,
                "edges": {d: materialise_edge(spectra, window, d, start) for d in DEFINITIONS},
            }
    rec.detach()
    return model, seen


@pytest.mark.parametrize("buffer_dtype", ["float32", "float64"])
def test_derived_window_of_a_real_run_equals_a_run_recorded_at_that_interval(
    buffer_dtype: str,
) -> None:
    """N0 = 50 with multiples [1, 2] vs the same seed recorded at N = 100: the derived
    N = 100 windows are the direct ones (σ, v_k up to sign, grad shares), every window,
    every definition; and the recorder never touches training (bit-identical models)."""
    steps = 900
    derived_model, derived = _run(50, [1, 2], steps, buffer_dtype)
    direct_model, direct = _run(100, [1], steps, buffer_dtype)
    for a, b in zip(derived_model.parameters(), direct_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert sorted(derived) == sorted(direct) == list(range(200, steps + 1, 100))
    compared = 0
    for step, want in direct.items():
        got = derived[step]
        for d in DEFINITIONS:
            ws: WindowSpectrum | None = want["spectra"][d]
            gs: WindowSpectrum | None = got["spectra"][d]
            assert (ws is None) == (gs is None), (step, d)
            if ws is None or gs is None:
                continue
            assert gs.spans == ws.spans
            # σ_j to 1e-6 relative, of σ_1 for the smallest (float32 buffers: each Gram
            # entry is exact to ~1e-7 of the largest entries, grokedge.edge.window).
            torch.testing.assert_close(
                gs.sigma, ws.sigma, rtol=1e-6, atol=1e-6 * float(ws.sigma[0])
            )
            rg, rw = definition_readouts(gs), definition_readouts(ws)
            # The window-mean grad shares of v_1..v_3 to 1e-6 relative (a NaN share, no v_3
            # in a two-delta burn_in window, on both sides); the WD shares (1 − those,
            # down to ~1e-3 here) to 1e-6 relative or 1e-7 of the direction's energy.
            for key, rtol, atol in (("grad_frac", 1e-6, 0.0), ("wd_frac", 1e-6, 1e-7)):
                torch.testing.assert_close(
                    torch.tensor(rg[key], dtype=torch.float64),
                    torch.tensor(rw[key], dtype=torch.float64),
                    rtol=rtol,
                    atol=atol,
                    equal_nan=True,
                )
            # The newest delta's share alone: its WD part is 100 per-step displacements
            # summed in the parameters' float32 (direct) or 2 × 50 (derived), equal to
            # ~1e-7 of that part only; one delta's share magnifies it (1e-5 relative or 1e-7).
            torch.testing.assert_close(
                torch.tensor(rg["grad_frac_latest"], dtype=torch.float64),
                torch.tensor(rw["grad_frac_latest"], dtype=torch.float64),
                rtol=1e-5,
                atol=1e-7,
                equal_nan=True,
            )
            ge, we = got["edges"][d], want["edges"][d]
            assert_same_direction(ge.vectors, we.vectors, 1e-6)
            compared += 1
    assert compared >= 3 * 7 - 2  # burn_in lacks a window only at the first one or two


# ---------------------------------------------------------------- 3. checkpoints


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def _train(rec: DeltaRecorder, net: nn.Module, opt, start: int, stop: int, interval: int) -> list:
    """Steps [start, stop) with a capture every ``interval``; the derived spectra
    published along the way, as (step, k, spectra)."""
    out = []
    for step in range(start, stop):
        gen = torch.Generator().manual_seed(1000 + step)
        x, y = torch.randn(16, 5, generator=gen), torch.randn(16, 3, generator=gen)
        opt.zero_grad()
        (net(x) - y).square().mean().backward()
        opt.step()
        if (step + 1) % interval == 0:
            assert rec.capture(step + 1)
            assert rec.derived is not None
            out += [(step + 1, k, rec.derived.spectra[k]) for k in rec.derived.published]
    return out


def _same_spectra(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for d in a:
        assert (a[d] is None) == (b[d] is None)
        if a[d] is not None:
            for name in ("sigma", "eigvecs", "grad_proj", "wd_proj", "gram", "cross_gram"):
                assert torch.equal(getattr(a[d], name), getattr(b[d], name)), (d, name)
            assert a[d].spans == b[d].spans


def test_recorder_state_round_trip_continues_the_derived_windows_bit_identically() -> None:
    interval, cut, end = 2, 9, 40  # cut: mid-interval, inside a k = 2 and a k = 3 block
    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.5)
    rec = DeltaRecorder(interval, 4, 3, PAPER, interval_multiples=[1, 2, 3])
    rec.attach(net.named_parameters(), opt)
    _train(rec, net, opt, 0, cut, interval)
    assert rec.derived is not None and rec.derived.base_pushes == 4
    buf = io.BytesIO()
    torch.save(rec.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    net2 = copy.deepcopy(net)
    opt2 = torch.optim.AdamW(net2.parameters(), lr=0.05, weight_decay=0.5)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    fresh = DeltaRecorder(interval, 4, 3, PAPER, interval_multiples=[1, 2, 3])
    fresh.load_state_dict(state)
    fresh.attach(net2.named_parameters(), opt2, step=cut)
    assert fresh.derived is not None
    _same_spectra(fresh.derived.spectra[2], rec.derived.spectra[2])
    want = _train(rec, net, opt, cut, end, interval)
    got = _train(fresh, net2, opt2, cut, end, interval)
    assert [(s, k) for s, k, _ in got] == [(s, k) for s, k, _ in want]
    assert {k for _, k, _ in want} == {2, 3}
    for (_, _, a), (_, _, b) in zip(got, want, strict=True):
        _same_spectra(a, b)
    for k in (2, 3):
        assert torch.equal(fresh.derived.windows[k].deltas(), rec.derived.windows[k].deltas())
    rec.detach()
    fresh.detach()

    # Other multiples: refused, naming the key.
    other = DeltaRecorder(interval, 4, 3, PAPER, interval_multiples=[1, 2], key="callbacks.gram")
    other.load_state_dict(state)
    with pytest.raises(ValueError, match=r"callbacks\.gram\.interval_multiples=\[1, 2\] differs"):
        other.attach(net2.named_parameters(), opt2, step=cut)
    other.detach()
    # A checkpoint written before the derived windows: loads without a warning, empty.
    old = {k: v for k, v in state.items() if k not in ("interval_multiples", "derived")}
    resumed = DeltaRecorder(interval, 4, 3, PAPER, interval_multiples=[1, 2, 3])
    resumed.load_state_dict(old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.attach(net2.named_parameters(), opt2, step=end)
    assert resumed.derived is not None and resumed.derived.base_pushes == 0
    assert all(resumed.derived.windows[k].count == 0 for k in (2, 3))
    assert resumed.last_capture_step == 8 and resumed.window.count == 4  # captures 2, .., 8
    resumed.detach()


# ------------------------------------------------------------------ 4. sharding


def _sharded_gram(collective, steps: int, state: dict | None = None, start: int = 0):
    """The sharding tests' tiny AdamW run, with derived windows of N = 2 and 3."""
    return _train_gram(
        collective, steps, state, start, window=3, top_k=2, interval_multiples=[1, 2, 3]
    )


def _assert_derived_close(got: GramCallback, want: GramCallback) -> None:
    assert got.derived_published == want.derived_published
    for n, spectra in want.derived_spectra.items():
        for d, ws in spectra.items():
            gs = got.derived_spectra[n][d]
            assert (gs is None) == (ws is None)
            if ws is not None:
                torch.testing.assert_close(
                    gs.sigma, ws.sigma, rtol=1e-6, atol=1e-6 * float(ws.sigma[0])
                )
                torch.testing.assert_close(gs.grad_proj, ws.grad_proj, rtol=1e-5, atol=1e-7)


def test_sharded_derived_windows_equal_one_process_and_resume_on_any_rank_count() -> None:
    ref = _sharded_gram(None, 12)
    assert ref.derived_intervals == [2, 3] and ref.derived_published == [2, 3]
    ranks = run_ranks(2, lambda r, coll: _sharded_gram(coll, 12))
    for g in ranks:
        assert g.shard.sharded and g.derived.windows[2].p == g.shard.n
        _assert_derived_close(g, ref)
    # On-demand vectors: this rank's slices, together the one-process vectors.
    whole = torch.cat([g.derived.edge(2, NORMALIZED).vectors for g in ranks], dim=1)
    assert_same_direction(whole[:1], ref.derived.edge(2, NORMALIZED).vectors[:1], 1e-5)

    part = run_ranks(2, lambda r, coll: _sharded_gram(coll, 7))  # mid-block for k = 2, 3

    def state_of(r: int, coll) -> dict:
        from grokedge.edge.sharding import Shard

        g = part[r]
        g.shard = Shard(g.shard.p, g.shard.start, g.shard.stop, coll)  # a fresh group
        assert g.derived.shard is g.shard
        return {"gram": g.state_dict(), "net": g.net.state_dict(), "opt": g.opt.state_dict()}

    saved = run_ranks(2, state_of)[0]
    assert saved["gram"]["derived"]["world_size"] == 2
    one = _sharded_gram(None, 12, saved, start=7)
    _assert_derived_close(one, ref)
    for g in run_ranks(3, lambda r, coll: _sharded_gram(coll, 12, saved, start=7)):
        _assert_derived_close(g, ref)
    for g in run_ranks(2, lambda r, coll: _sharded_gram(coll, 12, saved, start=7)):
        _assert_derived_close(g, ref)


# -------------------------------------------------------------- 5. bad values


@pytest.mark.parametrize(
    "value", [[], [2, 3], [1, 1, 2], [1, 0], [1, -2], [1, 2.5], [1, True], "1,2", 3, None]
)
def test_bad_interval_multiples_are_refused_naming_the_key(value) -> None:
    with pytest.raises(ConfigError) as info:
        GramCallback(interval_multiples=value)
    message = str(info.value)
    assert message.startswith("GramCallback(interval_multiples=")  # built in Python
    assert "distinct integers >= 1" in message and "contains 1" in message
    with pytest.raises(ValueError, match=r"rec\.interval_multiples="):
        DeltaRecorder(10, 5, 2, key="rec", interval_multiples=value)


def test_good_interval_multiples_are_sorted() -> None:
    assert GramCallback(interval=50, interval_multiples=[3, 1, 2]).interval_multiples == (1, 2, 3)
    assert GramCallback(interval=50, interval_multiples=[3, 1, 2]).derived_intervals == [100, 150]
