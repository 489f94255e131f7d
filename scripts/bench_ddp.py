"""Analysis time per rank of the sharded Gram: 2 CPU ranks (gloo) against 1 rank.

    python scripts/bench_ddp.py                      # p = 4·10⁶, W = 5, top_k = 4
    python scripts/bench_ddp.py --p 2000000 --pushes 8

Each rank (``torch.multiprocessing`` processes on one machine, one torch thread each)
holds its slice of p selected elements and times, per delta: ``UpdateWindow.push`` of
its slices (incremental partial Grams, O(W·p/ranks)), ``sharded_edge`` (one all-reduce of
the W×W matrices, eigendecomposition, its slice of v_1..v_k), and once the sharded
ablation (edge removal + ``--n-random`` random subspaces and norm-matched controls, with
a cheap stand-in for the model evaluation: one dot product with the gathered θ). Prints
the median seconds per rank and the 1-rank / 2-rank ratio of each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grokedge.edge.sharding import Shard, default_collective, sharded_edge
from grokedge.edge.window import UpdateWindow
from grokedge.experiments.ablation import sharded_ablation_experiment


def _rank(rank: int, world: int, args: argparse.Namespace, port: int, queue: mp.Queue) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        shard = Shard.of(args.p, default_collective())
        g = torch.Generator().manual_seed(1234)
        # The same whole deltas on every rank, each keeping its slice (as under DDP).
        base = torch.randn(args.p, generator=g)
        window = UpdateWindow(args.window, shard.n)
        out = torch.empty(args.top_k, shard.n)
        push_s, edge_s = [], []
        state = None
        for i in range(args.pushes):
            total = shard.take(base * (1 + 0.1 * i)) + 0.01 * torch.randn(shard.n, generator=g)
            wd = -1e-3 * total
            dist.barrier()
            t0 = time.perf_counter()
            window.push(total, wd, check_finite=True, reduce=shard.sum if shard.sharded else None)
            t1 = time.perf_counter()
            if window.count >= 2:
                state, _ = sharded_edge(window, shard, args.top_k, i, out=out)
            t2 = time.perf_counter()
            if i >= args.window:  # steady state: a full window
                push_s.append(t1 - t0)
                edge_s.append(t2 - t1)
        assert state is not None
        weights = torch.randn(args.p, generator=torch.Generator().manual_seed(7))

        def evaluate(flat: torch.Tensor, batch: dict) -> tuple[float, float, torch.Tensor]:
            value = float(weights @ flat)  # a stand-in for the model: O(p), replicated
            return value, value, torch.zeros(1, 1, 1)

        theta = shard.take(base)
        dist.barrier()
        t0 = time.perf_counter()
        sharded_ablation_experiment(
            evaluate, theta, state.vectors[:2], {}, shard, n_random=args.n_random, seed=0
        )
        ablation_s = time.perf_counter() - t0
        queue.put(
            (
                rank,
                statistics.median(push_s),
                statistics.median(edge_s),
                ablation_s,
            )
        )
    finally:
        dist.destroy_process_group()


def measure(world: int, args: argparse.Namespace, port: int) -> list[tuple]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, args, port, queue)) for r in range(world)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=1800) for _ in procs]
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"rank process exited with {proc.exitcode}")
    return sorted(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p", type=int, default=4_000_000, help="selected elements")
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--pushes", type=int, default=10, help="deltas pushed (>= window + 1)")
    parser.add_argument("--n-random", type=int, default=4, help="ablation random controls")
    args = parser.parse_args()
    if args.pushes <= args.window:
        parser.error("--pushes must exceed --window (steady state needs a full window)")
    rows = {}
    for i, world in enumerate((1, 2)):
        rows[world] = measure(world, args, 29500 + i)
        for rank, push, edge, abl in rows[world]:
            print(
                f"world {world} rank {rank}: push {push * 1e3:8.1f} ms  edge {edge * 1e3:8.1f} ms"
                f"  ablation {abl:7.2f} s"
            )
    one = rows[1][0]
    two = [max(r[i] for r in rows[2]) for i in range(1, 4)]  # the slowest rank sets the pace
    print(f"p = {args.p:,}, W = {args.window}, top_k = {args.top_k}, n_random = {args.n_random}")
    for name, a, b in zip(("push", "edge", "ablation"), one[1:], two, strict=True):
        print(f"{name:<9} 1 rank {a:9.4f} s   2 ranks {b:9.4f} s   ratio 1/2 = {a / b:5.2f}")
    total1, total2 = sum(one[1:]), sum(two)
    ratio = total1 / total2
    print(f"{'total':<9} 1 rank {total1:9.4f} s   2 ranks {total2:9.4f} s   ratio = {ratio:5.2f}")


if __name__ == "__main__":
    main()
