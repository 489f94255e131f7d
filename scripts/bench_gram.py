"""Cost of callbacks=gram: whole Dyck runs, and one captured delta against memory traffic.

    python scripts/bench_gram.py                    # all three parts, markdown tables
    python scripts/bench_gram.py --threads 1 --pairs 3 --steps 600 --json out.json

(a) Wall time of Dyck runs with ``callbacks=gram`` over ``callbacks=none``: the two
    alternate ``--pairs`` times (medians reported), plus the time measured inside the
    callbacks and the per-step weight-decay hook, which is immune to machine noise.
(b) Time per captured delta (``GramCallback.capture``: form θ_now − θ_prev, push into the
    window with its incremental Gram rows summed in float64 (float32 buffers: float32
    products per column block), eigendecomposition, EdgeState with the top-4 vectors)
    for p = 131,072 / 2,359,296 / 25,000,000 at W = 5, against the memory traffic bound:
    bytes the update must touch / copy bandwidth measured here with a large
    ``Tensor.copy_``. Also the per-step WD accumulation against its own bound. Reported:
    the min over the timed captures (the code's own cost) and the median (what a shared
    machine gave it); the ratio uses the min.
(c) The same capture as W goes 5 -> 10 -> 20.
(d) ``--compare-paths``: the capture at p = 2.4M and 25M, W = 5, with the window's float32
    passes (the push's dot products, the edge vectors' combination) through the numba
    kernels of ``grokedge.edge.window_kernels`` (the default on a CPU) and through the
    torch path they replaced (two GEMVs per block, a blocked GEMM), alternating.
(e) ``--derived``: the mean capture (over whole cycles: derived windows publish every
    k-th capture) with ``interval_multiples`` [1, 2, 3] (the default: windows of N = 2·N0
    and 3·N0 derived from the same deltas) against [1], at p = 131,072 and 2,359,296.
    (b)-(d) measure the base window alone ([1]), which is what the traffic bound counts.

Bytes a capture must touch (float32 buffers, k = 4 vectors), in units of p·4 B:
form the delta (read θ and θ_prev, write δ into the ring, write θ_prev): 4; store the WD
part (read the accumulator, write the ring, zero the accumulator): 3; new Gram rows (read
the 2W stored rows): 2W; edge vectors (read the W deltas, write k vectors): W + k.
Total (7 + 3W + k)·4p bytes. A WD accumulation step reads θ and the accumulator and
writes the accumulator: 3·4p bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from functools import wraps
from pathlib import Path

import torch
from torch import nn

from grokedge.callbacks import EdgeAlignmentCallback, GramCallback
from grokedge.edge import row_dots as row_dots_module
from grokedge.edge.weight_decay import DecoupledWeightDecayTracker
from grokedge.train import build, compose, fit

TOP_K = 4
SIZES = (131_072, 2_359_296, 25_000_000)


# ------------------------------------------------------------------------- (a) runs


class HookTimer:
    """Wall time spent inside wrapped methods (class-level wraps, restored on exit)."""

    def __init__(self, targets: list[tuple[type, str]]) -> None:
        self.targets = targets
        self.seconds: dict[str, float] = defaultdict(float)
        self._saved: list[tuple[type, str, object]] = []

    def __enter__(self) -> HookTimer:
        for cls, name in self.targets:
            original = getattr(cls, name)
            self._saved.append((cls, name, original))
            label = f"{cls.__name__}.{name}"

            def wrapped(*args, _orig=original, _label=label, **kwargs):
                start = time.perf_counter()
                try:
                    return _orig(*args, **kwargs)
                finally:
                    self.seconds[_label] += time.perf_counter() - start

            setattr(cls, name, wraps(original)(wrapped))
        return self

    def __exit__(self, *exc: object) -> None:
        for cls, name, original in self._saved:
            setattr(cls, name, original)


def one_run(callbacks: str, steps: int, threads: int | None, root: Path, tag: str) -> dict:
    run_dir = root / tag
    overrides = [
        "task=dyck",
        "seed=42",
        f"callbacks={callbacks}",
        "logger=none",
        f"trainer.max_steps={steps}",
        "progress_bar.refresh_rate=0",
        "checkpoint.every_n_train_steps=100000",
    ]
    if threads is not None:
        overrides.append(f"torch_threads={threads}")
    targets = [
        (GramCallback, "on_train_batch_end"),
        (GramCallback, "on_fit_start"),
        (EdgeAlignmentCallback, "on_validation_end"),
        (EdgeAlignmentCallback, "on_train_end"),
        (DecoupledWeightDecayTracker, "record_step"),
    ]
    with HookTimer(targets) as timer:
        summary = fit(build(compose(overrides, run_dir), run_dir))
    inside = sum(timer.seconds.values())
    return {"wall_s": summary["wall_s"], "inside_s": inside, "parts": dict(timer.seconds)}


def bench_runs(pairs: int, steps: int, threads: int | None) -> dict:
    walls: dict[str, list[float]] = {"none": [], "gram": []}
    inside: list[float] = []
    parts: dict[str, list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        one_run("none", 50, threads, root, "warmup")  # imports, data generation, caches
        for i in range(pairs):
            order = ("none", "gram") if i % 2 == 0 else ("gram", "none")
            for cb in order:
                r = one_run(cb, steps, threads, root, f"{cb}{i}")
                walls[cb].append(r["wall_s"])
                if cb == "gram":
                    inside.append(r["inside_s"])
                    for k, v in r["parts"].items():
                        parts[k].append(v)
                print(f"  run {i} callbacks={cb}: {r['wall_s']:.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in walls.items()}
    ratios = [g / n for g, n in zip(walls["gram"], walls["none"], strict=True)]
    return {
        "steps": steps,
        "walls": walls,
        "median_none_s": med["none"],
        "median_gram_s": med["gram"],
        "ratio_of_medians": med["gram"] / med["none"],
        "median_pair_ratio": statistics.median(ratios),
        "median_inside_s": statistics.median(inside),
        "inside_fraction": statistics.median(inside) / med["none"],
        "parts_median_s": {k: statistics.median(v) for k, v in parts.items()},
    }


# ----------------------------------------------------------------- (b), (c) captures


def copy_bandwidth(n_bytes: int = 256 << 20, reps: int = 7) -> float:
    """Bytes/s of a large float32 ``copy_`` (read + write counted)."""
    n = n_bytes // 4
    dst, src = torch.empty(n), torch.ones(n)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * n_bytes / statistics.median(times)


def capture_bytes(p: int, window: int, k: int = TOP_K) -> int:
    return (7 + 3 * window + k) * 4 * p


def bench_capture(
    p: int, window: int, reps: int, interval_multiples: tuple[int, ...] = (1,)
) -> dict:
    """Timed captures of one GramCallback; ``interval_multiples=(1,)`` (the base window
    alone, what the traffic bound counts) unless the derived windows are measured."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Module()
    model.w = nn.Parameter(0.1 * torch.randn(p, generator=gen))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1.0)
    cb = GramCallback(
        select="all",
        interval=1,
        window=window,
        top_k=TOP_K,
        interval_multiples=list(interval_multiples),
    )
    cb.attach(model, opt)
    noise = 1e-3 * torch.randn(p, generator=gen)
    times = []
    with torch.no_grad():
        for step in range(1, window + 2 + reps):
            model.w.add_(noise.roll(step))  # a new delta (not timed)
            cb.tracker.accumulated.copy_(model.w).mul_(-1e-3)
            start = time.perf_counter()
            cb.capture(step)
            elapsed = time.perf_counter() - start
            if step > window + 1:  # full window: the steady state
                times.append(elapsed)
    # The per-step WD accumulation (the optimizer pre-hook's work).
    model.w.grad = torch.zeros_like(model.w)
    wd_times = []
    for _ in range(reps + 2):
        start = time.perf_counter()
        cb.tracker.record_step()
        wd_times.append(time.perf_counter() - start)
    cb.teardown(None, None, "fit")
    # Min: the code's own cost; median: what a shared machine gave it (both reported).
    return {
        "capture_s": min(times),
        "capture_median_s": statistics.median(times),
        "capture_mean_s": statistics.fmean(times),
        "wd_step_s": min(wd_times[2:]),
        "wd_step_median_s": statistics.median(wd_times[2:]),
    }


