"""A 2-process DDP run (gloo, CPU) against a 1-process run with the same global batch.

    python scripts/ddp_equivalence.py                 # both runs, then the comparison
    python scripts/ddp_equivalence.py --steps 120 --keep outputs/ddp_eq
    python scripts/ddp_equivalence.py --experiment decoupling --steps 60

``--experiment full`` (the default) runs Dyck with ``callbacks=full`` twice —
``trainer=cpu`` and ``trainer=ddp`` with two CPU processes — and compares what they log:
the singular values ``gram/sigma_j``, the gradient shares ``edge/grad_frac_v{k}``, the
gap flow scalars ``gapflow/*`` (its mode k exactly), the ablation results, the
perturbation's max KL and curvatures v_kᵀHv_k and the class row (its two class names
exactly), from ``metrics.jsonl`` and ``analyses.jsonl``.

``--experiment decoupling`` runs ``experiment=decoupling`` (the per-step removal of the
gradient part's v_1 component, triggered once the edge exists) the same two ways and
compares ``gram/sigma_j`` and the ``decouple/*`` read-outs; each rank also saves its
final parameters, and the DDP ranks' must be bit-identical (each rank applies the
intervention itself, so a rank-dependent update would make the replicas drift apart),
and close to the 1-process run's.

It prints the largest absolute and relative differences and exits 1 if one exceeds its
tolerance (``TOLERANCES``), 0 otherwise; the last line is ``RESULT {json}``.

Same global batch: Lightning's DDP launcher gives every rank the datamodule's whole
stream, so the DDP run splits each training batch between the ranks (``split_batch``):
rank r keeps the rows whose labelled tokens fall in the r-th equal share of the batch's
token weight (a row on a boundary is shared with fractional weights). Each rank's loss
is then its token-weighted sum divided by half the batch's token weight, and the mean
that DDP takes of the two gradients is exactly the 1-process gradient up to float
rounding. Evaluation sets are not split (``use_distributed_sampler: false`` in
``conf/trainer/ddp.yaml``): both ranks evaluate all of them.

Lightning's DDP launcher re-runs the command line of the process that calls ``fit``: here
``--role run`` of this script (never pytest). Hydra's global config is cleared after the
run is built so that the launcher re-runs this script as it is.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from grokedge.analysis_log import read_analyses
from grokedge.batch import IGNORE_INDEX
from grokedge.run_files import metrics_by_step

TOLERANCES = {
    # σ_j relative: the two runs differ by the float rounding of a gradient averaged over
    # ranks, amplified over the AdamW trajectory (measured ~1e-6 at 120 steps).
    "sigma_rel": 1e-3,
    # energy shares and ablation/perturbation losses, absolute.
    "grad_frac_abs": 1e-3,
    "ablation_loss_abs": 1e-3,
    "ablation_displacement_rel": 1e-3,
    # accuracies move in steps of one token of the ~1,000-token subsets: allow one or two
    # tokens flipping at a decision boundary.
    "ablation_acc_abs": 5e-3,
    # Gap flow terms (curvatures and gradients along v_k, v_k+1 of the training loss,
    # the terms, the balance, the observed dg/dt, the running correlations), relative
    # to the largest magnitude of the same metric over the run (a term that crosses zero
    # has no meaningful relative error at its crossing). Measured 1.1e-3 at 120 steps
    # (the effective balance; the raw terms ~5e-4).
    "gapflow_rel": 1e-2,
    # The perturbation's max KL per direction and v_kᵀHv_k (exact HVP and the central
    # difference), relative to the largest magnitude of the same quantity. Measured 1.6e-3.
    "perturb_rel": 1e-2,
    # The class row's late grad share, functional R² and late balance, absolute (measured
    # 3e-6); the class names and window counts must agree exactly.
    "class_abs": 1e-2,
    # Its late rotation of v_1 in degrees, absolute: arccos near 0 turns a float32
    # rounding of 1e-7 in the cosine into ~0.03° (measured 2e-6° at 16°).
    "class_rotation_deg_abs": 0.1,
    # decouple/* read-outs (energy fractions, θ norms, entropy, probe R², accuracy, steps
    # modified), absolute. Measured 1e-7 at 60 steps.
    "decouple_abs": 1e-3,
    # The final parameters of the decoupling runs, 1 process against DDP rank 0:
    # ‖θ_1 − θ_ddp‖ / ‖θ_1‖ over the whole network (measured ~2e-5 at 60 steps). Not the
    # max abs: the attention's key bias has an exactly zero true gradient, so AdamW turns
    # its rounding noise into O(lr) steps of either sign (measured 3e-4 at lr 1e-3). The
    # DDP ranks against each other: exactly equal.
    "params_rel": 1e-3,
}


EXPERIMENTS = ("full", "decoupling")


def overrides(steps: int, world: int, experiment: str = "full") -> list[str]:
    """The run's Hydra overrides: callbacks=full (or experiment=decoupling) at a cadence
    that fits ``steps``."""
    interval = max(steps // 6, 2)
    trainer = (
        ["trainer=ddp", "trainer.accelerator=cpu", f"trainer.devices={world}"]
        if world > 1
        else ["trainer=cpu"]
    )
    common = [
        "logger=none",
        *trainer,
        f"trainer.max_steps={steps}",
        f"task.gram_interval={interval}",
        f"task.eval_every={2 * interval}",
        "task.datamodule.ood_sequences=0",
        f"checkpoint.every_n_train_steps={3 * interval}",  # a save mid-run (collective)
        "torch_threads=1",
        "progress_bar.refresh_rate=0",
    ]
    if experiment == "decoupling":
        return [
            "experiment=decoupling",
            *common,
            f"task.max_steps={steps}",
            # The edge exists from the second delta on: intervene from then on.
            f"callbacks.decoupling.at_step={2 * interval}",
            f"callbacks.decoupling.every={interval}",
            "callbacks.decoupling.n_sequences=50",
        ]
    return [
        "task=dyck",
        "callbacks=full",
        *common,
        f"callbacks.ablation.every={steps}",
        "callbacks.ablation.n_random=4",
        "callbacks.ablation.n_sequences=100",
        f"callbacks.perturbation.every={steps}",
        "callbacks.perturbation.grid_points=5",
        "callbacks.perturbation.n_directions=2",
        "callbacks.perturbation.n_sequences=50",
        "callbacks.probe.kinds=[linear]",
        "callbacks.probe.n_sequences=100",
        f"callbacks.gap_flow.every={interval}",  # every window: terms and forward pairs
        "callbacks.classes.n_sequences=100",
    ]


# --------------------------------------------------------------------------- the split


def split_batch(batch: dict[str, Any], rank: int, world: int, num_classes: int) -> dict:
    """Rank ``rank``'s share of a training batch, by equal shares of its token weight.

    With t_i = weight_i · (labelled tokens of row i within the head's classes) and T = Σ t,
    rank r keeps the part of each row inside [r·T/world, (r+1)·T/world) of the cumulative
    token weight, with its weight scaled by that fraction. Every rank's batch then holds
    T/world token weight, and the union of the ranks' batches (weights added) is the
    batch: DDP's mean of the per-rank mean-loss gradients is the whole batch's gradient.
    """
    labels = batch["labels"]
    weight = batch["weight"].to(torch.float64)
    tokens = ((labels != IGNORE_INDEX) & (labels < num_classes)).sum(1).to(torch.float64)
    t = weight * tokens
    cum = torch.cumsum(t, 0)
    begin = cum - t
    total = float(cum[-1])
    lo, hi = total * rank / world, total * (rank + 1) / world
    overlap = (torch.minimum(cum, torch.tensor(hi)) - torch.maximum(begin, torch.tensor(lo))).clamp(
        min=0.0
    )
    keep = overlap > 0
    frac = torch.where(t > 0, overlap / torch.where(t > 0, t, 1.0), 0.0)
    out = {k: v[keep] for k, v in batch.items() if isinstance(v, torch.Tensor)}
    out["weight"] = (weight * frac)[keep].to(batch["weight"].dtype)
    return out


def install_split(datamodule: Any) -> None:
    """Make ``datamodule.sample_train_batch`` return this rank's share (see ``split_batch``)."""
    original = datamodule.sample_train_batch
    num_classes = int(datamodule.model_dims()["num_classes"])

    def sample(index: int) -> dict:
        trainer = datamodule.trainer
        batch = original(index)
        if trainer is None or trainer.world_size == 1:
            return batch
        return split_batch(batch, trainer.global_rank, trainer.world_size, num_classes)

    datamodule.sample_train_batch = sample  # the endless loader calls the instance's


# --------------------------------------------------------------------------- one run


def run(out: Path, steps: int, world: int, experiment: str = "full") -> None:
    """Build and fit one run into ``out`` (both DDP ranks execute this); with
    ``experiment`` decoupling each rank then saves its parameters to
    ``params_rank{r}.pt``."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from grokedge.train import build, compose, fit

    torch.set_num_threads(1)
    os.environ.setdefault("WANDB_MODE", "disabled")
    cfg = compose(overrides(steps, world, experiment), out)
    built = build(cfg, out)
    install_split(built.datamodule)
    # Lightning re-runs `sys.argv` for the other ranks; with Hydra's config set it would
    # rewrite the command for a Hydra app (this script is not one). The config's
    # ${hydra:...} interpolations are resolved first, while Hydra's config is still there.
    OmegaConf.resolve(built.cfg)
    HydraConfig.instance().cfg = None
    fit(built)
    if experiment == "decoupling":
        params = {k: v.detach().cpu() for k, v in built.module.state_dict().items()}
        torch.save(params, out / f"params_rank{built.trainer.global_rank}.pt")


# --------------------------------------------------------------------------- compare


class Diffs:
    """Largest |a − b| and |a − b| / max(|a|, |b|) per group of compared numbers."""

    def __init__(self) -> None:
        self.abs: dict[str, float] = {}
        self.rel: dict[str, float] = {}
        self.count: dict[str, int] = {}
        self.missing: list[str] = []

    def add(self, group: str, a: Any, b: Any, what: str, scale: float | None = None) -> None:
        """Compare two numbers (None: NaN; both must be None or neither). The relative
        difference is taken against ``scale`` (default: the larger of |a|, |b|)."""
        if a is None or b is None:  # NaN is written as null
            if (a is None) != (b is None):
                self.missing.append(f"{what}: {a} vs {b}")
            return
        a, b = float(a), float(b)
        if math.isinf(a) or math.isinf(b):
            if a != b:
                self.missing.append(f"{what}: {a} vs {b}")
            return
        d = abs(a - b)
        scale = max(abs(a), abs(b)) if scale is None else scale
        self.abs[group] = max(self.abs.get(group, 0.0), d)
        self.rel[group] = max(self.rel.get(group, 0.0), d / scale if scale > 0 else 0.0)
        self.count[group] = self.count.get(group, 0) + 1


def _metric_group(key: str, experiment: str) -> str | None:
    """The comparison group of a ``metrics.jsonl`` key (None: not compared)."""
    if key.startswith("gram/sigma_"):
        return "sigma"
    if experiment == "decoupling":
        return "decouple" if key.startswith("decouple/") and key != "decouple/start_step" else None
    if key.startswith("edge/grad_frac_v"):
        return "grad_frac"
    if key == "gapflow/k":
        return "gapflow_k"
    if key.startswith("gapflow/"):
        return "gapflow"
    return None


def _compare_scaled(diffs: Diffs, group: str, pairs: dict[str, list[tuple[Any, Any, str]]]) -> None:
    """Per name, |a − b| relative to the largest |value| of that name over both runs (the
    ``rel`` of ``group``); ``abs`` is the plain largest difference."""
    for values in pairs.values():
        finite = [abs(float(v)) for a, b, _ in values for v in (a, b) if v is not None]
        scale = max(finite, default=0.0)
        for a, b, what in values:
            diffs.add(group, a, b, what, scale=scale)


def compare(one: Path, two: Path, experiment: str = "full") -> tuple[Diffs, dict[str, Any]]:
    diffs = Diffs()
    m1, m2 = metrics_by_step(one), metrics_by_step(two)
    scaled: dict[str, list[tuple[Any, Any, str]]] = {}
    for step in sorted(set(m1) | set(m2)):
        a, b = m1.get(step, {}), m2.get(step, {})
        for key in sorted(set(a) | set(b)):
            group = _metric_group(key, experiment)
            if group is None:
                continue
            if key not in a or key not in b:
                diffs.missing.append(f"step {step} {key}: only in one run")
                continue
            if group == "gapflow":
                scaled.setdefault(key, []).append((a[key], b[key], f"step {step} {key}"))
            else:
                diffs.add(group, a[key], b[key], f"step {step} {key}")
    _compare_scaled(diffs, "gapflow", scaled)
    info: dict[str, Any] = {
        "predicted_bytes": [
            _last(m1, "gram/predicted_bytes"),
            _last(m2, "gram/predicted_bytes"),
        ],
    }
    if experiment == "decoupling":
        info.update(_compare_params(diffs, one, two))
        return diffs, info
    abl1, abl2 = read_analyses(one, ["ablation"]), read_analyses(two, ["ablation"])
    if len(abl1) != len(abl2) or not abl1:
        diffs.missing.append(f"ablation rows: {len(abl1)} vs {len(abl2)}")
    for r1, r2 in zip(abl1, abl2, strict=False):
        where = f"ablation step {r1['step']}"
        if r1["step"] != r2["step"]:
            diffs.missing.append(f"{where}: steps {r1['step']} vs {r2['step']}")
        diffs.add("ablation_loss", r1["base_loss"], r2["base_loss"], where)
        diffs.add("ablation_acc", r1["base_acc"], r2["base_acc"], where)
        diffs.add("ablation_displacement", r1["displacement"], r2["displacement"], where)
        for name in ("edge", "v1", "bulk"):
            diffs.add("ablation_loss", r1[name]["dloss"], r2[name]["dloss"], f"{where} {name}")
            diffs.add("ablation_acc", r1[name]["dacc"], r2[name]["dacc"], f"{where} {name}")
        for name in ("random_dloss", "matched_dloss"):
            for x, y in zip(r1[name], r2[name], strict=True):
                diffs.add("ablation_loss", x, y, f"{where} {name}")
        for name in ("random_dacc", "matched_dacc"):
            for x, y in zip(r1[name], r2[name], strict=True):
                diffs.add("ablation_acc", x, y, f"{where} {name}")
    _compare_perturbation(diffs, one, two)
    _compare_classes(diffs, one, two)
    info.update(
        ablation_rows=[len(abl1), len(abl2)],
        perturbation_rows=[
            len(read_analyses(one, ["perturbation"])),
            len(read_analyses(two, ["perturbation"])),
        ],
        gap_flow_rows=[
            len(read_analyses(one, ["gap_flow"])),
            len(read_analyses(two, ["gap_flow"])),
        ],
        class_rows=[len(read_analyses(one, ["classes"])), len(read_analyses(two, ["classes"]))],
    )
    return diffs, info


def _compare_perturbation(diffs: Diffs, one: Path, two: Path) -> None:
    """Max KL per direction and v_kᵀHv_k (HVP, central difference) of each call."""
    rows1, rows2 = read_analyses(one, ["perturbation"]), read_analyses(two, ["perturbation"])
    if len(rows1) != len(rows2) or not rows1:
        diffs.missing.append(f"perturbation rows: {len(rows1)} vs {len(rows2)}")
    scaled: dict[str, list[tuple[Any, Any, str]]] = {}
    for r1, r2 in zip(rows1, rows2, strict=False):
        where = f"perturbation step {r1['step']}"
        if sorted(r1["extremes"]) != sorted(r2["extremes"]):
            directions = f"{sorted(r1['extremes'])} vs {sorted(r2['extremes'])}"
            diffs.missing.append(f"{where}: directions {directions}")
            continue
        for k in r1["extremes"]:
            a, b = r1["extremes"][k]["max_kl"], r2["extremes"][k]["max_kl"]
            scaled.setdefault(f"max_kl_v{k}", []).append((a, b, f"{where} max_kl v{k}"))
        if len(r1["curvature"]) != len(r2["curvature"]):
            diffs.missing.append(f"{where}: curvature rows differ")
        for c1, c2 in zip(r1["curvature"], r2["curvature"], strict=False):
            for way in ("hvp", "fd"):
                name = f"{way}_v{c1['k']}"
                scaled.setdefault(name, []).append((c1[way], c2[way], f"{where} {name}"))
    _compare_scaled(diffs, "perturb", scaled)


CLASS_NUMBERS = ("late_grad_share", "late_rotation_deg", "functional_r2", "late_balance")


def _compare_classes(diffs: Diffs, one: Path, two: Path) -> None:
    """The class rows: the names exactly, the measurements within ``class_abs``."""
    rows1, rows2 = read_analyses(one, ["classes"]), read_analyses(two, ["classes"])
    if len(rows1) != len(rows2) or not rows1:
        diffs.missing.append(f"classes rows: {len(rows1)} vs {len(rows2)}")
    for r1, r2 in zip(rows1, rows2, strict=False):
        where = f"classes step {r1['step']}"
        for name in ("observed", "predicted", "late_windows", "balance_windows"):
            if r1[name] != r2[name]:
                diffs.missing.append(f"{where} {name}: {r1[name]} vs {r2[name]}")
        for name in CLASS_NUMBERS:
            group = "class_rotation_deg" if name == "late_rotation_deg" else "class"
            diffs.add(group, r1[name], r2[name], f"{where} {name}")


def _compare_params(diffs: Diffs, one: Path, two: Path) -> dict[str, Any]:
    """The decoupling runs' final parameters: DDP rank 0 against rank 1 (must be equal)
    and the 1-process run against rank 0 (``params`` group)."""
    paths = [one / "params_rank0.pt", two / "params_rank0.pt", two / "params_rank1.pt"]
    if not all(p.exists() for p in paths):
        diffs.missing.append(f"parameter files missing: {[str(p) for p in paths]}")
        return {"ranks_equal": False}
    single, rank0, rank1 = (torch.load(p, weights_only=True) for p in paths)
    ranks_equal = rank0.keys() == rank1.keys() and all(
        torch.equal(rank0[k], rank1[k]) for k in rank0
    )
    if not ranks_equal:
        worst = max(float((rank0[k] - rank1[k]).abs().max()) for k in rank0)
        diffs.missing.append(f"DDP ranks' parameters differ (max abs {worst:.3g})")
    diff = sum(float((single[k].double() - rank0[k].double()).pow(2).sum()) for k in single)
    norm = sum(float(single[k].double().pow(2).sum()) for k in single)
    diffs.add("params", math.sqrt(diff), 0.0, "‖θ_1 − θ_ddp‖", scale=math.sqrt(norm))
    worst = max(single, key=lambda k: float((single[k] - rank0[k]).abs().max()))
    return {
        "ranks_equal": ranks_equal,
        "params_max_abs": [worst, float((single[worst] - rank0[worst]).abs().max())],
    }


def _last(metrics: dict[int, dict[str, float]], key: str) -> float | None:
    values = [row[key] for _, row in sorted(metrics.items()) if key in row]
    return values[-1] if values else None


def verdict(diffs: Diffs, experiment: str = "full") -> list[str]:
    """The tolerances exceeded (empty: the runs agree)."""
    if experiment == "decoupling":
        limits = [
            ("sigma", "rel", TOLERANCES["sigma_rel"]),
            ("decouple", "abs", TOLERANCES["decouple_abs"]),
            ("params", "rel", TOLERANCES["params_rel"]),
        ]
    else:
        limits = [
            ("sigma", "rel", TOLERANCES["sigma_rel"]),
            ("grad_frac", "abs", TOLERANCES["grad_frac_abs"]),
            ("ablation_loss", "abs", TOLERANCES["ablation_loss_abs"]),
            ("ablation_displacement", "rel", TOLERANCES["ablation_displacement_rel"]),
            ("ablation_acc", "abs", TOLERANCES["ablation_acc_abs"]),
            ("gapflow_k", "abs", 0.0),
            ("gapflow", "rel", TOLERANCES["gapflow_rel"]),
            ("perturb", "rel", TOLERANCES["perturb_rel"]),
            ("class", "abs", TOLERANCES["class_abs"]),
            ("class_rotation_deg", "abs", TOLERANCES["class_rotation_deg_abs"]),
        ]
    failures = []
    for group, kind, limit in limits:
        if diffs.count.get(group, 0) == 0:
            failures.append(f"{group}: nothing compared")
            continue
        value = (diffs.rel if kind == "rel" else diffs.abs)[group]
        if not value <= limit:
            failures.append(f"{group}: max {kind} difference {value:.3g} > {limit:g}")
    failures += diffs.missing
    return failures


# --------------------------------------------------------------------------- driver


def drive(steps: int, keep: Path | None, experiment: str = "full") -> int:
    root = keep if keep is not None else Path(tempfile.mkdtemp(prefix="ddp_eq_"))
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    dirs = {}
    try:
        for world in (1, 2):
            out = root / f"world{world}"
            if out.exists():
                shutil.rmtree(out)
            cmd = [sys.executable, __file__, "--role", "run", "--world", str(world)]
            cmd += ["--steps", str(steps), "--out", str(out), "--experiment", experiment]
            print(f"ddp_equivalence: {' '.join(cmd)}", flush=True)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            # grokedge's own messages reach stderr through Lightning's rank_zero_info.
            said = [x for x in proc.stderr.splitlines() if x.startswith("grokedge:")]
            tail = [*said, *proc.stdout.splitlines()[-8:]]
            sys.stdout.write("".join(f"  [{world}] {line}\n" for line in tail))
            if proc.returncode != 0:
                sys.stdout.write(proc.stderr[-4000:])
                print(f"RESULT {json.dumps({'ok': False, 'error': f'world {world} failed'})}")
                return 2
            dirs[world] = out
        diffs, info = compare(dirs[1], dirs[2], experiment)
        failures = verdict(diffs, experiment)
        print(f"{'group':<24}{'n':>6}{'max abs':>12}{'max rel':>12}")
        for group in sorted(diffs.count):
            print(
                f"{group:<24}{diffs.count[group]:>6}{diffs.abs[group]:>12.3g}"
                f"{diffs.rel[group]:>12.3g}"
            )
        print(f"predicted buffer bytes (1 process, per DDP rank): {info['predicted_bytes']}")
        for failure in failures:
            print(f"FAIL {failure}")
        result = {
            "ok": not failures,
            "experiment": experiment,
            "steps": steps,
            "counts": diffs.count,
            "max_abs": diffs.abs,
            "max_rel": diffs.rel,
            "tolerances": TOLERANCES,
            "failures": failures,
            **info,
        }
        print(f"RESULT {json.dumps(result)}")
        return 0 if not failures else 1
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=("driver", "run"), default="driver")
    parser.add_argument("--world", type=int, default=1, help="processes (--role run)")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps of each run")
    parser.add_argument("--out", type=Path, help="run directory (--role run)")
    parser.add_argument("--keep", type=Path, help="keep both runs under this directory")
    parser.add_argument(
        "--experiment", choices=EXPERIMENTS, default="full", help="what both runs train"
    )
    args = parser.parse_args(argv)
    if args.role == "run":
        if args.out is None:
            parser.error("--role run needs --out")
        run(args.out, args.steps, args.world, args.experiment)
        return 0
    return drive(args.steps, args.keep, args.experiment)


if __name__ == "__main__":
    raise SystemExit(main())
