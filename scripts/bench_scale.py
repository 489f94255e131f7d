"""GramCallback at scale: per-step overhead over the optimizer step, and memory vs prediction.

    python scripts/bench_scale.py                                  # CPU: p = 1e5 .. 5e7
    python scripts/bench_scale.py --device cuda --p 1e6,1e7,5e7,1e8 --json out.json

For each p (selected elements; ``select=all`` over a plain parameter list of that size,
trained by AdamW with ω = 1 on fixed synthetic gradients) it measures, side by side in this
one process:

- ``opt``: one ``AdamW.step()`` alone (foreach implementation), median over
  ``--rounds`` rounds of ``--steps`` steps;
- ``hook``: the same step with GramCallback's weight-decay tracker registered (its
  per-step work: one fused add of −η ω θ into the accumulator). The two alternate round by
  round (the hook is removed and re-registered), so that a shared machine's noise falls
  on both alike;
- ``capture``: one ``GramCallback.capture`` with a full window (form θ_now − θ_prev,
  push with its incremental float64 Gram rows, eigendecomposition, top-k edge vectors),
  median over ``--captures`` captures: the time per delta;
- ``overhead`` = (hook − opt + capture / interval) / opt: the callback's cost per
  optimizer step as a fraction of the step, at ``--interval`` steps per delta
  (hook − opt: the median of the rounds' paired differences).

Memory: the bytes of every storage the callback allocated (all tensors found through the
garbage collector, CPU) or ``torch.cuda.memory_allocated`` growth (CUDA), and on CUDA the
peak during a capture over the allocation before it, against
``grokedge.edge.memory.window_memory`` (persistent, and persistent + transient).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from grokedge.callbacks.gram import GramCallback
from grokedge.edge.memory import window_memory

CHUNK = 1 << 22
"""Elements per parameter tensor: a model of p elements is ceil(p / CHUNK) tensors."""


class Flat(nn.Module):
    """p parameters in tensors of at most CHUNK elements (names ``w.0``, ``w.1``, ...)."""

    def __init__(self, p: int, device: torch.device) -> None:
        super().__init__()
        sizes = [CHUNK] * (p // CHUNK) + ([p % CHUNK] if p % CHUNK else [])
        self.w = nn.ParameterList(nn.Parameter(torch.randn(n, device=device) * 0.02) for n in sizes)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Any, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _storages(device: torch.device) -> dict[int, int]:
    """data_ptr -> nbytes of every live storage on ``device`` (through gc)."""
    with warnings.catch_warnings():  # isinstance on deprecated torch objects warns
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    out: dict[int, int] = {}
    for t in tensors:
        if t.device.type == device.type:
            s = t.untyped_storage()
            if s.nbytes():
                out[s.data_ptr()] = s.nbytes()
    return out


def bench_one(p: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """All figures for one p (see the module docstring)."""
    torch.manual_seed(0)
    model = Flat(p, device)
    for param in model.parameters():
        param.grad = torch.randn_like(param) * 1e-3  # fixed: the step's cost, not backward's
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1.0, foreach=True)
    opt.step()  # optimizer state exists before the callback does
    gc.collect()
    before = _storages(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        alloc_before = torch.cuda.memory_allocated(device)
    gram = GramCallback(
        select="all",
        interval=args.interval,
        window=args.window,
        top_k=args.top_k,
        buffer_dtype=args.buffer_dtype,
    )
    gram.attach(model, opt)
    assert gram.tracker is not None and gram.recorder._handle is not None

    # The window fills (W captures), then the timed captures run on a full window.
    capture_s: list[float] = []
    peak_over = 0
    for i in range(args.window + args.captures):
        opt.step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        seconds = _timed(lambda i=i: gram.capture(i + 1), device)
        if device.type == "cuda":
            peak_over = max(peak_over, torch.cuda.max_memory_allocated(device) - base)
        if i >= args.window:
            capture_s.append(seconds)

    # Optimizer step alone vs with the tracker's pre-hook, alternating round by round.
    opt_s: list[float] = []
    hook_s: list[float] = []

    def steps() -> None:
        for _ in range(args.steps):
            opt.step()

    for _ in range(args.rounds):
        gram.recorder._handle.remove()
        opt_s.append(_timed(steps, device) / args.steps)
        gram.recorder._handle = gram.tracker.register()
        hook_s.append(_timed(steps, device) / args.steps)

    gc.collect()
    after = _storages(device)
    allocated = sum(n for ptr, n in after.items() if ptr not in before)
    predicted = window_memory(
        p, args.window, args.top_k, args.buffer_dtype, device_type=device.type
    )
    t_opt, t_hook = statistics.median(opt_s), statistics.median(hook_s)
    # The hook's cost from the rounds' paired differences: noise common to a round cancels.
    t_extra = statistics.median(h - o for h, o in zip(hook_s, opt_s, strict=True))
    t_capture = statistics.median(capture_s)
    row: dict[str, Any] = {
        "p": p,
        "opt_ms": 1e3 * t_opt,
        "hook_ms": 1e3 * t_hook,
        "hook_extra_ms": 1e3 * t_extra,
        "capture_ms": 1e3 * t_capture,
        "capture_min_ms": 1e3 * min(capture_s),
        "capture_over_opt": t_capture / t_opt,
        "overhead": (t_extra + t_capture / args.interval) / t_opt,
        "predicted_bytes": predicted.persistent,
        "predicted_peak_bytes": predicted.total_bytes,
        "allocated_bytes": allocated,
        "allocated_over_predicted": allocated / predicted.persistent,
    }
    if device.type == "cuda":
        row["cuda_allocated_bytes"] = torch.cuda.memory_allocated(device) - alloc_before
        row["cuda_capture_peak_over_bytes"] = peak_over
        row["cuda_allocated_over_predicted"] = row["cuda_allocated_bytes"] / predicted.persistent
    gram.teardown(None, None, "fit")  # type: ignore[arg-type]
    return row  # the frame's tensors are freed here; main collects before the next size


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f}"


def table(rows: list[dict[str, Any]], interval: int) -> str:
    """Markdown table of the rows."""
    head = (
        "| p | AdamW step (ms) | + WD hook (ms) | capture = time per delta (ms) | "
        f"capture / step | overhead at N = {interval} | predicted (GB) | allocated (GB) | "
        "allocated / predicted |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['p']:.0e} | {r['opt_ms']:.2f} | {r['hook_extra_ms']:+.2f} | "
            f"{r['capture_ms']:.1f} | {r['capture_over_opt']:.2f} | {r['overhead']:.4f} | "
            f"{_gb(r['predicted_bytes'])} | {_gb(r['allocated_bytes'])} | "
            f"{r['allocated_over_predicted']:.4f} |"
        )
    if rows and "cuda_allocated_bytes" in rows[0]:
        lines += ["", "| p | cuda allocated (GB) | / predicted | capture peak over it (GB) |"]
        lines.append("|---|---|---|---|")
        for r in rows:
            lines.append(
                f"| {r['p']:.0e} | {_gb(r['cuda_allocated_bytes'])} | "
                f"{r['cuda_allocated_over_predicted']:.4f} | "
                f"{_gb(r['cuda_capture_peak_over_bytes'])} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument(
        "--p", default="1e5,1e6,1e7,5e7", help="comma-separated sizes (selected elements)"
    )
    parser.add_argument("--window", type=int, default=5, help="W")
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--interval", type=int, default=100, help="N, optimizer steps per delta")
    parser.add_argument("--buffer-dtype", default="float32")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per arm")
    parser.add_argument("--captures", type=int, default=3, help="timed captures (full window)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = [int(float(s)) for s in args.p.split(",") if s.strip()]
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "window": args.window,
        "top_k": args.top_k,
        "interval": args.interval,
        "buffer_dtype": args.buffer_dtype,
    }
    print(json.dumps(info), flush=True)
    rows = []
    for p in sizes:
        start = time.perf_counter()
        row = bench_one(p, args, device)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        print(
            f"p={p:.0e}: step {row['opt_ms']:.2f} ms, hook {row['hook_extra_ms']:+.2f} ms, "
            f"capture {row['capture_ms']:.1f} ms, overhead {row['overhead']:.4f} at "
            f"N={args.interval}, allocated/predicted {row['allocated_over_predicted']:.4f} "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
        if args.json is not None:  # after each size: a killed run keeps what it measured
            args.json.write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
    print()
    print(table(rows, args.interval))


if __name__ == "__main__":
    main()
