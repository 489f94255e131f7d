"""The causal-analysis callbacks on real short Dyck runs (ablation, perturbation, probes,
weight-decay removal, edge decoupling, init from a checkpoint).

Real runs shared by the module, all on a 1,000-sequence Dyck test set with tiny analysis
subsets (fast on a small CPU): ``full`` (callbacks=full, 60 steps, "groks" at the first
evaluation by a threshold of 0.01), ``full_dropout`` and ``gram_dropout`` (the same with
dropout, and with callbacks=gram: the analyses must not change a bit of training),
``part`` (35 steps) and ``resumed`` (35 -> 60), ``wd``
(weight decay removed at step 30) and ``decoupled`` (v_1 removed from the gradient part
from step 25 on), each with independent observers.
"""

from __future__ import annotations

import copy
import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

from grokedge.analysis.subsets import fixed_subset
from grokedge.analysis_log import read_analyses
from grokedge.callbacks import (
    AblationCallback,
    EdgeDecouplingCallback,
    InitFromCheckpoint,
    PerturbationCallback,
    ProbeCallback,
    WDRemovalCallback,
    find_gram_callback,
)
from grokedge.checks import ConfigError
from grokedge.edge.selection import ParameterSelector
from grokedge.experiments.perturbation import BucketedEvaluate, flat_evaluator
from grokedge.functional import analysed_module
from grokedge.models import CausalTransformer
from grokedge.module import GrokModule
from grokedge.run_files import metrics_by_step
from grokedge.tasks.dyck import DyckDataModule
from grokedge.train import Run, build, compose, fit

INTERVAL = 10
STEPS = 60
CUT = 35
COMMON = [
    "task=dyck",
    "logger=none",
    "torch_threads=1",
    "progress_bar.refresh_rate=0",
    "task.datamodule.ood_sequences=0",
    "task.datamodule.n_sequences=1050",  # 1,000 test sequences: cheap evaluations
    f"task.gram_interval={INTERVAL}",
    "task.eval_every=20",
    f"checkpoint.every_n_train_steps={CUT}",
]
SMALL = [  # the analyses' subsets and controls, shrunk
    "callbacks.ablation.n_sequences=40",
    "callbacks.ablation.n_random=3",
    "callbacks.perturbation.n_sequences=40",
    "callbacks.perturbation.grid_points=5",
    "callbacks.probe.n_sequences=40",
    "callbacks.probe.folds=3",
    "callbacks.probe.mlp_max_iter=20",
    "callbacks.wd_removal.n_sequences=40",
    "callbacks.wd_removal.folds=3",
]
GROK_EARLY = "task.grok.threshold=0.01"  # "groks" at the first evaluation, step 20
CADENCES = [
    "callbacks.ablation.every=30",
    "callbacks.perturbation.every=30",
    "callbacks.probe.every=30",
    GROK_EARLY,
]
ANALYSES_OFF = [
    *(f"callbacks.{name}.every=null" for name in ("ablation", "perturbation", "probe")),
    *(f"callbacks.{name}.at_grok=false" for name in ("ablation", "perturbation", "probe")),
    "callbacks.probe.at_end=false",
]
DROPOUT = "model.dropout=0.1"
DECOUPLE_AT = 25
WD_AT = 30


def built(run_dir: Path, overrides: list[str]) -> Run:
    return build(compose([*COMMON, *overrides], run_dir), run_dir)


def fit_quietly(run: Run) -> dict:
    with warnings.catch_warnings():
        # The MLP probe stops at 20 epochs, unconverged: the point is speed here.
        warnings.filterwarnings("ignore", message=r".*MLP probe fit\(s\) stopped.*")
        return fit(run)


def flat_selected(pl_module: L.LightningModule) -> torch.Tensor:
    sel = ParameterSelector.from_module(analysed_module(pl_module))
    return sel.flatten(analysed_module(pl_module)).clone()


