"""GapFlowCallback and ClassCallback on real short Dyck runs.

Runs shared by the module (1,000-sequence Dyck test set, Gram interval 10, "grokked" at
the first evaluation by a threshold of 0.01): ``full`` (gram + gap_flow + classes, 60
steps), ``plain`` (gram only: the analyses must not change a bit of training), ``part``
(35 steps) and ``resumed`` (35 -> 60: the checkpoint falls between an analysed window and
the window that completes its forward pair).
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from grokedge.analysis_log import read_analyses
from grokedge.callbacks import ClassCallback, GapFlowCallback, find_gram_callback
from grokedge.checks import ConfigError
from grokedge.experiments.universality import CLASS_CODES, CLASSES, UNDETERMINED
from grokedge.functional import analysed_module
from grokedge.run_files import metrics_by_step
from grokedge.train import Run, build, compose, fit

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated"),
]

INTERVAL = 10
STEPS = 60
CUT = 35
WINDOWS = [20, 30, 40, 50, 60]  # the first window holds 2 deltas at step 20
COMMON = [
    "task=dyck",
    "logger=none",
    "torch_threads=1",
    "progress_bar.refresh_rate=0",
    "task.datamodule.ood_sequences=0",
    "task.datamodule.n_sequences=1050",
    f"task.gram_interval={INTERVAL}",
    "task.eval_every=20",
    "task.grok.threshold=0.01",
    f"checkpoint.every_n_train_steps={CUT}",
]
ANALYSES = [
    "callbacks=gram",
    "+callbacks@callbacks.gap_flow=gap_flow",
    "+callbacks@callbacks.classes=classes",
    "callbacks.classes.every=30",
    "callbacks.classes.n_sequences=40",
    "callbacks.classes.folds=3",
]


def built(run_dir: Path, overrides: list[str]) -> Run:
    return build(compose([*COMMON, *overrides], run_dir), run_dir)


def fit_quietly(run: Run) -> dict:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*predicts .* MiB of buffers.*")
        return fit(run)


@dataclass
class Runs:
    full: Run
    plain: Run
    resumed: Run
    summary: dict
    root: Path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("gap_flow_runs")
    full = built(root / "full", [*ANALYSES, f"trainer.max_steps={STEPS}"])
    summary = fit_quietly(full)
    plain = built(root / "plain", ["callbacks=gram", f"trainer.max_steps={STEPS}"])
    fit_quietly(plain)
    part = built(root / "part", [*ANALYSES, f"trainer.max_steps={CUT}"])
    fit_quietly(part)
    ckpt = root / "part" / "checkpoints" / "last.ckpt"
    resumed = built(root / "resumed", [*ANALYSES, f"trainer.max_steps={STEPS}", f"resume={ckpt}"])
    fit_quietly(resumed)
    return Runs(full, plain, resumed, summary, root)


def _callback(run: Run, kind: type):
    (found,) = [c for c in run.trainer.callbacks if isinstance(c, kind)]
    return found


def _sigma_by_step(run_dir: Path) -> dict[int, list[float]]:
    """σ of every window, as the EdgeAlignmentCallback wrote it (not the code under test)."""
    return {r["step"]: r["sigma"] for r in read_analyses(run_dir, ["gram_spectrum"])}


def _gap(sigma: list[float], k: int) -> float:
    return sigma[k - 1] ** 2 - sigma[k] ** 2 if k < len(sigma) else math.nan


def test_gap_flow_rows_use_the_windows_spectrum_and_the_runs_optimizer(runs: Runs) -> None:
    root = runs.root / "full"
    rows = read_analyses(root, ["gap_flow"])
    assert [r["step"] for r in rows] == WINDOWS
    sigmas = _sigma_by_step(root)
    metrics = metrics_by_step(root)
    for r in rows:
        sigma, k = sigmas[r["step"]], r["k"]
        assert r["edge_step"] == r["step"]
        assert r["d_k"] == pytest.approx(sigma[k - 1] ** 2, rel=1e-9)
        assert r["d_k1"] == pytest.approx(sigma[k] ** 2, rel=1e-9)
        assert r["window"] == len(sigma) == metrics[r["step"]]["gram/deltas"]
        assert (r["lr"], r["weight_decay"]) == (1e-3, 1.0)
        assert r["n_sequences"] == 50.0  # the whole training set is "the training loss"
        # k defaults to k* = argmax σ_j/σ_{j+1} of the window.
        ratios = [sigma[j] / sigma[j + 1] for j in range(len(sigma) - 1)]
        assert k == ratios.index(max(ratios)) + 1
        for name in ("h_k", "h_k1", "grad_k", "term1", "term2", "term3", "predicted"):
            assert math.isfinite(r[name]), name
        assert metrics[r["step"]]["gapflow/predicted_dgdt"] == pytest.approx(r["predicted"])
        assert metrics[r["step"]]["gapflow/balance"] == pytest.approx(r["balance"])
        # The observed change of g over the interval before the window, from the spectra.
        before = sigmas.get(r["step"] - INTERVAL)
        want = math.nan if before is None else (_gap(sigma, k) - _gap(before, k)) / INTERVAL
        if math.isnan(want):
            assert r["observed_dgdt"] is None
        else:
            assert r["observed_dgdt"] == pytest.approx(want, rel=1e-9)


def test_forward_pairs_predict_the_next_windows_change(runs: Runs) -> None:
    root = runs.root / "full"
    rows = {r["step"]: r for r in read_analyses(root, ["gap_flow"])}
    (summary_row,) = read_analyses(root, ["gap_flow_summary"])
    sigmas = _sigma_by_step(root)
    pairs = summary_row["forward_pairs"]
    assert [p[0] for p in pairs] == WINDOWS[:-1]  # the last window has no next one
    for step, k, predicted, predicted_eff, observed in pairs:
        assert k == rows[step]["k"] and predicted == pytest.approx(rows[step]["predicted"])
        assert predicted_eff == pytest.approx(rows[step]["predicted_eff"])
        want = (_gap(sigmas[step + INTERVAL], k) - _gap(sigmas[step], k)) / INTERVAL
        if math.isnan(want):
            assert observed is None
        else:
            assert observed == pytest.approx(want, rel=1e-9)
    s = runs.summary
    assert s["gapflow_forward_pairs"] == sum(p[4] is not None for p in pairs)
    assert s["gapflow_forward_sign_agreement"] == summary_row["forward"]["sign_agreement"]
    assert s["gapflow_driving"] == "raw"


def test_classes_are_decided_from_the_late_windows_and_written_to_the_summary(
    runs: Runs,
) -> None:
    root = runs.root / "full"
    rows = read_analyses(root, ["classes"])
    assert [(r["step"], r["trigger"]) for r in rows] == [(30, "cadence"), (60, "cadence")]
    last = rows[-1]
    # No window is "late" (grok at 20, post until 120): the last 10 windows, all 5 here.
    assert (last["late_basis"], last["late_windows"], last["late_first_step"]) == ("tail", 5, 20)
    edge_rows = read_analyses(root, ["edge_directions"])
    shares = [r["directions"][0]["grad_frac"] for r in edge_rows]
    rotations = [r["directions"][0]["rotation_deg"] for r in edge_rows]
    rotations = [x for x in rotations if x is not None]
    assert last["late_grad_share"] == pytest.approx(sum(shares) / len(shares), rel=1e-9)
    assert last["late_rotation_deg"] == pytest.approx(sum(rotations) / len(rotations), rel=1e-6)
    assert -1.0 <= last["functional_r2"] <= 1.0
    # Dyck's declared functional target: depth, read as a number (conf/task/dyck.yaml).
    assert (last["functional_target"], last["functional_basis"]) == ("depth", "value")
    assert last["functional_r2_by_target"] == {"depth": pytest.approx(last["functional_r2"])}
    assert last["key_frequencies"] == []
    net = analysed_module(runs.full.module)
    theta = find_gram_callback(runs.full.trainer).selector.flatten(net).double()
    assert last["functional_eps"] == pytest.approx(0.005 * float(theta.norm()), rel=1e-6)
    balances = [r["balance"] for r in read_analyses(root, ["gap_flow"])]
    median = sorted(balances)[len(balances) // 2]
    assert last["late_balance"] == pytest.approx(median)
    assert last["observed"] in CLASSES and last["predicted"] in (*CLASSES, UNDETERMINED)
    s = runs.summary
    assert (s["class_observed"], s["class_predicted"]) == (last["observed"], last["predicted"])
    assert s["class/observed"] == CLASS_CODES[last["observed"]]
    assert s["class_functional_r2"] == pytest.approx(last["functional_r2"])
    on_disk = json.loads((root / "summary.json").read_text())
    assert on_disk["class_observed"] == last["observed"]


def test_the_analyses_leave_training_untouched(runs: Runs) -> None:
    a = runs.full.module.net.state_dict()
    b = runs.plain.module.net.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    opt_a = runs.full.trainer.optimizers[0].state_dict()
    opt_b = runs.plain.trainer.optimizers[0].state_dict()
    for idx, state in opt_a["state"].items():
        for key, value in state.items():
            assert torch.equal(value, opt_b["state"][idx][key]), (idx, key)


def _strip(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "seconds"}


def test_resumed_run_continues_the_pairs_and_the_classes(runs: Runs) -> None:
    full, resumed = runs.root / "full", runs.root / "resumed"
    for kind in ("gap_flow", "classes"):
        want = [_strip(r) for r in read_analyses(full, [kind]) if r["step"] > CUT]
        got = [_strip(r) for r in read_analyses(resumed, [kind]) if r["step"] > CUT]
        assert [r["step"] for r in got] == [r["step"] for r in want], kind
        for a, b in zip(want, got, strict=True):
            for key in a:
                if isinstance(a[key], float):
                    assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-12), (kind, key)
                elif key != "late_first_step":
                    assert b[key] == a[key], (kind, key)
    (a,) = read_analyses(full, ["gap_flow_summary"])
    (b,) = read_analyses(resumed, ["gap_flow_summary"])
    assert [p[:2] for p in b["forward_pairs"]] == [p[:2] for p in a["forward_pairs"]]
    for p, q in zip(a["forward_pairs"], b["forward_pairs"], strict=True):
        assert q[2:] == pytest.approx(p[2:], rel=1e-6)  # incl. the pair across the cut


def _same(a, b) -> bool:
    """Equality that treats NaN as equal to NaN (undefined observations are NaN)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_state_dicts_round_trip_weights_only(runs: Runs) -> None:
    keys = set()
    for kind in (GapFlowCallback, ClassCallback):
        cb = _callback(runs.full, kind)
        keys.add(cb.state_key)
        buf = io.BytesIO()
        torch.save(cb.state_dict(), buf)
        buf.seek(0)
        fresh = kind()
        fresh.load_state_dict(torch.load(buf, weights_only=True))
        again, want = fresh.state_dict(), cb.state_dict()
        assert again.keys() == want.keys(), kind
        for key, value in want.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(again[key].cpu(), value.cpu()), (kind, key)
            else:
                assert _same(again[key], value), (kind, key)
    assert len(keys) == 2
    assert _callback(runs.full, GapFlowCallback).state_dict()["forward"]


