"""The spectral-edge lifecycle of Dyck seed 42 by phase, with and without weight decay.

Runs ``python -m grokedge.train task=dyck seed=42 callbacks=gram`` for ω = 1 and ω = 0
(in-process, the same code path), then tabulates per phase the window means of the
gradient share and alignment of v_1..v_4, k*, v_1's rotation per window, and g_23's
compression (docs/theory.md §1: max pre-grok g_23 over g_23 at the last window at or before
the grok step). The ω = 0 run never groks, so its windows are grouped by the step
ranges of the ω = 1 run's phases.

    .venv/bin/python scripts/edge_lifecycle.py --steps 3000 --out docs/lifecycle_dyck.md
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from grokedge.analysis_log import PHASES, Phases
from grokedge.run_files import read_metrics
from grokedge.train import build, compose, fit

DIRECTIONS = (1, 2, 3, 4)
PAPER = "97.6% → 5.3% (v_1 grad share, pre → at), g_23 compression 33×, k* = 1, 18°/window late"


def run(weight_decay: float, steps: int, workdir: Path, reuse: bool) -> tuple[Path, dict]:
    run_dir = workdir / f"wd{weight_decay:g}"
    if reuse and (run_dir / "summary.json").is_file():
        return run_dir, json.loads((run_dir / "summary.json").read_text())
    cfg = compose(
        [
            "task=dyck",
            "seed=42",
            "callbacks=gram",
            "callbacks.gram.edge_definition=paper",  # the paper's edge: docs/edge_definitions.md
            f"optimizer.weight_decay={weight_decay}",
            f"trainer.max_steps={steps}",
            "logger=none",
            "progress_bar.refresh_rate=0",
        ],
        run_dir,
    )
    return run_dir, fit(build(cfg, run_dir))


def windows(run_dir: Path) -> list[dict]:
    """One dict per Gram window: the ``gram/*`` and ``edge/*`` rows of a step merged."""
    by_step: dict[int, dict] = {}
    for row in read_metrics(run_dir):
        if any(k.startswith(("gram/", "edge/")) for k in row):
            by_step.setdefault(row["step"], {}).update(row)
    return [r for _, r in sorted(by_step.items()) if "edge/grad_frac_v1" in r and "gram/g23" in r]


def mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def g23_compression(rows: list[dict], grok_step: int | None) -> float:
    pre = [r["gram/g23"] for r in rows if grok_step is None or r["step"] < grok_step]
    at = [r["gram/g23"] for r in rows if grok_step is not None and r["step"] <= grok_step]
    return max(pre) / at[-1] if pre and at and at[-1] > 0 else math.nan


def table(rows: list[dict], phase_of) -> list[str]:
    head = (
        ["phase", "windows"]
        + [f"grad share v{k}" for k in DIRECTIONS]
        + [f"align v{k}" for k in DIRECTIONS]
        + ["k* (mode)", "v1 rotation (°)"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for phase in PHASES:
        group = [r for r in rows if phase_of(r["step"]) == phase]
        if not group:
            continue
        kstar = statistics.mode(int(r["gram/kstar"]) for r in group)
        cells = [phase, str(len(group))]
        cells += [f"{mean([r.get(f'edge/grad_frac_v{k}') for r in group]):.3f}" for k in DIRECTIONS]
        cells += [f"{mean([r.get(f'edge/align_v{k}') for r in group]):.2e}" for k in DIRECTIONS]
        cells += [str(kstar), f"{mean([r.get('edge/rotation_deg') for r in group]):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--workdir", type=Path, default=Path("outputs/edge_lifecycle"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--reuse", action="store_true", help="tabulate existing runs only")
    args = parser.parse_args()
    grok_dir, grok = run(1.0, args.steps, args.workdir, args.reuse)
    ctrl_dir, ctrl = run(0.0, args.steps, args.workdir, args.reuse)
    g = grok["grok_step"]
    phases = Phases(at=100, post=1000)  # the EdgeAlignmentCallback defaults for Dyck

    def phase_of(step: int) -> str:
        return phases.label(step, g)

    grok_rows, ctrl_rows = windows(grok_dir), windows(ctrl_dir)
    lines = [
        f"Dyck seed 42, {args.steps} steps, `callbacks=gram` (interval 100, window 5).",
        "",
        f"### ω = 1: grok step {g}, edge/flip_step {grok.get('edge/flip_step')}, "
        f"edge/align_step {grok.get('edge/align_step')}, "
        f"g_23 compression {g23_compression(grok_rows, g):.1f}×, wall {grok['wall_s']:.0f} s",
        "",
        *table(grok_rows, phase_of),
        "",
        f"### ω = 0: grok step {ctrl['grok_step']}, best test acc "
        f"{max(r['test/acc'] for r in read_metrics(ctrl_dir) if 'test/acc' in r):.3f}, "
        f"wall {ctrl['wall_s']:.0f} s (windows grouped by the ω = 1 run's phase step ranges)",
        "",
        *table(ctrl_rows, phase_of),
        "",
        f"Paper: {PAPER}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    (args.workdir / "summaries.json").write_text(json.dumps({"wd1": grok, "wd0": ctrl}, indent=1))


if __name__ == "__main__":
    main()