class StepRecorder(L.Callback):
    """Per optimizer step: the gradient part a = θ_after − θ_before(1 − ηω) and its
    projection on the edge v_1 the step saw (independent of the decoupling callback)."""

    def __init__(self) -> None:
        self.records: list[tuple[int, float, float]] = []  # (step, a·v1, ‖a‖)
        self._theta = self._v1 = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        (group,) = optimizer.param_groups
        self._theta = flat_selected(pl_module)
        self._factor = 1.0 - group["lr"] * group["weight_decay"]
        self._step = trainer.global_step
        edge = find_gram_callback(trainer).edge
        self._v1 = None if edge is None else edge.vectors[0].clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._v1 is None:
            return
        grad = flat_selected(pl_module) - self._theta * self._factor
        proj = float(grad.double() @ self._v1.double())
        self.records.append((self._step, proj, float(grad.double().norm())))


@dataclass
class Runs:
    full: Run
    full_dropout: Run
    gram_dropout: Run
    resumed: Run
    wd: Run
    decoupled: Run
    recorder: StepRecorder
    root: Path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("causal_runs")
    full = built(root / "full", ["callbacks=full", *SMALL, *CADENCES, f"trainer.max_steps={STEPS}"])
    fit_quietly(full)
    # Dropout on: training then draws from the global random stream, so an analysis that
    # drew from it, or left the network in eval mode, would change the trained weights.
    full_dropout = built(
        root / "full_dropout",
        ["callbacks=full", *SMALL, *CADENCES, DROPOUT, f"trainer.max_steps={STEPS}"],
    )
    fit_quietly(full_dropout)
    gram_dropout = built(
        root / "gram_dropout",
        ["callbacks=gram", GROK_EARLY, DROPOUT, f"trainer.max_steps={STEPS}"],
    )
    fit_quietly(gram_dropout)
    part = built(root / "part", ["callbacks=full", *SMALL, *CADENCES, f"trainer.max_steps={CUT}"])
    fit_quietly(part)
    ckpt = root / "part" / "checkpoints" / "last.ckpt"
    resumed = built(
        root / "resumed",
        ["callbacks=full", *SMALL, *CADENCES, f"trainer.max_steps={STEPS}", f"resume={ckpt}"],
    )
    fit_quietly(resumed)
    wd = built(
        root / "wd",
        [
            "callbacks=full",
            *SMALL,
            *ANALYSES_OFF,
            f"callbacks.wd_removal.at_step={WD_AT}",
            "callbacks.wd_removal.every=10",
            f"trainer.max_steps={STEPS}",
        ],
    )
    fit_quietly(wd)
    decoupled = built(
        root / "decoupled",
        [
            "callbacks=gram",
            "+callbacks@callbacks.decoupling=decoupling",
            f"callbacks.decoupling.at_step={DECOUPLE_AT}",
            "callbacks.decoupling.every=10",
            "callbacks.decoupling.n_sequences=40",
            "callbacks.decoupling.folds=3",
            "trainer.max_steps=45",
        ],
    )
    recorder = StepRecorder()
    decoupled.trainer.callbacks[:0] = [recorder]
    fit_quietly(decoupled)
    return Runs(full, full_dropout, gram_dropout, resumed, wd, decoupled, recorder, root)


def _callback(run: Run, kind: type):
    (found,) = [c for c in run.trainer.callbacks if isinstance(c, kind)]
    return found


# ------------------------------------------------------------------------------ tests