BAD = [
    (["callbacks.gap_flow.hvp_dtype=int8"], "callbacks.gap_flow.hvp_dtype='int8'"),
    (["callbacks.gap_flow.driving=both"], "callbacks.gap_flow.driving='both'"),
    (["callbacks.gap_flow.k=0"], "callbacks.gap_flow.k=0"),
    (
        ["callbacks.classes.thresholds.functional_grad_share=1.5"],
        "callbacks.classes.thresholds.functional_grad_share=1.5",
    ),
    (["callbacks.classes.thresholds.compression_grad_share=0.95"], "compression_grad_share=0.95"),
    (["+callbacks.classes.thresholds.nosuch=1"], "callbacks.classes.thresholds.nosuch=1"),
    # A probe target the task does not declare: one error naming the key and the targets.
    (["callbacks.classes.target=parity"], "callbacks.classes.target='parity' is not allowed"),
    (["callbacks.classes.target=parity"], "declares the probe targets depth"),
    (["callbacks.classes.target_basis=fourier"], "callbacks.classes.target_basis='fourier'"),
    (
        ["+callbacks@callbacks.probe=probe", "callbacks.probe.targets=[parity]"],
        "callbacks.probe.targets=['parity'] is not allowed: the task (dyck) declares",
    ),
    (["callbacks.classes.eps_fraction=0"], "callbacks.classes.eps_fraction=0"),
    (["callbacks.classes.block=2"], "callbacks.classes.block=2"),
]


