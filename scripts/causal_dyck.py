"""The paper's causal experiments 2-5 on Dyck seed 42, online, as markdown tables by phase.

    python scripts/causal_dyck.py --run-dir outputs/causal_dyck_s42 --threads 1 > tables.md
    python scripts/causal_dyck.py --run-dir outputs/causal_dyck_s42 --tables-only

Trains Dyck seed 42 with ω = ``--weight-decay`` (default 1; 0 is the paper's control)
and ``callbacks=full`` for ``--steps`` optimizer steps (denser cadences than the
defaults: ablation every 250 steps, ε-sweep and curvature every 500, probes every 1,000,
each also at the grok step, probes also at the end), unless the run directory already
holds a finished run (or ``--tables-only``), then prints the ablation,
perturbation/curvature and probe results of its ``analyses.jsonl`` by step with their
phase (relative to the run's own grok step).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from grokedge.analysis_log import read_analyses
from grokedge.train import build, compose, fit


def overrides(steps: int, threads: int | None, weight_decay: float = 1.0) -> list[str]:
    out = [
        "task=dyck",
        "seed=42",
        f"optimizer.weight_decay={weight_decay}",
        "callbacks=full",
        "logger=none",
        f"trainer.max_steps={steps}",
        "progress_bar.refresh_rate=0",
        "callbacks.ablation.every=250",
        "callbacks.perturbation.every=500",
        "callbacks.probe.every=1000",
        "callbacks.perturbation.at_end=true",
        "checkpoint.save_top_k=-1",  # keep the checkpoints at 1,000, 2,000, ... (forks)
    ]
    return out + ([f"torch_threads={threads}"] if threads is not None else [])


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if x != 0 and (abs(x) < 10**-digits or abs(x) >= 1e4):
        return f"{x:.2e}"
    return f"{x:.{digits}f}"


def tables(run_dir: Path) -> str:
    rows = read_analyses(run_dir)
    grok = next((r["grok_step"] for r in rows if r.get("grok_step") is not None), None)
    grad_frac = {
        r["step"]: r["directions"][0]["grad_frac"]
        for r in rows
        if r["analysis"] == "edge_directions"
    }
    out = [f"Run directory: `{run_dir}`; grok step: {grok}\n"]

    out.append("### Ablation (edge = span(v1, v2); 300 test sequences; Δ token accuracy)\n")
    out.append(
        "| step | phase | base acc | Δacc edge | Δacc v1 | Δacc bulk v3,v4 | random Δacc "
        "mean ± sd | ratio (paper's) | z | matched Δacc mean ± sd | matched ratio | "
        "‖Δθ‖ | Δacc edge, unseen | v1 grad share |"
    )
    out.append("|" + "---|" * 14)
    for r in (r for r in rows if r["analysis"] == "ablation"):
        ar, am = r["acc_random"], r["acc_matched"]
        out.append(
            f"| {r['step']} | {r['phase']} | {fmt(r['base_acc'])} | {fmt(r['edge']['dacc'])} | "
            f"{fmt(r['v1']['dacc'])} | {fmt(r['bulk']['dacc'])} | "
            f"{fmt(ar['random_mean'], 4)} ± {fmt(ar['random_sd'], 4)} | {fmt(ar['ratio'], 1)} | "
            f"{fmt(ar['z'], 1)} | {fmt(am['random_mean'], 4)} ± {fmt(am['random_sd'], 4)} | "
            f"{fmt(am['ratio'], 1)} | {fmt(r['displacement'], 2)} | "
            f"{fmt(r['edge_dacc_unseen'])} | {fmt(grad_frac.get(r['edge_step']), 2)} |"
        )

    out.append("\n### ε-sweep and curvature (200 test sequences; ε ∈ [−0.03, 0.03], 25 points)\n")
    out.append(
        "| step | phase | σ1 | max KL v1 | max KL v2 | max KL v3 | max KL v4 | "
        "max \\|ΔL\\| v1 | v1ᵀHv1 FD | v1ᵀHv1 HVP | v3ᵀHv3 FD | v3ᵀHv3 HVP | v4ᵀHv4 HVP |"
    )
    out.append("|" + "---|" * 13)
    for r in (r for r in rows if r["analysis"] == "perturbation"):
        ext = r["extremes"]
        curv = {c["k"]: c for c in r["curvature"]}

        def kl(k: int, ext=ext) -> str:
            return fmt(ext.get(str(k), {}).get("max_kl"), 6)

        def cv(k: int, how: str, curv=curv) -> str:
            return fmt(curv.get(k, {}).get(how), 4)

        out.append(
            f"| {r['step']} | {r['phase']} | {fmt(r['sigma'][0], 3)} | {kl(1)} | {kl(2)} | "
            f"{kl(3)} | {kl(4)} | {fmt(ext.get('1', {}).get('max_abs_delta_loss'), 5)} | "
            f"{cv(1, 'fd')} | {cv(1, 'hvp')} | {cv(3, 'fd')} | {cv(3, 'hvp')} | {cv(4, 'hvp')} |"
        )
    out.append("\nPath-norm points (σ_k, |ΔL| at |ε| = 0.03):\n")
    out.append("| step | phase | " + " | ".join(f"v{k}: σ, \\|ΔL\\|" for k in (1, 2, 3, 4)) + " |")
    out.append("|" + "---|" * 6)
    for r in (r for r in rows if r["analysis"] == "perturbation"):
        pts = {p["k"]: p for p in r["path_points"]}
        cells = [
            f"{fmt(pts[k]['sigma'], 3)}, {fmt(pts[k]['abs_dloss'], 5)}" if k in pts else "–"
            for k in (1, 2, 3, 4)
        ]
        out.append(f"| {r['step']} | {r['phase']} | " + " | ".join(cells) + " |")

    out.append("\n### Probes of depth, last block before the final norm (300 test sequences)\n")
    out.append("| step | phase | linear R² | quadratic R² | MLP R² | positions |")
    out.append("|---|---|---|---|---|---|")
    for r in (r for r in rows if r["analysis"] == "probe"):
        s = r["scores"][r["primary"]]
        cells = [
            f"{fmt(s[k]['mean'])} ± {fmt(s[k]['sd'])}" if k in s else "–"
            for k in ("linear", "quadratic", "mlp")
        ]
        out.append(
            f"| {r['step']} | {r['phase']} | " + " | ".join(cells) + f" | {r['n_samples']} |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path("outputs/causal_dyck_s42"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--weight-decay", type=float, default=1.0, help="ω (paper: 1; control: 0)")
    parser.add_argument("--tables-only", action="store_true")
    args = parser.parse_args(argv)
    finished = any(
        r["analysis"] == "edge_summary" for r in read_analyses(args.run_dir, ["edge_summary"])
    )
    if not args.tables_only and not finished:
        run = build(
            compose(overrides(args.steps, args.threads, args.weight_decay), args.run_dir),
            args.run_dir,
        )
        summary = fit(run)
        print(
            f"trained {summary['steps']} steps in {summary['wall_s']:.0f} s, grok step "
            f"{summary['grok_step']}",
            file=sys.stderr,
        )
    sys.stdout.write(tables(args.run_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
