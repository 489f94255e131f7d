"""The decoupling test on Dyck seed 42: does compression need the grad–WD alignment?

    python scripts/decoupling_dyck.py --out outputs/decoupling_s42 --threads 1 > table.md
    python scripts/decoupling_dyck.py --out outputs/decoupling_s42 --tables-only

Trains Dyck seed 42 with ω = 1 for ``--steps`` optimizer steps in several arms, each in
its own run directory under ``--out``, unless that directory already holds a finished
run:

- ``plain``: ordinary training; ``wd_removal`` fires at ``--start`` with
  ``weight_decay_after = 1`` (ω unchanged), only to take the same compression read-outs;
- ``remove`` / ``enforce`` / ``flip``: ``experiment=decoupling`` with that mode from
  ``--start`` on (see ``grokedge.callbacks.decoupling``).

Then prints one markdown table per read-out (‖θ‖, ‖θ_sel‖, attention entropy, linear
probe R² of depth, test accuracy; and the edge's σ_1, g23 and v_1 gradient share) by
step and arm, read back from each run's ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from grokedge.run_files import read_metrics
from grokedge.train import build, compose, fit

ARMS = ("plain", "remove", "enforce", "flip")

# (title, metric of the plain arm, metric of a decoupled arm)
READOUTS = (
    ("‖θ‖ (all parameters)", "wd/theta_norm", "decouple/theta_norm"),
    ("‖θ_sel‖ (attention, the Gram's θ)", "wd/theta_norm_selected", "decouple/theta_norm_selected"),
    ("attention entropy (nats; uniform causal = 2.28)", "wd/attn_entropy", "decouple/attn_entropy"),
    ("linear probe R² of depth (grouped 5-fold)", "wd/linear_r2", "decouple/linear_r2"),
    ("test token accuracy (300-sequence subset)", "wd/test_acc", "decouple/test_acc"),
    ("σ_1 of the update window", "gram/sigma_1", "gram/sigma_1"),
    ("g23 = σ_2 − σ_3", "gram/g23", "gram/g23"),
    ("v_1 gradient share of the window's energy", "edge/grad_frac_v1", "edge/grad_frac_v1"),
)


def overrides(arm: str, steps: int, start: int, threads: int | None) -> list[str]:
    common = [
        "task=dyck",
        "seed=42",
        "optimizer.weight_decay=1.0",
        "logger=none",
        f"trainer.max_steps={steps}",
        "task.stop_after_grok=null",
        "progress_bar.refresh_rate=0",
    ] + ([f"torch_threads={threads}"] if threads is not None else [])
    if arm == "plain":
        return common + [
            "callbacks=gram",
            "callbacks.gram.edge_definition=paper",  # the paper's edge: docs/edge_definitions.md
            "+callbacks@callbacks.wd_removal=wd_removal",
            f"callbacks.wd_removal.at_step={start}",
            "callbacks.wd_removal.weight_decay_after=1.0",  # no change: read-outs only
            "callbacks.wd_removal.every=100",
        ]
    return common + [
        "experiment=decoupling",
        f"callbacks.decoupling.mode={arm}",
        f"callbacks.decoupling.at_step={start}",
        "callbacks.decoupling.every=100",
    ]


def series(run_dir: Path, key: str) -> dict[int, float]:
    return {
        int(r["step"]): float(r[key])
        for r in read_metrics(run_dir)
        if key in r and math.isfinite(float(r[key]))
    }


def fmt(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.3f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def tables(out: Path, arms: list[str], steps: list[int]) -> str:
    dirs = {a: out / a for a in arms if (out / a / "summary.json").exists()}
    lines = [
        f"Runs under `{out}`.\n",
        "| arm | grok step | final test acc | final test acc unseen |",
    ]
    lines.append("|---|---|---|---|")
    for arm, d in dirs.items():
        s = json.loads((d / "summary.json").read_text())
        lines.append(
            f"| {arm} | {s.get('grok_step')} | {fmt(s.get('test/acc'))} | "
            f"{fmt(s.get('test/acc_unseen'))} |"
        )
    for title, plain_key, arm_key in READOUTS:
        lines.append(f"\n### {title}\n")
        lines.append("| step | " + " | ".join(dirs) + " |")
        lines.append("|---|" + "---|" * len(dirs))
        cols = {a: series(d, plain_key if a == "plain" else arm_key) for a, d in dirs.items()}
        for step in steps:
            lines.append(f"| {step} | " + " | ".join(fmt(cols[a].get(step)) for a in dirs) + " |")
    extra = [("decouple/v1_grad_frac", "v_1 share of the gradient part's energy, before change")]
    extra.append(("decouple/removed_frac", "energy share of the change the intervention made"))
    for key, title in extra:
        lines.append(f"\n### {title} (`{key}`, mean over the measurements)\n")
        lines.append("| arm | mean | first | last |")
        lines.append("|---|---|---|---|")
        for arm, d in dirs.items():
            if arm == "plain":
                continue
            vals = list(series(d, key).values())
            if vals:
                mean = sum(vals) / len(vals)
                lines.append(f"| {arm} | {fmt(mean)} | {fmt(vals[0])} | {fmt(vals[-1])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/decoupling_s42"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--start", type=int, default=200, help="trigger step (before grok)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tables-only", action="store_true")
    args = parser.parse_args(argv)
    for arm in args.arms:
        run_dir = args.out / arm
        if args.tables_only or (run_dir / "summary.json").exists():
            continue
        summary = fit(
            build(compose(overrides(arm, args.steps, args.start, args.threads), run_dir), run_dir)
        )
        print(
            f"{arm}: {summary['steps']} steps in {summary['wall_s']:.0f} s, grok step "
            f"{summary['grok_step']}",
            file=sys.stderr,
        )
    shown = [args.start, 400, 600, 800, 1000, 1500, 2000, 2500, args.steps]
    sys.stdout.write(tables(args.out, args.arms, sorted(set(shown))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
