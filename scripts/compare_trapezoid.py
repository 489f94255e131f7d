"""Exact weight-decay split vs the paper's trapezoid approximation, on a real Dyck run.

    python scripts/compare_trapezoid.py                      # seed 42, ω = 1, callbacks=gram
    python scripts/compare_trapezoid.py --out /tmp/trap -- trainer.max_steps=1500

The GramCallback accumulates the exact per-step WD displacement Σ_t −η_t ω θ_t of every
delta; the paper approximates it by −η ω N (θ_prev + θ_curr)/2 and takes the gradient part
as the residual. A probe callback snapshots θ_sel at every capture, forms the trapezoid
WD part of each delta (``grokedge.edge.decomposition.trapezoid_wd``), projects both versions on the
window's published edge vectors and compares v_1's gradient energy share
grad_frac = gE/(gE + wE) window by window. Windows are labelled with the run's phases
(EdgeAlignmentCallback defaults: at = ±1 interval, post up to 10 intervals after the grok
step). Prints a markdown table per phase.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch

from grokedge.analysis_log import Phases
from grokedge.callbacks import EdgeAlignmentCallback, GramCallback, find_gram_callback
from grokedge.edge.decomposition import energy_fractions, trapezoid_wd
from grokedge.functional import analysed_module
from grokedge.train import build, compose, fit

BASE = [
    "task=dyck",
    "seed=42",
    "optimizer.weight_decay=1.0",
    "callbacks=gram",
    "callbacks.gram.edge_definition=paper",  # the paper's edge: docs/edge_definitions.md
    "logger=none",
    "task.datamodule.ood_sequences=0",
    "task.stop_after_grok=1000",
    "trainer.max_steps=2000",
    "progress_bar.refresh_rate=0",
]


class TrapezoidProbe(L.Callback):
    """Compares the exact and trapezoid WD parts on each window the GramCallback closes.

    Must come after the GramCallback in ``trainer.callbacks`` (it reads the fresh edge).
    """

    def __init__(self, gram: GramCallback) -> None:
        self.gram = gram
        self.rows: list[dict[str, float]] = []
        self._theta: torch.Tensor | None = None
        self._trap: collections.deque[torch.Tensor] = collections.deque(maxlen=gram.window_size)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._theta = self.gram.selector.flatten(analysed_module(pl_module))

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.gram.last_capture_step != step or self._theta is None:
            return  # not a capture step
        theta = self.gram.selector.flatten(analysed_module(pl_module))
        (group,) = trainer.optimizers[0].param_groups
        self._trap.append(
            trapezoid_wd(self._theta, theta, group["lr"], group["weight_decay"], self.gram.interval)
        )
        self._theta = theta
        edge = self.gram.edge
        if edge is None or edge.step != step:
            return
        trap = torch.stack(list(self._trap)[-edge.count :]).double()  # [W', p]
        v = edge.vectors.double()  # [k, p]
        wd_trap = trap @ v.T
        grad_trap = edge.total_proj - wd_trap
        exact, _, exact_align = energy_fractions(edge.grad_proj, edge.wd_proj)
        approx, _, approx_align = energy_fractions(grad_trap, wd_trap)
        wd_exact = self.gram.window.wd_deltas()[-1].double()
        wd_err = float((trap[-1] - wd_exact).norm() / wd_exact.norm())
        self.rows.append(
            {
                "step": step,
                "exact_v1": float(exact[0]),
                "trap_v1": float(approx[0]),
                "exact_align_v1": float(exact_align[0]),
                "trap_align_v1": float(approx_align[0]),
                "wd_rel_err": wd_err,
            }
        )


def summarise(rows: list[dict], phases: Phases, grok: int | None) -> str:
    by_phase: dict[str, list[dict]] = collections.defaultdict(list)
    for r in rows:
        by_phase[phases.label(int(r["step"]), grok)].append(r)
    lines = [
        "| phase | windows | steps | v_1 grad share, exact (mean) | trapezoid (mean) | "
        "abs. error mean | abs. error max | rel. error of the WD vector (median) | "
        "align sign flips |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for phase in ("pre", "at", "post", "late"):
        rs = by_phase.get(phase, [])
        if not rs:
            continue
        errs = [abs(r["trap_v1"] - r["exact_v1"]) for r in rs]
        flips = sum(1 for r in rs if (r["exact_align_v1"] > 0) != (r["trap_align_v1"] > 0))
        lines.append(
            f"| {phase} | {len(rs)} | {int(rs[0]['step'])}–{int(rs[-1]['step'])} | "
            f"{statistics.fmean(r['exact_v1'] for r in rs):.4f} | "
            f"{statistics.fmean(r['trap_v1'] for r in rs):.4f} | "
            f"{statistics.fmean(errs):.2e} | {max(errs):.2e} | "
            f"{statistics.median(r['wd_rel_err'] for r in rs):.2e} | {flips} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/compare_trapezoid", help="run directory")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides (after --)")
    args = parser.parse_args(argv)
    run_dir = Path(args.out)
    cfg = compose([*BASE, *args.overrides], run_dir)
    run = build(cfg, run_dir)
    gram = find_gram_callback(run.trainer)
    probe = TrapezoidProbe(gram)
    callbacks = run.trainer.callbacks
    callbacks.insert(callbacks.index(gram) + 1, probe)
    start = time.perf_counter()
    summary = fit(run)
    wall = time.perf_counter() - start
    grok = summary["grok_step"]
    (edge_cb,) = [c for c in callbacks if isinstance(c, EdgeAlignmentCallback)]
    phases = edge_cb.phases
    (run_dir / "trapezoid.json").write_text(json.dumps(probe.rows, indent=1))
    print(f"\ncommand: python scripts/compare_trapezoid.py {' '.join(sys.argv[1:])}")
    print(
        f"grok step {grok}, {summary['steps']} steps, {len(probe.rows)} windows, "
        f"{wall:.0f} s; phases: at = grok ± {phases.at}, post up to grok + {phases.post}"
    )
    events = edge_cb.edge_events
    print(f"flip step {events.flip_step}, align step {events.align_step}\n")
    print(summarise(probe.rows, phases, grok))
    print("\nper window (step: exact -> trapezoid v_1 grad share):")
    print(
        ", ".join(
            f"{int(r['step'])}: {r['exact_v1']:.3f}->{r['trap_v1']:.3f}"
            for r in probe.rows
            if not math.isnan(r["exact_v1"])
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