@contextmanager
def torch_window_path():
    """The window's float32 passes through torch (the kernels' fallback), for the
    side-by-side comparison (d)."""
    saved = row_dots_module._window_kernels
    row_dots_module._window_kernels = lambda: None
    try:
        yield
    finally:
        row_dots_module._window_kernels = saved


def compare_paths(reps: int, bw: float, rounds: int = 2) -> list[dict]:
    """(d): min capture time of each path over ``rounds`` alternating measurements."""
    rows = []
    for p in SIZES[1:]:
        best = {"kernels": math.inf, "torch": math.inf}
        for i in range(rounds):
            for path in ("kernels", "torch") if i % 2 == 0 else ("torch", "kernels"):
                with torch_window_path() if path == "torch" else nullcontext():
                    best[path] = min(best[path], bench_capture(p, 5, reps)["capture_s"])
        bound = capture_bytes(p, 5) / bw
        rows.append({"p": p, "bound_s": bound, **{f"{k}_s": v for k, v in best.items()}})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--pairs", type=int, default=3, help="(a): none/gram run pairs")
    parser.add_argument("--steps", type=int, default=600, help="(a): optimizer steps per run")
    parser.add_argument("--reps", type=int, default=7, help="(b, c): timed captures per size")
    parser.add_argument("--skip-runs", action="store_true", help="skip (a)")
    parser.add_argument("--skip-captures", action="store_true", help="skip (b) and (c)")
    parser.add_argument("--compare-paths", action="store_true", help="(d): numba kernels vs torch")
    parser.add_argument(
        "--derived", action="store_true", help="(e): derived windows [1, 2, 3] vs [1]"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results: dict = {"threads": torch.get_num_threads()}

    bw = copy_bandwidth()
    results["copy_bandwidth_GBps"] = bw / 1e9
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    results["load_average_1min"] = load
    print(
        f"copy bandwidth: {bw / 1e9:.1f} GB/s ({torch.get_num_threads()} thread(s)); "
        f"load average {load:.2f} on {os.cpu_count()} CPUs\n"
    )

    rows = []
    for p in [] if args.skip_captures else SIZES:
        r = bench_capture(p, 5, args.reps)
        bound = capture_bytes(p, 5) / bw
        wd_bound = 12 * p / bw
        rows.append((p, r, bound, wd_bound))
        print(f"  p={p:,}: capture {r['capture_s'] * 1e3:.2f} ms", flush=True)
    print(
        "\n(b) one captured delta, W = 5, top-4 vectors, float32 buffers, Gram rows summed "
        "in float64\n"
    )
    print(
        "| p | capture min (median) | traffic bound | × bound (min) | WD step min (median) "
        "| WD bound | × bound (min) |\n|---|---|---|---|---|---|---|"
    )
    results["capture_w5"] = []
    for p, r, bound, wd_bound in rows:
        print(
            f"| {p:,} | {r['capture_s'] * 1e3:.2f} ({r['capture_median_s'] * 1e3:.2f}) ms | "
            f"{bound * 1e3:.2f} ms | {r['capture_s'] / bound:.2f} | "
            f"{r['wd_step_s'] * 1e3:.3f} ({r['wd_step_median_s'] * 1e3:.3f}) ms | "
            f"{wd_bound * 1e3:.3f} ms | {r['wd_step_s'] / wd_bound:.2f} |"
        )
        results["capture_w5"].append({"p": p, **r, "bound_s": bound, "wd_bound_s": wd_bound})

    print("\n(c) capture as W grows (top-4 vectors)\n")
    print("| p | W | capture min (median) | traffic bound | × bound (min) |\n|---|---|---|---|---|")
    results["capture_by_w"] = []
    for p in [] if args.skip_captures else SIZES[1:]:
        for w in (5, 10, 20):
            r = bench_capture(p, w, args.reps)
            bound = capture_bytes(p, w) / bw
            print(
                f"| {p:,} | {w} | {r['capture_s'] * 1e3:.2f} "
                f"({r['capture_median_s'] * 1e3:.2f}) ms | {bound * 1e3:.2f} ms | "
                f"{r['capture_s'] / bound:.2f} |",
                flush=True,
            )
            results["capture_by_w"].append({"p": p, "W": w, **r, "bound_s": bound})

    if args.compare_paths:
        print("\n(d) capture, W = 5: numba window kernels vs the torch path\n")
        print(
            "| p | kernels min | torch min | torch / kernels | traffic bound "
            "| kernels × bound | torch × bound |\n|---|---|---|---|---|---|---|"
        )
        results["compare_paths"] = compare_paths(args.reps, bw)
        for r in results["compare_paths"]:
            f, t, b = r["kernels_s"], r["torch_s"], r["bound_s"]
            print(
                f"| {r['p']:,} | {f * 1e3:.2f} ms | {t * 1e3:.2f} ms | {t / f:.2f} | "
                f"{b * 1e3:.2f} ms | {f / b:.2f} | {t / b:.2f} |",
                flush=True,
            )

    if args.derived:
        print(
            "\n(e) derived windows: mean capture over a cycle of 6 captures (k = 2 publishes "
            "every 2nd, k = 3 every 3rd), interval_multiples [1] vs [1, 2, 3], alternating\n"
        )
        print("| p | [1] mean | [1, 2, 3] mean | ratio |\n|---|---|---|---|")
        results["derived"] = []
        reps = 6 * max(1, args.reps // 6 + 1)
        for p in SIZES[:2]:
            means: dict[tuple[int, ...], list[float]] = {(1,): [], (1, 2, 3): []}
            for _ in range(2):
                for multiples in means:
                    r = bench_capture(p, 5, reps, multiples)
                    means[multiples].append(r["capture_mean_s"])
            base, derived = min(means[(1,)]), min(means[(1, 2, 3)])
            print(
                f"| {p:,} | {base * 1e3:.2f} ms | {derived * 1e3:.2f} ms | {derived / base:.2f} |",
                flush=True,
            )
            results["derived"].append({"p": p, "base_mean_s": base, "derived_mean_s": derived})

    if not args.skip_runs:
        print(f"\n(a) Dyck runs, {args.steps} steps, callbacks=gram vs none, alternating")
        a = bench_runs(args.pairs, args.steps, args.threads)
        results["runs"] = a
        print(
            "\n| | callbacks=none | callbacks=gram | ratio |\n|---|---|---|---|\n"
            f"| median wall (s) | {a['median_none_s']:.2f} | {a['median_gram_s']:.2f} | "
            f"{a['ratio_of_medians']:.3f} |\n"
            f"| median of pairwise ratios | | | {a['median_pair_ratio']:.3f} |\n"
            f"| time inside the gram callbacks + WD hook | | {a['median_inside_s']:.2f} | "
            f"{1 + a['inside_fraction']:.3f} |"
        )
        print("\ninside, by hook (median s):")
        for k, v in sorted(a["parts_median_s"].items()):
            print(f"  {k}: {v:.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