@pytest.mark.parametrize("overrides,needle", BAD, ids=[b[1] for b in BAD])
def test_argument_errors_name_the_key(tmp_path: Path, overrides, needle) -> None:
    with pytest.raises(ConfigError) as info:
        built(tmp_path / "run", [*ANALYSES, *overrides])
    assert needle in str(info.value), str(info.value)


def test_cadence_off_the_windows_fails_at_setup(tmp_path: Path) -> None:
    run = built(tmp_path / "run", [*ANALYSES, "callbacks.gap_flow.every=15", "trainer.max_steps=1"])
    with pytest.raises(ValueError, match=r"callbacks\.gap_flow\.every=15 .* multiple"):
        fit_quietly(run)


def test_modular_reads_the_answer_in_its_fourier_basis(tmp_path: Path) -> None:
    """A real modular run: the functional R² reads the answer's Fourier features at the
    key frequencies of the logits, beside every declared target read as a number."""
    overrides = [
        "task=modular",
        "logger=none",
        "torch_threads=1",
        "progress_bar.refresh_rate=0",
        "task.gram_interval=10",
        "task.eval_every=20",
        "trainer.max_steps=40",
        *ANALYSES,
        "callbacks.classes.every=40",
        "callbacks.classes.n_sequences=200",
    ]
    run = build(compose(overrides, tmp_path / "run"), tmp_path / "run")
    fit_quietly(run)
    row = read_analyses(tmp_path / "run", ["classes"])[-1]
    assert (row["functional_target"], row["functional_basis"]) == ("answer", "fourier")
    freqs = row["key_frequencies"]
    assert len(freqs) == 4 and all(1 <= k <= 48 for k in freqs) and freqs == sorted(set(freqs))
    assert set(row["functional_r2_by_target"]) == {"answer", "a", "b"}
    assert math.isfinite(row["functional_r2"]) and row["functional_r2"] <= 1.0
    assert row["n_positions"] == 200