def test_full_run_writes_every_analysis(runs: Runs) -> None:
    rows = read_analyses(runs.root / "full")
    by_kind: dict[str, list[dict]] = {}
    for row in rows:
        by_kind.setdefault(row["analysis"], []).append(row)
    for kind in ("ablation", "perturbation", "probe"):
        got = [(r["step"], r["trigger"]) for r in by_kind[kind]]
        # Grok detected at the evaluation of step 20: one call there, then every 30 steps.
        assert got == [(20, "grok"), (30, "cadence"), (60, "cadence")], (kind, got)
        assert all(r["grok_step"] == 20 and r["seconds"] > 0 for r in by_kind[kind])
    assert "wd_removal" not in by_kind  # its trigger is off in callbacks=full
    assert {r["analysis"] for r in read_analyses(runs.root / "wd")} >= {"wd_removal"}

    metrics = metrics_by_step(runs.root / "full")
    last = metrics[STEPS]
    names = [
        "ablation/edge_dacc",
        "ablation/edge_dloss",
        "ablation/v1_dacc",
        "ablation/bulk_dacc",
        "ablation/random_dacc_mean",
        "ablation/random_dacc_sd",
        "ablation/ratio",
        "ablation/matched_dacc_mean",
        "ablation/matched_ratio",
        "ablation/shrink_dacc",
        "ablation/shrink_dloss",
        "ablation/shrink_ratio",
        "ablation/shrink_factor",
        "ablation/theta_sq_removed_frac",
        "ablation/shrink_theta_sq_removed_frac",
        "ablation/shrink_norm_dacc",
        "ablation/shrink_norm_dloss",
        "ablation/shrink_norm_ratio",
        *(f"perturb/max_kl_v{k}" for k in (1, 2, 3, 4)),
        *(f"perturb/max_dloss_v{k}" for k in (1, 2, 3, 4)),
        *(f"curvature/fd_v{k}" for k in (1, 2, 3, 4)),
        *(f"curvature/hvp_v{k}" for k in (1, 2, 3, 4)),
        *(f"probe/{kind}_r2" for kind in ("linear", "quadratic", "mlp")),
        *(f"probe/{kind}_r2_sd" for kind in ("linear", "quadratic", "mlp")),
    ]
    # A ratio against a control below resolution is not logged (issue 22, item 8): present
    # exactly when the last ablation row says the control is resolved.
    row = by_kind["ablation"][-1]
    quantum = row["acc_random"]["resolution"]  # 1 / the subset's labelled positions
    assert 0 < quantum <= 1
    resolved = {
        "ablation/ratio": row["acc_random"]["ratio_resolved"],
        "ablation/matched_ratio": row["acc_matched"]["ratio_resolved"],
        "ablation/shrink_ratio": abs(row["shrink"]["dacc"]) >= quantum,
        "ablation/shrink_norm_ratio": abs(row["shrink_norm"]["dacc"]) >= quantum,
    }
    for name, ok in resolved.items():
        assert (name in last) == ok, name
    for name in names:
        if resolved.get(name) is False:
            continue  # checked above: absent, as the row says
        assert name in last and math.isfinite(last[name]), name
    assert "ablation/edge_dacc" in metrics[20] and "ablation/edge_dacc" in metrics[30]
    # The two curvature estimates agree (central difference error O(ε²)).
    for k in (1, 2):
        fd, exact = last[f"curvature/fd_v{k}"], last[f"curvature/hvp_v{k}"]
        assert fd == pytest.approx(exact, rel=0.05, abs=1e-3), k
    # Edge removal moves θ by ‖θ·v1, θ·v2‖; the norm-matched control by exactly as much.
    (abl,) = [r for r in read_analyses(runs.root / "full", ["ablation"]) if r["step"] == STEPS]
    assert abl["displacement"] > 0 and len(abl["matched_dacc"]) == 3
    assert abl["n_sequences"] == 40.0 and abl["n_rows"] <= 40
    # The shrink moves θ as far, straight toward 0: ‖θ‖² loses 1 − c² of itself, the edge
    # removal d²/‖θ‖² (both measured on the float32 vectors).
    edge, shrink = abl["edge"], abl["shrink"]
    assert edge["displacement"] == abl["displacement"] and shrink["clamped"] is False
    assert shrink["displacement"] == pytest.approx(abl["displacement"], rel=1e-5)
    assert shrink["factor"] == pytest.approx(1 - abl["displacement"] / abl["theta_norm"])
    r_sq = (abl["displacement"] / abl["theta_norm"]) ** 2
    assert edge["theta_sq_removed_frac"] == pytest.approx(r_sq, rel=1e-3, abs=1e-5)
    assert shrink["theta_sq_removed_frac"] == pytest.approx(1 - shrink["factor"] ** 2, abs=1e-5)
    assert {"dacc", "dloss"} <= shrink.keys() and math.isfinite(shrink["dacc"])
    # The norm-equal shrink leaves θ the edge removal's norm, c = sqrt(1 − r²): the same
    # share r² of ‖θ‖², by a displacement (1 − c)‖θ‖.
    norm_eq = abl["shrink_norm"]
    assert norm_eq.keys() == shrink.keys() and norm_eq["clamped"] is False
    assert norm_eq["factor"] == pytest.approx(math.sqrt(1 - r_sq), rel=1e-4)
    assert norm_eq["theta_sq_removed_frac"] == pytest.approx(
        edge["theta_sq_removed_frac"], rel=1e-3, abs=1e-5
    )
    assert norm_eq["displacement"] == pytest.approx(
        (1 - norm_eq["factor"]) * abl["theta_norm"], rel=1e-3, abs=1e-6
    )
    assert math.isfinite(norm_eq["dacc"]) and math.isfinite(norm_eq["dloss"])
    (pert,) = [r for r in read_analyses(runs.root / "full", ["perturbation"]) if r["step"] == 60]
    assert len(pert["sweep"]) == 4 * 5 and len(pert["path_points"]) == 4
    zero = [r for r in pert["sweep"] if r["epsilon"] == 0.0]
    assert all(abs(r["kl"]) < 1e-12 and r["delta_loss"] == 0.0 for r in zero)


