"""GramCallback and EdgeAlignmentCallback on real short Dyck runs, and their edge cases.

Three real runs are shared by the module (60 steps; 35 steps; resumed 35 -> 60): the
60-step run carries two independent observers (θ snapshots every interval, and the
exact per-step weight decay recorded from ``on_before_optimizer_step``).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from grokedge.analysis_log import read_analyses
from grokedge.callbacks import EdgeAlignmentCallback, GramCallback, find_gram_callback
from grokedge.checks import ConfigError
from grokedge.edge.readouts import measure
from grokedge.edge.selection import ParameterSelector
from grokedge.functional import analysed_module
from grokedge.run_files import read_metrics, read_summary
from grokedge.train import Run, build, compose, fit

INTERVAL = 10
STEPS = 60
CUT = 35
COMMON = [
    "task=dyck",
    "callbacks=gram",
    f"task.gram_interval={INTERVAL}",
    "task.eval_every=20",
    "task.datamodule.ood_sequences=0",
    f"checkpoint.every_n_train_steps={CUT}",
    "warmup_steps=30",  # η_t changes every step: the split must read it per step
    "torch_threads=1",  # the CI machine is small and shared
    "progress_bar.refresh_rate=0",
]


def built(run_dir: Path, overrides: list[str], logger: str = "none") -> Run:
    return build(compose([*COMMON, f"logger={logger}", *overrides], run_dir), run_dir)


# ---------------------------------------------------------------- independent observers


def flat_selected(pl_module: L.LightningModule) -> torch.Tensor:
    sel = ParameterSelector.from_module(analysed_module(pl_module))
    return sel.flatten(analysed_module(pl_module)).clone()


class Snapshots(L.Callback):
    """θ_sel at step 0 and every INTERVAL optimizer steps."""

    def __init__(self) -> None:
        self.thetas: dict[int, torch.Tensor] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        self.thetas[trainer.global_step] = flat_selected(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % INTERVAL == 0:
            self.thetas[trainer.global_step] = flat_selected(pl_module)


class SplitRecorder(L.Callback):
    """Per interval: Σ −η_t ω θ_t (θ before each step) and Σ (θ_{t+1} − θ_t − that)."""

    def __init__(self) -> None:
        self.wd: list[torch.Tensor] = []
        self.grad: list[torch.Tensor] = []
        self.grad_norms: list[float] = []
        self._wd = self._grad = self._theta = self._step_wd = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Inside Lightning's closure: after backward, before clipping and the update.
        (group,) = optimizer.param_groups
        self._theta = flat_selected(pl_module)
        self._step_wd = self._theta * (-group["lr"] * group["weight_decay"])
        net = analysed_module(pl_module)
        grads = [p.grad.reshape(-1) for p in net.parameters() if p.grad is not None]
        self.grad_norms.append(float(torch.cat(grads).norm()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step_grad = flat_selected(pl_module) - self._theta - self._step_wd
        if self._wd is None:
            self._wd, self._grad = torch.zeros_like(step_grad), torch.zeros_like(step_grad)
        self._wd += self._step_wd
        self._grad += step_grad
        if trainer.global_step % INTERVAL == 0:
            self.wd.append(self._wd.clone())
            self.grad.append(self._grad.clone())
            self._wd.zero_()
            self._grad.zero_()


@dataclass
class Runs:
    full: Path
    resumed: Path
    gram: GramCallback
    edge: EdgeAlignmentCallback
    snapshots: Snapshots
    split: SplitRecorder
    run: Run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("gram_runs")
    full = built(root / "full", [f"trainer.max_steps={STEPS}"])
    snapshots, split = Snapshots(), SplitRecorder()
    full.trainer.callbacks[:0] = [snapshots, split]  # before the checkpoint callback
    fit(full)
    part = built(root / "part", [f"trainer.max_steps={CUT}"])
    fit(part)
    ckpt = root / "part" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == CUT
    resumed = built(root / "resumed", [f"trainer.max_steps={STEPS}", f"resume={ckpt}"])
    fit(resumed)
    gram = find_gram_callback(full.trainer)
    (edge,) = [c for c in full.trainer.callbacks if isinstance(c, EdgeAlignmentCallback)]
    return Runs(root / "full", root / "resumed", gram, edge, snapshots, split, full)


# ------------------------------------------------------------------------------ tests

EDGE_NAMES = [
    *(f"edge/{m}_v{k}" for k in (1, 2, 3, 4) for m in ("grad_frac", "wd_frac", "align")),
    *(f"edge/grad_frac_latest_v{k}" for k in (1, 2, 3, 4)),
    "edge/rotation_deg",
    *(f"edge/rotation_v{k}_deg" for k in (1, 2, 3)),
    "edge/stability_v1",
    "edge/stability_v2",
    "edge/principal_angle_1_deg",
    "edge/principal_angle_2_deg",
    "edge/dk_bound",
]
GRAM_NAMES = [
    *(f"gram/sigma_{j}" for j in range(1, 6)),
    "gram/g23",
    "gram/kstar",
    "gram/kstar_weighted",
    "gram/ratio",
    "gram/skipped_deltas",
]


def test_run_logs_spectrum_matching_an_independent_svd(runs: Runs) -> None:
    rows = read_metrics(runs.full)
    logged = {}
    for row in rows:
        logged.setdefault(row["step"], {}).update(row)
    last = logged[STEPS]
    for name in [*GRAM_NAMES, *EDGE_NAMES]:
        assert name in last, name

    thetas = runs.snapshots.thetas
    steps = sorted(thetas)
    assert steps == list(range(0, STEPS + 1, INTERVAL))
    deltas = {b: thetas[b] - thetas[a] for a, b in zip(steps, steps[1:], strict=False)}
    # The analysed edge is the default, normalized one: σ of the unit-norm deltas; the
    # paper's σ (raw deltas) is in every window's analyses row.
    paper_sigma = {
        r["step"]: r["definitions"]["paper"]["sigma"]
        for r in read_analyses(runs.full)
        if r["analysis"] == "edge_directions"
    }
    checked = 0
    for step in steps[2:]:  # a window needs two deltas
        window = torch.stack([deltas[s] for s in steps[1:] if s <= step][-5:]).double()
        unit = window / window.norm(dim=1, keepdim=True)
        for j, s in enumerate(torch.linalg.svdvals(unit).tolist()):
            got = logged[step][f"gram/sigma_{j + 1}"]
            assert got == pytest.approx(s, rel=1e-5), (step, j)
            checked += 1
        for j, s in enumerate(torch.linalg.svdvals(window).tolist()):
            assert paper_sigma[step][j] == pytest.approx(s, rel=1e-5), (step, j)
    assert checked == 2 + 3 + 4 + 5 + 5

    analyses = read_analyses(runs.full)
    names = {r["analysis"] for r in analyses}
    assert names == {"gram_spectrum", "edge_directions", "edge_summary", "derived_window"}
    spectra = [r for r in analyses if r["analysis"] == "gram_spectrum"]
    assert [r["step"] for r in spectra] == list(range(2 * INTERVAL, STEPS + 1, INTERVAL))
    assert all(r["phase"] == "pre" and r["grok_step"] is None for r in analyses)
    assert len(spectra[-1]["sigma"]) == 5
    (summary,) = [r for r in analyses if r["analysis"] == "edge_summary"]
    assert summary["step"] == STEPS and summary["windows"] == len(spectra)
    # The Davis–Kahan bound is a theorem for the logged rotation of v_1.
    for step, row in logged.items():
        if "edge/dk_bound_deg" in row and "edge/rotation_deg" in row:
            assert row["edge/rotation_deg"] <= row["edge/dk_bound_deg"] + 1e-6, step


def test_every_interval_from_one_run_in_the_summary_rows_and_scalars(runs: Runs) -> None:
    """callbacks=gram records N0 = 10 and the derived 2N0, 3N0 (default [1, 2, 3]): the
    derived_window rows are the SVDs of the snapshot deltas over 20 and 30 steps, the
    edge_summary row holds every interval, summary.json their event scalars."""
    analyses = read_analyses(runs.full)
    thetas = runs.snapshots.thetas
    derived = [r for r in analyses if r["analysis"] == "derived_window"]
    assert [(r["step"], r["interval"]) for r in derived] == [(40, 20), (60, 20), (60, 30)]
    for row in derived:
        n, step = row["interval"], row["step"]
        ends = list(range(n, step + 1, n))[-5:]
        x = torch.stack([thetas[e] - thetas[e - n] for e in ends]).double()
        sigma = torch.linalg.svdvals(x).tolist()
        assert row["definitions"]["paper"]["sigma"] == pytest.approx(sigma, rel=1e-5)
        unit = torch.linalg.svdvals(x / x.norm(dim=1, keepdim=True)).tolist()
        assert row["definitions"]["normalized"]["sigma"] == pytest.approx(unit, rel=1e-5)
        # burn_in (from one interval N): the deltas that begin at or after N.
        kept = [i for i, e in enumerate(ends) if e - n >= n]
        if len(kept) < 2:
            assert row["definitions"]["burn_in"] is None
        else:
            burn = torch.linalg.svdvals(x[kept]).tolist()
            assert row["definitions"]["burn_in"]["sigma"] == pytest.approx(burn, rel=1e-5)

    (summary,) = [r for r in analyses if r["analysis"] == "edge_summary"]
    assert summary["interval_multiples"] == [1, 2, 3]
    assert summary["first_windows"] == {"paper": 20, "burn_in": 30, "normalized": 20}
    intervals = summary["intervals"]
    assert list(intervals) == [str(INTERVAL), str(2 * INTERVAL), str(3 * INTERVAL)]
    fields = {"interval", "start_step", "definitions", "first_windows", "dominant_changes"}
    for n, entry in intervals.items():
        assert set(entry) == fields | {"events"}
        assert entry["interval"] == int(n) and entry["start_step"] == int(n)
        assert set(entry["definitions"]) == {"paper", "burn_in", "normalized"}
    base = intervals[str(INTERVAL)]
    for key in ("definitions", "first_windows", "dominant_changes", "events"):
        assert base[key] == summary[key], key
    # Derived windows, by hand: N = 20 holds (0,20), (20,40) at 40, + (40,60) at 60;
    # N = 30 holds (0,30), (30,60) at 60; burn_in keeps deltas beginning at or after N.
    assert intervals["20"]["first_windows"] == {"paper": 40, "burn_in": 60, "normalized": 40}
    assert intervals["30"]["first_windows"] == {"paper": 60, "burn_in": None, "normalized": 60}
    run_summary = read_summary(runs.full)
    last = {n: [r for r in derived if r["interval"] == n][-1] for n in (20, 30)}
    for n in (20, 30):
        entry = intervals[str(n)]
        for d, events in entry["definitions"].items():
            for event, step in events.items():
                key = f"edge/{event}_step_{d}_n{n}"
                assert run_summary.get(key) == (None if step is None else float(step)), key
            readout = last[n]["definitions"][d]
            got = run_summary.get(f"edge/grad_frac_v1_{d}_n{n}")
            assert got == (None if readout is None else pytest.approx(readout["grad_frac"][0]))
        fired = {(e["event"], e["definition"], e["step"]) for e in entry["events"]}
        want = {
            (event, d, step)
            for d, events in entry["definitions"].items()
            for event, step in events.items()
            if step is not None
        }
        assert fired == want
    # The N = 20 scalars are logged at its windows only (steps 40 and 60).
    logged = {}
    for row in read_metrics(runs.full):
        logged.setdefault(row["step"], set()).update(row)
    assert [s for s in sorted(logged) if "edge/grad_frac_v1_paper_n20" in logged[s]] == [40, 60]
    assert runs.edge.state_dict()["derived"].keys() == {"20", "30"}


def test_exact_split_matches_an_independent_per_step_record(runs: Runs) -> None:
    split, window = runs.split, runs.gram.window
    assert max(split.grad_norms) > 1.0, "clipping (max norm 1) never acted; the test is moot"
    n = window.count
    assert n == 5 and len(split.wd) == STEPS // INTERVAL
    wd_indep = torch.stack(split.wd[-n:])
    grad_indep = torch.stack(split.grad[-n:])
    wd = window.wd_deltas().clone()
    total = window.deltas().clone()
    torch.testing.assert_close(wd, wd_indep, rtol=1e-6, atol=1e-9)
    grad = total - wd
    err = (grad - grad_indep).norm(dim=1) / grad_indep.norm(dim=1)
    assert float(err.max()) < 1e-5
    # grad + wd = total: the independent parts add up to the snapshot deltas.
    thetas = runs.snapshots.thetas
    steps = sorted(thetas)[-n - 1 :]
    snap = torch.stack([thetas[b] - thetas[a] for a, b in zip(steps, steps[1:], strict=False)])
    assert float(((wd_indep + grad_indep - snap).norm(dim=1) / snap.norm(dim=1)).max()) < 1e-5
    torch.testing.assert_close(total, snap, rtol=0, atol=0)
    # The published projections are those of the independent parts on the edge vectors;
    # the default (normalized) edge scales both parts of delta i by 1/‖δ_i‖.
    edge = runs.gram.edge
    assert edge.definition == "normalized"
    v = edge.vectors.double()
    norms = snap.double().norm(dim=1, keepdim=True)
    for got, part in ((edge.wd_proj, wd_indep), (edge.grad_proj, grad_indep)):
        unit = part.double() / norms
        scale = float(unit.norm(dim=1).max())
        torch.testing.assert_close(got, unit @ v.T, rtol=1e-4, atol=1e-5 * scale)
    # Its vectors are unit-norm combinations of the unit deltas: v_k = Xᵀu_k / σ_k.
    unit_x = snap.double() / norms
    for k in range(2):
        u_k = torch.linalg.svd(unit_x, full_matrices=False)[0][:, k]
        want = unit_x.T @ u_k / torch.linalg.svdvals(unit_x)[k]
        cos = float((want @ v[k]).abs())
        assert cos == pytest.approx(1.0, abs=1e-5), k


def _edge_metrics(run_dir: Path, after: int) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for row in read_metrics(run_dir):
        if row["step"] > after:
            picked = {k: v for k, v in row.items() if k.startswith(("gram/", "edge/"))}
            if picked:
                out.setdefault(row["step"], {}).update(picked)
    return out


def _close(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-6, abs=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_resumed_run_logs_what_an_uninterrupted_run_logs(runs: Runs) -> None:
    full, resumed = _edge_metrics(runs.full, CUT), _edge_metrics(runs.resumed, CUT)
    assert sorted(resumed) == [40, 50, 60]
    assert full.keys() == resumed.keys()
    for step in full:
        assert full[step].keys() == resumed[step].keys(), step
        for name, value in full[step].items():
            assert resumed[step][name] == pytest.approx(value, rel=1e-6, abs=1e-12), (step, name)
    rows_full = [r for r in read_analyses(runs.full) if r["step"] > CUT]
    # (the resumed directory also holds the part run's rows up to the cut: issue 20)
    rows_resumed = [r for r in read_analyses(runs.resumed) if r["step"] > CUT]
    # 3 windows x 2 rows, the derived windows (N = 20 at steps 40 and 60, N = 30 at 60;
    # the N = 20 block open at the cut, step 35, resumes from the checkpoint) + the summary
    assert len(rows_full) == len(rows_resumed) == 10
    for a, b in zip(rows_full, rows_resumed, strict=True):
        assert _close(a, b), (a, b)


def test_phases_are_relabelled_when_the_grok_step_becomes_known(tmp_path: Path) -> None:
    """A threshold of 0.01 "groks" at the first evaluation (step 40), after three windows were
    written as provisional 'pre'; a real WandbLogger under WANDB_MODE=disabled is a no-op."""
    run = built(
        tmp_path / "grok",
        [
            "task.grok.threshold=0.01",
            "task.eval_every=40",
            f"trainer.max_steps={STEPS}",
            "callbacks.gram.phase_post=15",
        ],
        logger="wandb",
    )
    summary = fit(run)
    assert summary["grok_step"] == 40
    rows = read_analyses(tmp_path / "grok")
    phases = {r["step"]: r["phase"] for r in rows if r["analysis"] == "gram_spectrum"}
    # at = one interval (10): [30, 50]; post up to 40 + 15; late after.
    assert phases == {20: "pre", 30: "at", 40: "at", 50: "at", 60: "late"}
    assert all(r["grok_step"] == 40 for r in rows)
    (final,) = [r for r in rows if r["analysis"] == "edge_summary"]
    assert final["phase"] == "late" and final["windows"] == 5
    # g_23 compression: max over windows up to the grok step / value at the grok step.
    metrics = {}
    for row in read_metrics(tmp_path / "grok"):
        metrics.setdefault(row["step"], {}).update(row)
    g23 = {s: metrics[s]["gram/g23"] for s in (30, 40)}
    assert metrics[50]["gram/g23_compression"] == pytest.approx(max(g23.values()) / g23[40])
    assert final["g23_compression"] == pytest.approx(metrics[50]["gram/g23_compression"])
    assert not list((tmp_path / "grok").glob("wandb/*run-*"))


# ------------------------------------------------------------------ unit-level checks


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(5, 3)


def attached(window: int = 3, **kwargs) -> tuple[GramCallback, nn.Module, torch.optim.Optimizer]:
    model = TwoLayer()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    cb = GramCallback(select=["*.weight"], interval=1, window=window, **kwargs)
    cb.attach(model, opt)
    return cb, model, opt


def test_non_finite_delta_is_skipped_counted_and_warned() -> None:
    cb, _, _ = attached()
    p = cb.selector.p
    gen = torch.Generator().manual_seed(1)
    for step in (1, 2):
        assert cb.push_delta(torch.randn(p, generator=gen), 0.1 * torch.randn(p), step)
    gram_before, edge_before = cb.window.gram(), cb.edge
    buf_before = cb.window.state_dict()["deltas"].clone()
    bad = [
        (torch.full((p,), math.nan), torch.zeros(p)),  # NaN in the total
        (torch.randn(p, generator=gen), torch.full((p,), math.inf)),  # inf in the WD part
    ]
    for bad_total, bad_wd in bad:
        with pytest.warns(RuntimeWarning, match="non-finite update delta at step 3"):
            assert not cb.push_delta(bad_total, bad_wd, 3)
    assert cb.skipped_deltas == 2
    assert cb.window.count == 2 and cb.edge is edge_before
    torch.testing.assert_close(cb.window.gram(), gram_before, rtol=0, atol=0)
    assert torch.equal(cb.window.state_dict()["deltas"], buf_before)
    assert cb.push_delta(torch.randn(p, generator=gen), torch.zeros(p), 4)
    assert cb.window.count == 3 and torch.isfinite(cb.window.gram()).all()


def test_non_finite_parameters_are_skipped_through_capture() -> None:
    cb, model, _ = attached()
    with torch.no_grad():
        model.a.weight[0, 0] = math.inf
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert not cb.capture(1)
    assert cb.skipped_deltas == 1 and cb.window.count == 0
    assert float(cb.tracker.accumulated.abs().sum()) == 0.0  # the interval was discarded


@pytest.mark.parametrize(
    "override,needles",
    [
        ("callbacks.gram.window=1", ["callbacks.gram.window=1", ">= 2"]),
        ("task.gram_interval=0", ["task.gram_interval=0", ">= 1"]),
        ("callbacks.gram.interval=0", ["callbacks.gram.interval=0", ">= 1"]),
        (
            "callbacks.gram.start_step=99999",
            ["callbacks.gram.start_step=99999", "trainer.max_steps"],
        ),
        ("callbacks.gram.start_step=-1", ["callbacks.gram.start_step=-1", ">= 0"]),
        (
            "callbacks.gram.edge_definition=raw",
            ["callbacks.gram.edge_definition='raw'", "paper, burn_in, normalized"],
        ),
        (
            "callbacks.edge_alignment.dominance_threshold=1.5",
            ["callbacks.edge_alignment.dominance_threshold=1.5", "> 0 and <= 1"],
        ),
        ("callbacks.gram.top_k=0", ["callbacks.gram.top_k=0", ">= 1"]),
        (
            "callbacks.gram.interval_multiples=[2,3]",
            ["callbacks.gram.interval_multiples=[2, 3]", "contains 1"],
        ),
        ("callbacks.gram.select=nosuch", ["callbacks.gram.select='nosuch'", "attention"]),
        ("callbacks.gram.buffer_dtype=int8", ["callbacks.gram.buffer_dtype='int8'", "float32"]),
        ("callbacks.gram.phase_at=-1", ["callbacks.gram.phase_at=-1", ">= 0"]),
        (
            "callbacks.gram.phase_post=5",  # shorter than phase_at = one interval
            ["callbacks.gram.phase_post=5", ">= phase_at"],
        ),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, override: str, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        built(tmp_path / "run", [override])
    for needle in needles:
        assert needle in str(info.value)


def test_selector_matching_nothing_names_the_key(tmp_path: Path) -> None:
    # train.build runs the callback's check before anything trains.
    with pytest.raises(ConfigError, match=r"callbacks\.gram\.select=\['nosuch\.\*'\] matches no"):
        built(tmp_path / "run", ["callbacks.gram.select=[nosuch.*]", "trainer.max_steps=2"])


def test_inexact_weight_decay_fails_unless_allowed() -> None:
    model = TwoLayer()
    l2 = torch.optim.Adam(model.parameters(), lr=0.1, weight_decay=0.1)
    # Built in Python: the message names the class and its one switch, allow_inexact_split.
    with pytest.raises(ValueError, match=r"^GramCallback\(allow_inexact_split=False\)") as info:
        GramCallback(select="all").check_module(model, l2)
    assert "allow_inexact=" not in str(info.value)
    cb = GramCallback(select="all", allow_inexact_split=True)
    with pytest.warns(UserWarning, match="cannot be split exactly"):
        cb.attach(model, l2)
    assert cb.tracker is not None


def test_state_dicts_survive_weights_only_load(runs: Runs) -> None:
    for cb in (runs.gram, runs.edge):
        buf = io.BytesIO()
        torch.save(cb.state_dict(), buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=True)
        assert loaded.keys() == cb.state_dict().keys()
    # A fresh GramCallback restored from it continues with the same window.
    net = runs.run.module
    fresh = GramCallback(interval=INTERVAL)
    buf = io.BytesIO()
    torch.save(runs.gram.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    fresh.attach(analysed_module(net), torch.optim.AdamW(net.parameters(), weight_decay=1.0))
    torch.testing.assert_close(fresh.window.gram(), runs.gram.window.gram(), rtol=0, atol=0)
    torch.testing.assert_close(fresh.edge.sigma, runs.gram.edge.sigma, rtol=0, atol=0)
    torch.testing.assert_close(fresh.edge.vectors, runs.gram.edge.vectors, rtol=0, atol=0)
    assert fresh.last_capture_step == STEPS
    fresh.teardown(None, None, "fit")
    # A resume with another interval fails loudly instead of starting a fresh window.
    other = GramCallback(interval=INTERVAL + 1)
    assert other.state_key == runs.gram.state_key
    other.load_state_dict(runs.gram.state_dict())
    with pytest.raises(ValueError, match=r"callbacks\.gram\.interval=11 differs"):
        other.attach(analysed_module(net), torch.optim.AdamW(net.parameters()))
    other.teardown(None, None, "fit")
    edge = EdgeAlignmentCallback()
    edge.load_state_dict(json.loads(json.dumps(runs.edge.state_dict())))
    assert edge.state_dict() == runs.edge.state_dict()
    # The derived intervals' events too, through torch.save / weights_only.
    buf = io.BytesIO()
    torch.save(runs.edge.state_dict(), buf)
    buf.seek(0)
    edge = EdgeAlignmentCallback()
    edge.load_state_dict(torch.load(buf, weights_only=True))
    assert edge.state_dict() == runs.edge.state_dict()
    assert set(edge.interval_events) == {2 * INTERVAL, 3 * INTERVAL}
    assert edge.interval_events[2 * INTERVAL].windows == 2
    # A state written before the derived windows: they start empty.
    old = {k: v for k, v in runs.edge.state_dict().items() if k != "derived"}
    edge = EdgeAlignmentCallback()
    edge.load_state_dict(old)
    assert edge.interval_events == {} and edge.edge_events.windows == runs.edge.edge_events.windows


@pytest.mark.parametrize("interval", ["0", "-50"])
def test_edge_controls_preset_rejects_a_non_positive_interval(
    tmp_path: Path, interval: str
) -> None:
    with pytest.raises(ConfigError, match=rf"task\.gram_interval={interval} is not allowed"):
        built(tmp_path / "run", ["experiment=edge_controls", f"task.gram_interval={interval}"])


@pytest.mark.parametrize("definition", ["paper", "burn_in", "normalized"])
def test_davis_kahan_bound_holds_for_every_edge_definition(definition: str) -> None:
    """The bound on v_1's rotation between consecutive windows is a theorem: it must
    hold for the analysed edge whatever its rows (the evicted dot is rescaled to them)."""
    cb, _, _ = attached(window=4, edge_definition=definition, start_step=3)
    p = cb.selector.p
    gen = torch.Generator().manual_seed(3)
    shared = torch.randn(p, generator=gen)
    checked = 0
    for step in range(1, 13):
        scale = 20.0 if step in (1, 7) else 1.0  # large deltas entering and leaving
        total = scale * (shared + 0.7 * torch.randn(p, generator=gen))
        cb.push_delta(total, -0.2 * total + 0.1 * torch.randn(p, generator=gen), step, step - 1)
        if cb.edge is None or cb.previous is None:
            continue
        m = measure(cb.edge, cb.previous, cb.evicted_dot)
        if math.isnan(m["dk_bound"]):
            continue
        assert math.sin(math.radians(m["rotation_deg"][0])) <= m["dk_bound"] + 1e-9, step
        checked += 1
    assert checked >= 6
