"""Cost and R² of each probe on real hidden states, the quadratic ridge in float64 and float32.

    python scripts/bench_probes.py --ckpt RUN/checkpoints/last.ckpt --json bench_probes.json

Loads a Dyck checkpoint (seed and task from the overrides, default ``task=dyck seed=42``),
draws the ProbeCallback's fixed subset (300 test sequences, seed 0), reads the last
block's hidden states and scores ``depth`` with every probe kind exactly as the callback
does (grouped 3-fold by string, row weights), on one BLAS thread, ``--repeats`` times
each in alternating order. Reports seconds per call (median) and the per-fold R² of each
dtype, and their largest difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

from grokedge.spectral.probes import LINEAR, MLP, QUADRATIC, ProbeConfig, score_probes
from grokedge.tasks.probe_targets import pad_id_of, probe_data, probe_target_tensors
from grokedge.tasks.subsets import fixed_subset, loader_batches
from grokedge.train import build, compose


def probe_samples(ckpt: Path, overrides: list[str], n_sequences: int):
    """The probe data of the callback's subset at the checkpoint's weights."""
    run_dir = Path(tempfile.mkdtemp(prefix="bench_probes_"))
    run = build(compose([*overrides, "logger=none", "callbacks=none"], run_dir), run_dir)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    run.module.load_state_dict(state)
    dm = run.datamodule
    dm.setup("fit")
    loader = dm.val_dataloader()[0]
    batch = fixed_subset(loader_batches(loader), n_sequences, 0, "sequences", pad_id_of(dm))
    run.module.eval()
    with torch.no_grad():
        hidden = run.module.trace({}, batch).hidden[-1]
    target = probe_target_tensors(dm, batch, "bench")["depth"]
    return probe_data(dm, run.module, batch, hidden, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--overrides", nargs="*", default=["task=dyck", "seed=42"])
    parser.add_argument("--n-sequences", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = probe_samples(args.ckpt, args.overrides, args.n_sequences)
    print(f"{len(data.targets)} positions, {data.features.shape[1]} features")
    runs = {
        LINEAR: ProbeConfig(),
        MLP: ProbeConfig(),
        f"{QUADRATIC}/float64": ProbeConfig(quadratic_dtype="float64"),
        f"{QUADRATIC}/float32": ProbeConfig(quadratic_dtype="float32"),
    }
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    folds: dict[str, tuple[float, ...]] = {}
    with threadpool_limits(limits=1):
        for _ in range(args.repeats):
            for name, config in runs.items():
                kind = name.split("/")[0]
                start = time.perf_counter()
                score = score_probes(
                    data.features, data.targets, data.groups, (kind,), 3, 0,
                    sample_weight=data.weights, config=config,
                )[kind]  # fmt: skip
                seconds[name].append(time.perf_counter() - start)
                folds[name] = score.per_fold
    out = {
        name: {"seconds_median": statistics.median(s), "seconds": s, "r2_per_fold": folds[name]}
        for name, s in seconds.items()
    }
    f64, f32 = folds[f"{QUADRATIC}/float64"], folds[f"{QUADRATIC}/float32"]
    out["quadratic_max_abs_r2_difference"] = max(abs(a - b) for a, b in zip(f64, f32, strict=True))
    out["positions"] = len(data.targets)
    for name, row in out.items():
        if isinstance(row, dict):
            folds_text = [round(r, 6) for r in row["r2_per_fold"]]
            row = f"{row['seconds_median']:.2f} s, R² per fold {folds_text}"
        print(name, row)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