def test_analyses_leave_training_bit_identical(runs: Runs) -> None:
    a = runs.full_dropout.module.net.state_dict()
    b = runs.gram_dropout.module.net.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    opt_a = runs.full_dropout.trainer.optimizers[0].state_dict()
    opt_b = runs.gram_dropout.trainer.optimizers[0].state_dict()
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for idx, state in opt_a["state"].items():
        for key, value in state.items():
            assert torch.equal(value, opt_b["state"][idx][key]), (idx, key)
    # And the analyses did run, with dropout active in training.
    for kind in (AblationCallback, PerturbationCallback, ProbeCallback):
        assert _callback(runs.full_dropout, kind).calls == 3
    assert runs.full_dropout.module.net.training


def test_analyses_in_a_worker_process_give_the_same_numbers(tmp_path: Path) -> None:
    """background=true against false for the ablation, the perturbation and the probes:
    the same rows (bar their timings) and the same logged scalars at the same steps; the
    worker did the work. The ablation's and perturbation's evaluations run on a copy of
    the module, bit for bit; the probes' fits "the same" to 1e-12 relative: the worker
    fits copies of the arrays, and BLAS's summation order can follow their memory
    alignment (seen: ~1e-14)."""
    kinds = ("ablation", "perturbation", "probe")
    rows, metrics = {}, {}
    for background in (True, False):
        run_dir = tmp_path / str(background)
        overrides = [f"callbacks.{kind}.background={background}" for kind in kinds]
        run = built(
            run_dir, ["callbacks=full", *SMALL, *CADENCES, "trainer.max_steps=50", *overrides]
        )
        fit_quietly(run)
        for kind in (AblationCallback, PerturbationCallback, ProbeCallback):
            assert _callback(run, kind).in_background is background
        rows[background] = read_analyses(run_dir, list(kinds))
        metrics[background] = {
            step: {k: v for k, v in values.items() if k.startswith(ANALYSIS_PREFIXES)}
            for step, values in metrics_by_step(run_dir).items()
        }
    worker_rows = sorted(rows[True], key=lambda r: (r["step"], r["analysis"]))
    inline_rows = sorted(rows[False], key=lambda r: (r["step"], r["analysis"]))
    assert [(r["analysis"], r["step"]) for r in inline_rows] == [
        (r["analysis"], r["step"]) for r in worker_rows
    ]
    assert {r["step"] for r in inline_rows} == {20, 30, 50}  # grok, cadence; the probe at end
    for worker, inline in zip(worker_rows, inline_rows, strict=True):
        assert worker.pop("worker_seconds") > 0 and "worker_seconds" not in inline
        worker.pop("seconds"), inline.pop("seconds")
        if worker["analysis"] == "probe":
            assert _close(worker, inline, rel=1e-12, abs_=1e-15), (worker, inline)
        else:
            assert worker == inline
    assert _close(metrics[True], metrics[False], rel=1e-12, abs_=1e-15)
    assert sum(len(v) for v in metrics[True].values()) > 0


