"""Cost of callbacks=full (and other sets): a Dyck run to grok + N steps, each analysis per call.

    python scripts/bench_callbacks.py --threads 1 --json bench_callbacks.json
    python scripts/bench_callbacks.py --threads 1 --after-grok 500 --skip-none   # quick look
    python scripts/bench_callbacks.py --threads 1 --full-overrides callbacks.probe.background=false
    python scripts/bench_callbacks.py --threads 1 --sets indicators   # the indicator bench

``--sets`` names the callbacks sets compared with ``callbacks=none`` (default: full; e.g.
``--sets full indicators``); ``--full-overrides`` apply to every compared set.

(a) Wall time of ``fit`` for Dyck seed 42 (ω = 1, the task defaults) run until
    ``--after-grok`` steps past its grok step (``task.stop_after_grok``), with
    ``callbacks=full`` over ``callbacks=none`` (``--repeats`` pairs, alternating order;
    medians). Checkpoints and loggers off, so only training, evaluation and the analyses
    are timed.
(b) Per analysis of the full run: calls, seconds per call (mean, min, max: from the
    ``seconds`` of its ``analyses.jsonl`` rows, i.e. the time inside ``analyse`` on the
    training thread), the seconds its deferred part ran on a worker thread
    (``worker_seconds``: the background probes), and the time inside the
    Gram/EdgeAlignment hooks and the per-step weight-decay record.
(c) The exact HVP of the perturbation analysis in float32 and float64 at the final
    weights of the full run (cost per direction and the values, against the central
    difference), to justify ``hvp_dtype``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from functools import wraps
from pathlib import Path

import torch

from grokedge.analysis_log import read_analyses
from grokedge.callbacks import (
    EdgeAlignmentCallback,
    GramCallback,
    PerturbationCallback,
    find_gram_callback,
)
from grokedge.edge.weight_decay import DecoupledWeightDecayTracker
from grokedge.experiments.curvature import (
    directional_curvature,
    finite_difference_curvature,
    flat_loss,
)
from grokedge.functional import analysed_module
from grokedge.train import build, compose, fit

ANALYSES = (
    "ablation", "perturbation", "probe", "gap_flow", "classes", "wd_removal", "indicators",
)  # fmt: skip
SETS = ("full", "indicators")
"""The callbacks sets ``--sets`` may compare with ``callbacks=none``."""


class Timed:
    """Seconds spent inside wrapped methods (class-level wraps, undone on exit)."""

    def __init__(self, targets: list[tuple[type, str]]) -> None:
        self.targets = targets
        self.seconds: dict[str, float] = defaultdict(float)
        self._saved: list[tuple[type, str, object]] = []

    def __enter__(self) -> Timed:
        for cls, name in self.targets:
            original = getattr(cls, name)
            self._saved.append((cls, name, original))
            label = f"{cls.__name__}.{name}"

            def timed(*args, _f=original, _label=label, **kwargs):
                start = time.perf_counter()
                try:
                    return _f(*args, **kwargs)
                finally:
                    self.seconds[_label] += time.perf_counter() - start

            setattr(cls, name, wraps(original)(timed))
        return self

    def __exit__(self, *exc: object) -> None:
        for cls, name, original in reversed(self._saved):
            setattr(cls, name, original)


def overrides(
    callbacks: str, after_grok: int, threads: int | None, extra: tuple[str, ...] = ()
) -> list[str]:
    out = [
        "task=dyck",
        "seed=42",
        "optimizer.weight_decay=1.0",
        f"callbacks={callbacks}",
        "logger=none",
        f"task.stop_after_grok={after_grok}",
        "trainer.max_steps=20000",
        "progress_bar.refresh_rate=0",
        "checkpoint.every_n_train_steps=1000000",
    ]
    out += [f"torch_threads={threads}"] if threads is not None else []
    return out + (list(extra) if callbacks != "none" else [])


def one_run(
    callbacks: str, after_grok: int, threads: int | None, run_dir: Path, extra: tuple[str, ...]
) -> dict:
    targets = [
        (GramCallback, "on_train_batch_end"),
        (GramCallback, "on_fit_start"),
        (EdgeAlignmentCallback, "on_edge"),
        (EdgeAlignmentCallback, "on_train_end"),
        (DecoupledWeightDecayTracker, "record_step"),
    ]
    run = build(compose(overrides(callbacks, after_grok, threads, extra), run_dir), run_dir)
    with Timed(targets) as timer:
        summary = fit(run)
    out = {
        "wall_s": summary["wall_s"],
        "grok_step": summary["grok_step"],
        "steps": summary["steps"],
        "gram_edge_s": sum(timer.seconds.values()),
    }
    if callbacks != "none":
        per: dict[str, dict] = {}
        for name in ANALYSES:
            rows = read_analyses(run_dir, [name])
            secs = [r["seconds"] for r in rows]
            if secs:
                per[name] = {
                    "calls": len(secs),
                    "steps": [r["step"] for r in rows],
                    "mean_s": statistics.mean(secs),
                    "min_s": min(secs),
                    "max_s": max(secs),
                    "total_s": sum(secs),
                    # Time of the part run on a worker thread (background probes).
                    "worker_total_s": sum(r.get("worker_seconds", 0.0) for r in rows),
                }
        out["analyses"] = per
        out["run"] = run
    return out


def hvp_precision(run, reps: int = 2) -> dict:
    """HVP float32 vs float64 (and the central difference) at the run's final weights."""
    pert = next(c for c in run.trainer.callbacks if isinstance(c, PerturbationCallback))
    gram = find_gram_callback(run.trainer)
    module = run.module
    net = analysed_module(module).eval()
    batch = pert.subset(run.trainer, module)
    selector = gram.selector
    theta = selector.flatten(net)
    eps = pert.fd_eps_fraction * float(theta.double().norm())
    out = {}
    for k in range(min(4, gram.edge.top_k)):
        v = gram.edge.vectors[k].to(theta.dtype)
        row = {}
        for dtype in (torch.float32, torch.float64):
            loss = flat_loss(module.evaluate, selector, net, batch, dtype=dtype)
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                value = directional_curvature(loss, theta.to(dtype), v)
                times.append(time.perf_counter() - start)
            row[str(dtype).split(".")[1]] = {"value": value, "seconds": min(times)}
        loss32 = flat_loss(module.evaluate, selector, net, batch)
        start = time.perf_counter()
        row["fd"] = {"value": finite_difference_curvature(loss32, theta, v, eps=eps)}
        row["fd"]["seconds"] = time.perf_counter() - start
        out[f"v{k + 1}"] = row
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--after-grok", type=int, default=2000, help="steps past the grok step")
    parser.add_argument("--repeats", type=int, default=1, help="none/full run pairs")
    parser.add_argument("--skip-none", action="store_true", help="only the compared sets")
    parser.add_argument(
        "--sets", nargs="+", choices=SETS, default=["full"], help="callbacks sets to compare"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument(
        "--full-overrides", nargs="*", default=[], help="extra overrides of the full runs"
    )
    args = parser.parse_args(argv)

    extra = tuple(args.full_overrides)
    results: dict = {
        "after_grok": args.after_grok,
        "threads": args.threads,
        "full_overrides": extra,
    }
    sets = list(dict.fromkeys(args.sets))
    walls: dict[str, list[float]] = {name: [] for name in ("none", *sets)}
    set_runs: dict[str, list[dict]] = {name: [] for name in sets}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(args.repeats):
            order = sets if args.skip_none else ["none", *sets]
            if i % 2:  # alternating order, so that drifting machine load spreads evenly
                order = order[::-1]
            for cb in order:
                r = one_run(cb, args.after_grok, args.threads, root / f"{cb}{i}", extra)
                walls[cb].append(r["wall_s"])
                print(
                    f"  run {i} callbacks={cb}: {r['wall_s']:.1f} s, grok {r['grok_step']}, "
                    f"{r['steps']} steps",
                    flush=True,
                )
                if cb != "none":
                    set_runs[cb].append(r)
        results["walls"] = walls
        results["sets"] = {}
        for name in sets:
            last = set_runs[name][-1]
            results["grok_step"] = last["grok_step"]
            results["steps"] = last["steps"]
            results["sets"][name] = {
                "gram_edge_s": last["gram_edge_s"], "analyses": last["analyses"]
            }  # fmt: skip
        if "full" in sets:  # the perturbation's HVP precision: a full run's
            results["hvp"] = hvp_precision(set_runs["full"][-1]["run"])

    print(f"\nDyck seed 42 to grok ({results['grok_step']}) + {args.after_grok} steps")
    print("| | wall of fit (s) |\n|---|---|")
    med_none = statistics.median(walls["none"]) if walls["none"] else None
    if med_none is not None:
        print(f"| callbacks=none | {med_none:.1f} |")
    for name in sets:
        med = statistics.median(walls[name])
        print(f"| callbacks={name} | {med:.1f} |")
        if med_none is not None:
            pairs = [f / n for f, n in zip(walls[name], walls["none"], strict=True)]
            results["sets"][name].update(ratio=med / med_none, pair_ratios=pairs)
            pair_text = ", ".join(f"{r:.3f}" for r in pairs)
            print(f"| ratio of medians, {name} | **{med / med_none:.3f}** (pairs: {pair_text}) |")
    if "full" in sets:  # the top-level fields earlier JSON files had
        results.update({k: results["sets"]["full"][k] for k in ("analyses", "gram_edge_s")})
        if med_none is not None:
            results["ratio"] = results["sets"]["full"]["ratio"]
    for name in sets:
        figures = results["sets"][name]
        inside = sum(a["total_s"] for a in figures["analyses"].values())
        hooks = figures["gram_edge_s"]
        print(f"\ncallbacks={name}: time inside the analyses: {inside:.1f} s; Gram +")
        print(f"EdgeAlignment hooks and the per-step weight-decay record: {hooks:.1f} s\n")
        print(
            "| analysis | calls (steps) | s per call: mean | min | max | total s | on a worker, s |"
        )
        print("|---|---|---|---|---|---|---|")
        for analysis, a in figures["analyses"].items():
            steps = ", ".join(str(s) for s in a["steps"])
            print(
                f"| {analysis} | {a['calls']} ({steps}) | {a['mean_s']:.2f} | {a['min_s']:.2f} | "
                f"{a['max_s']:.2f} | {a['total_s']:.1f} | {a['worker_total_s']:.1f} |"
            )
    if "hvp" not in results:
        if args.json is not None:
            args.json.write_text(json.dumps(results, indent=2, default=str))
        return 0
    print("\n| direction | HVP float32: value, s | HVP float64: value, s | central difference |")
    print("|---|---|---|---|")
    for k, row in results["hvp"].items():
        f32, f64, fd = row["float32"], row["float64"], row["fd"]
        print(
            f"| {k} | {f32['value']:.6g}, {f32['seconds']:.2f} | {f64['value']:.6g}, "
            f"{f64['seconds']:.2f} | {fd['value']:.6g} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
