"""The ε-sweep one evaluation at a time against one ``torch.func.vmap`` over its parameter sets.

    python scripts/bench_sweep_vmap.py --ckpt RUN/checkpoints/last.ckpt --overrides task=dyck

Loads a Dyck checkpoint, draws the PerturbationCallback's fixed subset (200 test
sequences, seed 0, 4 length buckets) and sweeps θ + ε v for 4 random unit directions and
the paper's 25 ε in [−0.03, 0.03] on one torch thread: (a) as ``epsilon_sweep`` does, one
evaluation per (direction, ε); (b) all 100 parameter sets at once, ``vmap`` of the same
evaluation over a [100, p] stack, per bucket. Reports the median seconds of each over
``--repeats`` alternating repeats and the largest relative difference of their losses.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.func import vmap

from grokedge.analysis.probe_targets import pad_id_of
from grokedge.analysis.subsets import fixed_subset, loader_batches
from grokedge.edge.selection import ParameterSelector
from grokedge.experiments.perturbation import BucketedEvaluate, epsilon_grid
from grokedge.train import build, compose

N_DIRECTIONS = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--overrides", nargs="*", default=["task=dyck", "seed=42"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run_dir = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    run = build(compose([*args.overrides, "logger=none", "callbacks=none"], run_dir), run_dir)
    state = torch.load(args.ckpt, map_location="cpu", weights_only=True)["state_dict"]
    run.module.load_state_dict(state)
    module = run.module.eval()
    dm = run.datamodule
    dm.setup("fit")
    loader = dm.val_dataloader()[0]
    batch = fixed_subset(loader_batches(loader), 200, 0, "sequences", pad_id_of(dm))
    selector = ParameterSelector.from_module(module.net)
    theta = selector.flatten(module.net).detach().clone()
    evaluate = BucketedEvaluate(module.evaluate, selector, module.net, batch, 4)
    directions = torch.randn(N_DIRECTIONS, selector.p, generator=torch.Generator().manual_seed(0))
    directions /= directions.norm(dim=1, keepdim=True)
    grid = torch.tensor(epsilon_grid(), dtype=theta.dtype)
    thetas = (theta + grid[None, :, None] * directions[:, None, :]).reshape(-1, selector.p)

    def one_at_a_time() -> torch.Tensor:
        return torch.stack([torch.as_tensor(evaluate(t, batch)[0]) for t in thetas])

    def vmapped() -> torch.Tensor:
        # The buckets' losses combined with the same token weights as BucketedEvaluate.
        parts = [
            vmap(lambda t, sub=sub: evaluate.inner(t, sub)[0])(thetas) for *_, sub in evaluate.parts
        ]
        classes = evaluate.inner(theta, evaluate.parts[0][3])[2].shape[-1]
        weights = torch.tensor(evaluate._loss_weights(classes), dtype=torch.float64)
        return sum(p.double() * w for p, w in zip(parts, weights / weights.sum(), strict=True))

    seconds: dict[str, list[float]] = {"loop": [], "vmap": []}
    losses = {}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, fn in (("loop", one_at_a_time), ("vmap", vmapped)):
                start = time.perf_counter()
                losses[name] = fn()
                seconds[name].append(time.perf_counter() - start)
    rel = ((losses["vmap"] - losses["loop"].double()).abs() / losses["loop"].double().abs()).max()
    for name, values in seconds.items():
        print(f"{name}: {statistics.median(values):.3f} s for {len(thetas)} evaluations {values}")
    ratio = statistics.median(seconds["vmap"]) / statistics.median(seconds["loop"])
    print(f"vmap / loop (time): {ratio:.2f}")
    print(f"largest relative loss difference: {float(rel):.2e}")


if __name__ == "__main__":
    main()