ANALYSIS_PREFIXES = ("ablation/", "perturb/", "curvature/", "probe/")


def _close(a, b, rel: float = 1e-6, abs_: float = 1e-9) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=rel, abs=abs_)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rel, abs_) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, rel, abs_) for x, y in zip(a, b, strict=True))
    return a == b


def test_resumed_run_continues_the_cadences(runs: Runs) -> None:
    kinds = ["ablation", "perturbation", "probe"]
    full = [r for r in read_analyses(runs.root / "full", kinds) if r["step"] > CUT]
    resumed = [r for r in read_analyses(runs.root / "resumed", kinds) if r["step"] > CUT]
    assert [(r["analysis"], r["step"]) for r in resumed] == [
        (r["analysis"], r["step"]) for r in full
    ]
    assert [r["step"] for r in resumed] == [60, 60, 60]
    for a, b in zip(full, resumed, strict=True):
        a, b = dict(a), dict(b)
        for timing in ("seconds", "worker_seconds"):
            a.pop(timing, None), b.pop(timing, None)
        assert _close(a, b), (a["analysis"], a, b)
    prefixes = ("ablation/", "perturb/", "curvature/", "probe/")
    m_full, m_res = metrics_by_step(runs.root / "full"), metrics_by_step(runs.root / "resumed")
    for step in (s for s in m_full if s > CUT):
        want = {k: v for k, v in m_full[step].items() if k.startswith(prefixes)}
        got = {k: v for k, v in m_res.get(step, {}).items() if k.startswith(prefixes)}
        assert want.keys() == got.keys(), step
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-9), (step, k)
    for kind in (AblationCallback, PerturbationCallback, ProbeCallback):
        a, b = _callback(runs.full, kind), _callback(runs.resumed, kind)
        assert (
            (a.calls, a.last_step, a.grok_done)
            == (b.calls, b.last_step, b.grok_done)
            == (
                3,
                STEPS,
                True,
            )
        )


def test_state_dicts_round_trip_weights_only(runs: Runs) -> None:
    callbacks = [
        _callback(runs.full, AblationCallback),
        _callback(runs.full, PerturbationCallback),
        _callback(runs.full, ProbeCallback),
        _callback(runs.wd, WDRemovalCallback),
        _callback(runs.decoupled, EdgeDecouplingCallback),
    ]
    keys = set()
    for cb in callbacks:
        keys.add(cb.state_key)
        buf = io.BytesIO()
        torch.save(cb.state_dict(), buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=True)
        fresh = type(cb)()
        fresh.load_state_dict(loaded)
        again = fresh.state_dict()
        assert again.keys() == cb.state_dict().keys(), type(cb)
        for key, value in cb.state_dict().items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(again[key].cpu(), value.cpu()), (type(cb), key)
            else:
                assert again[key] == value, (type(cb), key)
    assert len(keys) == len(callbacks)  # unique state keys
    assert _callback(runs.wd, WDRemovalCallback).state_dict()["fired_step"] == WD_AT


