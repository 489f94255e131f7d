"""The sharded Gram and the sharded analyses against brute force, without processes.

Ranks are threads sharing an in-memory collective (:class:`ThreadGroup`): each "rank"
runs the same code on its slice and the collectives sum or gather across threads in
rank order, as ``torch.distributed`` would across processes. Every sharded result is
compared with the dense computation on the whole vectors (SVD, plain dot products, the
unsharded functions).
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from grokedge.callbacks.gram import GramCallback
from grokedge.edge.geometry import stacked_gram
from grokedge.edge.readouts import measure
from grokedge.edge.sharding import LocalCollective, Shard, sharded_edge
from grokedge.edge.spectrum import edge_from_window
from grokedge.edge.window import UpdateWindow
from grokedge.experiments.ablation import ablation_experiment, sharded_ablation_experiment
from grokedge.experiments.random_controls import (
    draw_generator,
    gaussian_rows,
    random_displacement,
    random_displacement_slice,
    random_orthonormal_slice,
    random_orthonormal_subspace,
)

torch.set_num_threads(1)


class ThreadGroup:
    """An in-memory process group for ``n`` threads (test double of torch.distributed)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.barrier = threading.Barrier(n, timeout=60)
        self.slots: list[Any] = [None] * n
        self.calls = [0] * n

    def collective(self, rank: int) -> ThreadCollective:
        return ThreadCollective(self, rank)


class ThreadCollective:
    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group, self.rank, self.world_size = group, rank, group.n

    def _exchange(self, tensor: Tensor) -> list[Tensor]:
        g = self.group
        g.calls[self.rank] += 1
        g.slots[self.rank] = tensor.detach().clone()
        g.barrier.wait()
        out = list(g.slots)
        g.barrier.wait()  # nobody overwrites a slot before everyone has read them
        return out

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        parts = self._exchange(tensor)
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        tensor.copy_(total)
        return tensor

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        return self._exchange(tensor)


