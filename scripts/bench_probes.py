"""Cost and R² of each probe on real hidden states; the quadratic probe three ways.

    python scripts/bench_probes.py --ckpt RUN/checkpoints/last.ckpt --json bench_probes.json

Loads a Dyck checkpoint (seed and task from the overrides, default ``task=dyck seed=42``),
draws the ProbeCallback's fixed subset (300 test sequences, seed 0), reads the last
block's hidden states and scores ``depth`` with every probe kind exactly as the callback
does (grouped 3-fold by string, row weights), on one BLAS thread, ``--repeats`` times
each in alternating order. The quadratic probe runs as the callback runs it
(CholeskyRidge, float32 products: the default; float64 products) and as scikit-learn
spells it (the same scalers and features, ``sklearn.linear_model.Ridge``: the probe
before issue 13). Reports seconds per call (median), the per-fold R², and each quadratic
variant's largest relative R² difference from scikit-learn's.
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

from grokedge.analysis.probe_targets import pad_id_of, probe_data, probe_target_tensors
from grokedge.analysis.subsets import fixed_subset, loader_batches
from grokedge.experiments.probes import (
    LINEAR,
    MLP,
    QUADRATIC,
    ProbeConfig,
    ProbeScore,
    probe_splits,
    score_probes,
)
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


def sklearn_quadratic(data, folds: int, seed: int) -> ProbeScore:
    """The quadratic probe on the callback's folds with scikit-learn's own Ridge."""
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import PolynomialFeatures, StandardScaler

    config = ProbeConfig()
    x, y, w = data.features, data.targets, data.weights
    scores = []
    for train, test in probe_splits(data.groups, folds, seed):
        probe = Pipeline(
            [("scale", StandardScaler()), ("poly", PolynomialFeatures(2, include_bias=False)),
             ("scale_poly", StandardScaler()), ("ridge", Ridge(alpha=config.quadratic_alpha))]
        )  # fmt: skip
        weights = {f"{name}__sample_weight": w[train] for name in ("scale", "scale_poly", "ridge")}
        probe.fit(x[train], y[train], **weights)
        scores.append(r2_score(y[test], probe.predict(x[test]), sample_weight=w[test]))
    return ProbeScore.from_folds(scores)


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
        f"{QUADRATIC}/sklearn": None,
    }
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    folds: dict[str, tuple[float, ...]] = {}
    with threadpool_limits(limits=1):
        for _ in range(args.repeats):
            for name, config in runs.items():
                kind = name.split("/")[0]
                start = time.perf_counter()
                if config is None:
                    score = sklearn_quadratic(data, 3, 0)
                else:
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
    reference = folds[f"{QUADRATIC}/sklearn"]
    for dtype in ("float64", "float32"):
        ours = folds[f"{QUADRATIC}/{dtype}"]
        out[f"quadratic_{dtype}_max_rel_r2_difference_from_sklearn"] = max(
            abs(a - b) / abs(b) for a, b in zip(ours, reference, strict=True)
        )
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