def test_wd_removal_sets_the_groups_and_the_split_follows(runs: Runs) -> None:
    (optimizer,) = runs.wd.trainer.optimizers
    assert all(g["weight_decay"] == 0.0 for g in optimizer.param_groups)
    gram = find_gram_callback(runs.wd.trainer)
    window = gram.window
    assert window.count == 5  # deltas closing at steps 20, 30, 40, 50, 60
    wd = window.wd_deltas()
    norms = wd.double().norm(dim=1).tolist()
    assert all(n > 0 for n in norms[:2]), norms  # before the removal: ω = 1
    assert all(n == 0.0 for n in norms[2:]), norms  # after it: exactly zero
    assert window.deltas()[2:].double().norm(dim=1).min() > 0  # θ still moves
    assert gram.edge.wd_proj[2:].abs().max() == 0.0
    assert gram.edge.wd_proj[:2].abs().max() > 0

    metrics = metrics_by_step(runs.root / "wd")
    assert metrics[WD_AT]["wd/removed_step"] == WD_AT
    for step in (WD_AT, 40, 50, 60):
        for name in ("wd/theta_norm", "wd/theta_norm_selected", "wd/attn_entropy", "wd/linear_r2"):
            assert math.isfinite(metrics[step][name]), (step, name)
    assert metrics[40]["wd/weight_decay"] == 0.0 and metrics[WD_AT]["wd/weight_decay"] == 0.0
    assert "wd/test_acc" in metrics[40]
    assert 0 < metrics[60]["wd/attn_entropy"] < math.log(24)
    rows = read_analyses(runs.root / "wd", ["wd_removal"])
    assert [(r["step"], r["trigger"]) for r in rows] == [
        (WD_AT, "trigger"),
        (40, "cadence"),
        (50, "cadence"),
        (60, "cadence"),
    ]


def test_decoupling_removes_v1_from_the_gradient_part(runs: Runs) -> None:
    records = runs.recorder.records
    before = [abs(p) / n for s, p, n in records if s < DECOUPLE_AT]
    after = [abs(p) / n for s, p, n in records if s >= DECOUPLE_AT]
    assert len(before) == DECOUPLE_AT - 2 * INTERVAL and len(after) == 45 - DECOUPLE_AT
    assert max(before) > 1e-3, before  # the gradient part does have a v_1 component...
    assert max(after) < 1e-5, after  # ...until the decoupling removes it, every step
    metrics = metrics_by_step(runs.root / "decoupled")
    assert metrics[DECOUPLE_AT]["decouple/start_step"] == DECOUPLE_AT
    m = metrics[35]
    assert m["decouple/steps"] == 10
    assert m["decouple/removed_frac"] == pytest.approx(m["decouple/v1_grad_frac"], rel=1e-9)
    assert 0 < m["decouple/v1_grad_frac"] < 1
    for name in ("decouple/theta_norm", "decouple/attn_entropy", "decouple/linear_r2"):
        assert math.isfinite(m[name])
    # ω itself is untouched.
    assert runs.decoupled.trainer.optimizers[0].param_groups[0]["weight_decay"] == 1.0


# --------------------------------------------------------------- unit-level checks


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(5, 3)


@pytest.mark.parametrize("mode", ["remove", "enforce", "flip"])
def test_decoupling_modes_change_only_the_v1_component(mode: str) -> None:
    model = TwoLayer()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.5)
    selector = ParameterSelector.from_module(model, ["*.weight"])
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(selector.p, generator=gen)
    edge = SimpleNamespace(vectors=(v / v.norm())[None], sigma=torch.tensor([1.0]))
    cb = EdgeDecouplingCallback(mode=mode, at_step=0)
    cb.selector, cb.gram, cb.fired_step = selector, SimpleNamespace(edge=edge), 0
    cb.attach(model, opt)
    v1 = edge.vectors[0].double()
    seen_opposed = seen_aligned = False
    for _ in range(12):
        x = torch.randn(8, 6, generator=gen)
        twin = copy.deepcopy(model)
        twin_opt = torch.optim.AdamW(twin.parameters(), lr=0.05, weight_decay=0.5)
        # (load_state_dict shares the tensors it is given: a copy keeps opt's own intact)
        twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        theta = selector.flatten(model).double()
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad()
            m.b(torch.tanh(m.a(x))).pow(2).sum().backward()
            o.step()
        factor = 1 - 0.05 * 0.5
        raw = selector.flatten(twin).double() - theta * factor
        got = selector.flatten(model).double() - theta * factor
        c, w = float(raw @ v1), float(-0.05 * 0.5 * theta @ v1)
        opposed = c * w < 0
        seen_opposed |= opposed
        seen_aligned |= not opposed
        if mode == "remove" or (mode == "enforce" and opposed):
            want = raw - c * v1
        elif mode == "flip" and opposed:
            want = raw - 2 * c * v1
        else:
            want = raw
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        # Unselected parameters (biases) follow plain AdamW.
        torch.testing.assert_close(model.a.bias, twin.a.bias, rtol=0, atol=0)
    assert seen_opposed and seen_aligned  # both branches were exercised
    cb.teardown(None, None, "fit")