def run_ranks(n: int, fn: Callable[[int, ThreadCollective], Any]) -> list[Any]:
    """``fn(rank, collective)`` on ``n`` threads; results in rank order (errors re-raised)."""
    group = ThreadGroup(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def body(rank: int) -> None:
        try:
            results[rank] = fn(rank, group.collective(rank))
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    assert len(set(group.calls)) == 1, f"ranks ran different numbers of collectives: {group.calls}"
    return results


# ----------------------------------------------------------------------------- basics


@pytest.mark.parametrize("world", [2, 3])
def test_inner_norm_gather_match_whole_vectors(world: int) -> None:
    p = 1001
    a, b = torch.randn(3, p, dtype=torch.float64), torch.randn(2, p, dtype=torch.float64)

    def rank(r: int, coll: ThreadCollective) -> tuple[Tensor, float, Tensor]:
        shard = Shard.of(p, coll)
        inner = shard.inner(shard.take(a), shard.take(b))
        return inner, shard.norm(shard.take(a[0])), shard.gather(shard.take(a))

    for inner, norm, whole in run_ranks(world, rank):
        torch.testing.assert_close(inner, a @ b.T, rtol=1e-12, atol=1e-12)
        assert math.isclose(norm, float(a[0].norm()), rel_tol=1e-12)
        assert torch.equal(whole, a)


def test_one_rank_is_the_identity() -> None:
    shard = Shard.of(10)
    x = torch.randn(2, 10)
    assert shard.gather(x) is x and shard.sum(x) is x and (shard.start, shard.stop) == (0, 10)


@pytest.mark.parametrize(
    ("p", "k"),
    [(1000, 2), (100_003, 1), (40_000, 3), (16_384 + 5, 1), (2 * 16_384 + 7, 2), (9, 1)],
)
def test_gaussian_rows_are_the_single_draw_rows(p: int, k: int) -> None:
    full = torch.randn(p, k, generator=draw_generator(7, 3), dtype=torch.float64)
    cuts = sorted({0, 1, p // 3, min(p, p // 3 + 17), max(0, p - 5), p})
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        assert torch.equal(gaussian_rows(p, k, lo, hi, 7, 3, torch.float64), full[lo:hi])


@pytest.mark.parametrize("world", [2, 3])
def test_random_controls_match_the_single_process_draws(world: int) -> None:
    p, k = 5003, 2
    dense_sub = random_orthonormal_subspace(k, p, 11, 4, dtype=torch.float64)
    dense_disp = random_displacement(0.37, p, 12, 4, dtype=torch.float64)

    def rank(r: int, coll: ThreadCollective) -> tuple[Tensor, Tensor]:
        shard = Shard.of(p, coll)
        sub = random_orthonormal_slice(k, shard, 11, 4, dtype=torch.float64)
        disp = random_displacement_slice(0.37, shard, 12, 4, dtype=torch.float64)
        return sub, disp

    results = run_ranks(world, rank)
    sub = torch.cat([s for s, _ in results], dim=1)
    disp = torch.cat([d for _, d in results])
    torch.testing.assert_close(sub, dense_sub, rtol=0, atol=1e-12)
    torch.testing.assert_close(disp, dense_disp, rtol=0, atol=1e-14)
    torch.testing.assert_close(sub @ sub.T, torch.eye(k, dtype=torch.float64), atol=1e-12, rtol=0)


# ---------------------------------------------------------------------- the edge


def _deltas(n: int, p: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    total = torch.randn(n, p, generator=g, dtype=torch.float64)
    # A few dominant directions, as in training, so the spectrum has gaps.
    total[:, :5] *= 30.0
    wd = 0.1 * torch.randn(n, p, generator=g, dtype=torch.float64)
    return total, wd


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_edge_equals_dense_svd(world: int) -> None:
    W, p, pushes, k = 5, 2003, 8, 4  # 8 pushes into 5 slots: the ring wraps, deltas evicted
    total, wd = _deltas(pushes, p)

    def rank(r: int, coll: ThreadCollective) -> list[tuple[Any, float | None]]:
        shard = Shard.of(p, coll)
        window = UpdateWindow(W, shard.n, dtype=torch.float64)
        states = []
        for i in range(pushes):
            window.push(shard.take(total[i]), shard.take(wd[i]))
            if window.count >= 2:
                state, evicted = sharded_edge(window, shard, k, step=i)
                states.append((state, evicted))
        return states

    per_rank = run_ranks(world, rank)
    for i in range(1, pushes):
        lo = max(0, i + 1 - W)
        X, Xw = total[lo : i + 1], wd[lo : i + 1]
        u, s, vh = torch.linalg.svd(X, full_matrices=False)
        states = [per_rank[r][i - 1] for r in range(world)]
        state = states[0][0]
        # σ, W×W matrices and projections: identical on every rank, equal to dense ones.
        for other, _ in states[1:]:
            assert torch.equal(other.sigma, state.sigma)
            assert torch.equal(other.grad_proj, state.grad_proj)
        torch.testing.assert_close(state.sigma, s, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(state.gram, X @ X.T, rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(state.cross_gram, Xw @ X.T, rtol=1e-12, atol=1e-9)
        v = torch.cat([st.vectors for st, _ in states], dim=1)  # the slices, whole
        kk = min(k, X.shape[0])
        dense_v = vh[:kk]
        signs = torch.sign((v[:kk] * dense_v).sum(1))
        torch.testing.assert_close(v[:kk], dense_v * signs[:, None], rtol=0, atol=1e-9)
        torch.testing.assert_close(state.wd_proj[:, :kk], Xw @ v[:kk].T, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(
            state.grad_proj[:, :kk], (X - Xw) @ v[:kk].T, rtol=1e-9, atol=1e-9
        )
        evicted = states[0][1]
        if i >= W:
            assert evicted is not None
            assert math.isclose(evicted, float(total[i - W] @ total[i]), rel_tol=1e-10)
        else:
            assert evicted is None


def test_sharded_push_skips_a_nan_in_one_slice_on_every_rank() -> None:
    p = 101
    total, wd = _deltas(3, p)
    total[1, 90] = math.nan  # in the last rank's slice only

    def rank(r: int, coll: ThreadCollective) -> list[bool]:
        shard = Shard.of(p, coll)
        window = UpdateWindow(4, shard.n, dtype=torch.float64)
        return [
            window.push(shard.take(total[i]), shard.take(wd[i]), True, reduce=shard.sum)
            for i in range(3)
        ]

    assert run_ranks(2, rank) == [[True, False, True]] * 2


# -------------------------------------------------------------------------- ablation


def _toy_evaluate(p: int) -> Callable[[Tensor, dict], tuple[Tensor, Tensor, Tensor]]:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, p, generator=g, dtype=torch.float64) / math.sqrt(p)

    def evaluate(theta: Tensor, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        out = a @ theta.to(torch.float64)
        loss = (out - 1.0).pow(2).mean()
        acc = torch.sigmoid(out).mean()  # continuous: differences are informative
        return loss, acc, out[None, None, :]

    return evaluate


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_ablation_equals_the_dense_experiment(world: int) -> None:
    p = 3001
    evaluate = _toy_evaluate(p)
    theta = torch.randn(p, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    basis = random_orthonormal_subspace(2, p, 99, 0, dtype=torch.float64)
    dense = ablation_experiment(evaluate, theta, basis, {}, n_random=5, seed=2)

    def rank(r: int, coll: ThreadCollective) -> dict[str, Any]:
        shard = Shard.of(p, coll)
        return sharded_ablation_experiment(
            evaluate, shard.take(theta), shard.take(basis), {}, shard, n_random=5, seed=2
        )

    for result in run_ranks(world, rank):
        assert result.keys() == dense.keys()
        for key in ("base_loss", "base_acc", "edge_loss", "edge_acc", "displacement"):
            assert math.isclose(result[key], dense[key], rel_tol=1e-10, abs_tol=1e-12), key
        for key in ("random_dacc", "random_dloss", "matched_dacc", "matched_dloss"):
            torch.testing.assert_close(
                torch.tensor(result[key]), torch.tensor(dense[key]), rtol=1e-8, atol=1e-12
            )


def test_one_rank_ablation_is_the_plain_one() -> None:
    p = 500
    evaluate = _toy_evaluate(p)
    theta = torch.randn(p, dtype=torch.float64)
    basis = random_orthonormal_subspace(2, p, 1, 0, dtype=torch.float64)
    a = ablation_experiment(evaluate, theta, basis, {}, n_random=3, seed=0)
    b = sharded_ablation_experiment(evaluate, theta, basis, {}, Shard.of(p), n_random=3, seed=0)
    assert a == b


# ------------------------------------------------------------------- GramCallback


_INIT = threading.Lock()


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # The initialisation draws from the global generator: one rank-thread at a time,
        # or another thread's draws interleave and the replicas start apart.
        with _INIT:
            torch.manual_seed(0)
            self.a = nn.Linear(13, 7)
            self.b = nn.Linear(7, 3)


def _train_step(net: _Net, opt: torch.optim.Optimizer, step: int) -> None:
    """One AdamW step on the batch of ``step`` (a fixed stream, the same on every rank:
    DDP keeps replicas identical)."""
    x = torch.randn(8, 13, generator=torch.Generator().manual_seed(step))
    loss = net.b(torch.tanh(net.a(x))).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _train_gram(
    collective: Any,
    steps: int = 9,
    state: dict | None = None,
    start: int = 0,
    **knobs: Any,
) -> GramCallback:
    """A GramCallback on a tiny net trained by AdamW with a fixed data stream (the same
    on every rank: DDP keeps replicas identical). ``knobs``: GramCallback arguments over
    the defaults here (window 4, top_k 3, one step per delta)."""
    net = _Net()
    opt = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.5)
    gram = GramCallback(
        **{"select": "all", "interval": 1, "window": 4, "top_k": 3, **knobs},
        collective=collective,
    )
    if state is not None:
        # The optimizer adopts the state's tensors and updates them in place: a copy each.
        state = copy.deepcopy(state)
        gram.load_state_dict(state["gram"])
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
    gram.attach(net, opt, step=start)
    for step in range(start, steps):
        _train_step(net, opt, step)
        gram.capture(step + 1)
    gram.net, gram.opt = net, opt  # for the resume test
    return gram


def assert_sigma_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """σ of a sharded (or resumed) run against the one-process run's. float32 buffers:
    each Gram entry carries float32 block round-off relative to the largest entries
    (``grokedge.edge.window``), and sharded and whole runs sum in different blocks, so
    σ_k agrees to 1e-6 of σ_1, not of σ_k."""
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want[0]))


@pytest.mark.parametrize("world", [2, 3])
def test_gram_callback_sharded_equals_one_process(world: int) -> None:
    ref = _train_gram(None)
    results = run_ranks(world, lambda r, coll: _train_gram(coll))
    assert ref.shard is not None and not ref.shard.sharded
    whole = torch.cat([g.edge.vectors for g in results], dim=1)
    for g in results:
        assert g.shard.sharded and g.window.p == g.shard.n < ref.window.p
        assert_sigma_close(g.edge.sigma, ref.edge.sigma)
        torch.testing.assert_close(g.edge.grad_proj, ref.edge.grad_proj, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g.edge.wd_proj, ref.edge.wd_proj, rtol=1e-5, atol=1e-7)
        assert g.evicted_dot == pytest.approx(ref.evicted_dot, rel=1e-6)
    torch.testing.assert_close(whole, ref.edge.vectors, rtol=0, atol=1e-5)
    # The motion read-outs sum partial Grams of the slices: same as on whole vectors.
    dense = measure(ref.edge, ref.previous, ref.evicted_dot)

    def rank_measure(r: int, coll: ThreadCollective) -> dict:
        g = results[r]
        g.shard = Shard(g.shard.p, g.shard.start, g.shard.stop, coll)  # a fresh group
        return measure(g.edge, g.previous, g.evicted_dot, reduce=g.reduce)

    for m in run_ranks(world, rank_measure):
        for key in ("grad_frac", "stability"):
            torch.testing.assert_close(
                torch.tensor(m[key]), torch.tensor(dense[key]), rtol=1e-4, atol=1e-4
            )
        # Angles near 0 are ill-conditioned in arccos (a float32 rounding of 1e-7 in the
        # cosine moves the angle by ~0.03°): compare their cosines.
        for key in ("rotation_deg", "principal_angles_deg"):
            torch.testing.assert_close(
                torch.tensor(m[key]).deg2rad().cos(),
                torch.tensor(dense[key]).deg2rad().cos(),
                rtol=0,
                atol=1e-5,
            )


def test_sharded_checkpoint_resumes_on_any_number_of_ranks() -> None:
    """State of a 2-rank run (9 steps of 12) resumed on 1 and on 3 ranks: the same edge as
    the uninterrupted 1-process run at step 12."""
    ref = _train_gram(None, steps=12)
    part = run_ranks(2, lambda r, coll: _train_gram(coll, steps=9))
    # Lightning calls state_dict on every rank (collective); rank 0's is written.
    states = run_ranks(2, lambda r, coll: _state_with(part[r], coll))
    saved = states[0]
    assert saved["gram"]["world_size"] == 2 and saved["gram"]["p"] == ref.shard.p

    one = _train_gram(None, steps=12, state=saved, start=9)
    assert_sigma_close(one.edge.sigma, ref.edge.sigma)
    torch.testing.assert_close(one.edge.vectors, ref.edge.vectors, rtol=0, atol=1e-5)
    three = run_ranks(3, lambda r, coll: _train_gram(coll, steps=12, state=saved, start=9))
    for g in three:
        assert_sigma_close(g.edge.sigma, ref.edge.sigma)
    whole = torch.cat([g.edge.vectors for g in three], dim=1)
    torch.testing.assert_close(whole, ref.edge.vectors, rtol=0, atol=1e-5)
    two = run_ranks(2, lambda r, coll: _train_gram(coll, steps=12, state=saved, start=9))
    assert_sigma_close(two[0].edge.sigma, ref.edge.sigma)


def _state_with(gram: GramCallback, coll: ThreadCollective) -> dict:
    gram.shard = Shard(gram.shard.p, gram.shard.start, gram.shard.stop, coll)
    return {"gram": gram.state_dict(), "net": gram.net.state_dict(), "opt": gram.opt.state_dict()}


def test_gram_callback_reports_predicted_bytes_of_its_slice() -> None:
    results = run_ranks(2, lambda r, coll: _train_gram(coll, steps=2))
    ref = _train_gram(None, steps=2)
    assert ref.predicted_bytes is not None
    for g in results:
        assert g.predicted_bytes is not None and g.predicted_bytes < ref.predicted_bytes
        window_bytes = g.window._buf.nbytes + sum(b.nbytes for b in g.recorder._vector_bufs)
        assert g.predicted_bytes >= window_bytes


def test_local_collective_shard_is_unsharded() -> None:
    gram = _train_gram(LocalCollective(), steps=3)
    ref = _train_gram(None, steps=3)
    assert torch.equal(gram.edge.sigma, ref.edge.sigma)
    assert torch.equal(gram.edge.vectors, ref.edge.vectors)
    # The raw window's spectrum, whatever edge is analysed (the default: normalized).
    assert torch.equal(edge_from_window(ref.window, 3, 3).sigma, ref.spectra["paper"].sigma)
    assert stacked_gram(ref.edge.vectors).shape == (3, 3)


def test_bad_buffer_device_names_the_key() -> None:
    with pytest.raises(ValueError, match=r"GramCallback\(buffer_device='gpu0'\)"):
        GramCallback(buffer_device="gpu0")
    with pytest.raises(ValueError, match=r"GramCallback\(shard_across_ranks='yes'\)"):
        GramCallback(shard_across_ranks="yes")  # type: ignore[arg-type]


# ----------------------------------------------------------------- v_1's rotation


def test_direction_rotation_sharded_matches_whole_and_resumes_on_any_rank_count() -> None:
    from grokedge.edge.geometry import rotation_deg
    from grokedge.edge.sharding import Shard
    from grokedge.experiments.direction_rotation import DirectionRotation

    g = torch.Generator().manual_seed(3)
    p = 101
    vs = [torch.randn(p, generator=g, dtype=torch.float64) for _ in range(4)]
    vs = [v / v.norm() for v in vs]
    whole = DirectionRotation()
    want = [whole.update(v, True) for v in vs[:3]]
    assert math.isnan(want[0])
    assert want[1:] == [pytest.approx(rotation_deg(vs[i], vs[i + 1]), abs=1e-9) for i in (0, 1)]
    state = whole.whole(None)  # a checkpoint's whole vector

    def ranks(rank: int, coll: ThreadCollective) -> tuple[list[float], Tensor]:
        shard = Shard.of(p, coll)
        turn = DirectionRotation()
        got = [turn.update(shard.take(v), True, shard, shard.sum) for v in vs[:3]]
        resumed = DirectionRotation()
        resumed.previous = state.clone()  # whole: cut to this rank's slice at first use
        got.append(resumed.update(shard.take(vs[3]), True, shard, shard.sum))
        return got, turn.whole(shard)

    for rank_got, rank_whole in run_ranks(3, ranks):
        assert math.isnan(rank_got[0])
        assert rank_got[1:3] == [pytest.approx(x, abs=1e-9) for x in want[1:]]
        assert rank_got[3] == pytest.approx(rotation_deg(vs[2], vs[3]), abs=1e-9)
        assert torch.equal(rank_whole, state)
    # σ_1 = 0 (no direction): the angle is undefined and the previous one forgotten.
    assert math.isnan(whole.update(vs[3], False)) and whole.previous is None