def test_fixed_subset_draws_sequences_and_pads_exactly() -> None:
    dm = DyckDataModule(ood_sequences=0, n_sequences=1050)
    dm.setup()
    batches = list(dm.val_dataloader()[0])
    total_rows = sum(b["labels"].shape[0] for b in batches)
    sub = fixed_subset(batches, 100, seed=0)
    assert float(sub["weight"].sum()) == 100.0  # 100 sequences, deduplicated
    assert sub["labels"].shape[0] < 100 and sub["tokens"].shape == sub["labels"].shape
    again = fixed_subset(batches, 100, seed=0)
    assert all(torch.equal(sub[k], again[k]) for k in sub)
    other = fixed_subset(batches, 100, seed=1)
    assert (
        not torch.equal(sub["weight"], other["weight"])
        or sub["tokens"].shape != other["tokens"].shape
        or not torch.equal(sub["tokens"], other["tokens"])
    )
    rows = fixed_subset(batches, 50, seed=0, unit="rows")
    assert rows["labels"].shape[0] == 50 and float(rows["weight"].sum()) > 50
    whole = fixed_subset(batches, None, seed=0)
    assert whole["labels"].shape[0] == total_rows and float(whole["weight"].sum()) == 1000.0
    # Merged and right-padded rows give the logits of their original batches.
    net = CausalTransformer(vocab_size=3, num_classes=13, max_len=24)
    module = GrokModule(net, lambda params: torch.optim.AdamW(params))
    params = dict(net.named_parameters())
    with torch.no_grad():
        merged = module.evaluate(params, whole)
        loss_sum = weight_sum = 0.0
        for b in batches:
            r = module.evaluate(params, b)
            w = float((b["weight"][:, None] * (b["labels"] != -100)).sum())
            loss_sum += float(r.loss) * w
            weight_sum += w
    assert float(merged.loss) == pytest.approx(loss_sum / weight_sum, rel=1e-5)
    # Length buckets: the same loss, accuracy and (labelled) logits as the whole batch.
    lengths = (sub["labels"] != -100).sum(dim=1)
    assert bool((lengths[1:] >= lengths[:-1]).all())  # rows come sorted by length
    selector = ParameterSelector.from_module(net)
    theta = selector.flatten(net)
    plain = flat_evaluator(module.evaluate, selector, net)
    bucketed = BucketedEvaluate(module.evaluate, selector, net, sub, buckets=4)
    assert len(bucketed.parts) == 4 and bucketed.parts[0][2] < sub["labels"].shape[1]
    with torch.no_grad():
        (l1, a1, g1), (l2, a2, g2) = plain(theta, sub), bucketed(theta, sub)
    assert float(l2) == pytest.approx(float(l1), rel=1e-6)
    assert float(a2) == pytest.approx(float(a1), rel=1e-6)
    mask = sub["labels"] != -100
    torch.testing.assert_close(g2[mask], g1[mask], rtol=1e-5, atol=1e-5)


def test_init_from_checkpoint_loads_weights_only(runs: Runs, tmp_path: Path) -> None:
    ckpt = runs.root / "part" / "checkpoints" / "last.ckpt"
    run = built(
        tmp_path / "fork",
        ["experiment=wd_intervention", f"init_from={ckpt}", "trainer.max_steps=2", *SMALL],
    )
    (init,) = [c for c in run.trainer.callbacks if isinstance(c, InitFromCheckpoint)]
    names = [type(c).__name__ for c in run.trainer.callbacks]
    assert "WDRemovalCallback" in names and "AblationCallback" in names
    assert _callback(run, WDRemovalCallback).at_step == 0
    fresh = {k: v.clone() for k, v in run.module.state_dict().items()}
    init.setup(run.trainer, run.module, "fit")
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    for name, value in run.module.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert any(not torch.equal(fresh[k], saved[k]) for k in fresh)
    assert init.loaded_step == CUT
    # A checkpoint of another model fails before training, naming the key.
    with pytest.raises(ConfigError, match=r"init_from=.*does not fit the model"):
        built(
            tmp_path / "bad",
            ["experiment=wd_intervention", f"init_from={ckpt}", "model.d_model=64"],
        )


BAD = [
    (["callbacks.ablation.n_random=1"], ["callbacks.ablation.n_random=1", ">= 2"]),
    (["callbacks.ablation.every=0"], ["callbacks.ablation.every=0", "null or an integer >= 1"]),
    (["callbacks.ablation.sample=all"], ["callbacks.ablation.sample='all'", "sequences, rows"]),
    (["callbacks.perturbation.hvp_dtype=int8"], ["callbacks.perturbation.hvp_dtype='int8'"]),
    (["callbacks.perturbation.max_eps=0"], ["callbacks.perturbation.max_eps=0", "> 0"]),
    (["callbacks.probe.kinds=[linear,cubic]"], ["callbacks.probe.kinds=", "quadratic"]),
    (["callbacks.probe.block=2"], ["callbacks.probe.block=2", "[-2, 1]"]),
    (["callbacks.probe.protocol=loo"], ["callbacks.probe.protocol='loo'", "grouped_kfold"]),
    (["callbacks.probe.background=maybe"], ["callbacks.probe.background='maybe'", "true, false"]),
    (
        ["callbacks.wd_removal.at_step=5", "callbacks.wd_removal.after_grok=5"],
        ["callbacks.wd_removal.at_step=5", "at most one trigger"],
    ),
    (
        ["callbacks.wd_removal.weight_decay_after=-1"],
        ["callbacks.wd_removal.weight_decay_after=-1", ">= 0"],
    ),
    (
        ["+callbacks@callbacks.decoupling=decoupling", "callbacks.decoupling.mode=sideways"],
        ["callbacks.decoupling.mode='sideways'", "remove, enforce, flip"],
    ),
    (["experiment=wd_intervention"], ["init_from=None is not allowed", "checkpoint"]),
    (["experiment=wd_intervention", "init_from=/no/such.ckpt"], ["init_from='/no/such.ckpt'"]),
]


@pytest.mark.parametrize("overrides,needles", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_argument_errors_name_the_key(tmp_path: Path, overrides, needles) -> None:
    with pytest.raises(ConfigError) as info:
        built(tmp_path / "run", ["callbacks=full", *overrides])
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_perturbation_directions_beyond_top_k_fail_at_setup(tmp_path: Path) -> None:
    run = built(
        tmp_path / "run",
        ["callbacks=full", "callbacks.gram.top_k=2", "trainer.max_steps=1", *ANALYSES_OFF],
    )
    with pytest.raises(ValueError, match=r"callbacks\.perturbation\.n_directions=4"):
        fit_quietly(run)


def test_gram_callback_is_required(tmp_path: Path) -> None:
    run = built(tmp_path / "run", ["callbacks=none", "+callbacks@callbacks.ablation=ablation"])
    with pytest.raises(ValueError, match=r"callbacks\.ablation: this analysis needs a Gram"):
        fit_quietly(run)
