"""IndicatorCallback on short real runs (real Trainer, callbacks=indicators).

Two runs shared by the module, on a tiny transformer (one layer, d = 8: p_sel = 256, so
the Hessian is small enough to form densely): ``dyck`` (60 steps on a 1,000-sequence test
set, evaluations every 20 steps, sharpness every 20, LLC every 40) and ``modular``
((a + b) mod 23, 40 steps, restricted/excluded loss every 20), plus ``dyck_gram``, the
Dyck run with callbacks=gram only (training must not change by a bit). Each runs in a few
seconds on one thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.func import hessian

from grokedge.analysis_log import read_analyses
from grokedge.batch import IGNORE_INDEX
from grokedge.callbacks import IndicatorCallback, find_gram_callback
from grokedge.checks import ConfigError
from grokedge.experiments.curvature import flat_loss
from grokedge.experiments.restricted_loss import restricted_excluded_loss
from grokedge.functional import analysed_module
from grokedge.run_files import metrics_by_step, read_metrics
from grokedge.train import Run, build, compose, fit

EVAL, SHARP, LLC_EVERY, K = 20, 20, 40, 3
CHAINS, DRAWS = 2, 20
TINY = ["model.d_model=8", "model.n_layers=1", "model.n_heads=2", "model.d_ff=16"]
COMMON = [
    "logger=none",
    "torch_threads=1",
    "progress_bar.refresh_rate=0",
    *TINY,
    "task.gram_interval=10",
    f"task.eval_every={EVAL}",
    "checkpoint.every_n_train_steps=40",
]
INDICATORS = [
    "callbacks=indicators",
    f"callbacks.indicators.sharpness_every={SHARP}",
    f"callbacks.indicators.llc_every={LLC_EVERY}",
    f"callbacks.indicators.fourier_every={EVAL}",
    f"callbacks.indicators.k={K}",
    "callbacks.indicators.hvp_dtype=float64",
    "callbacks.indicators.lanczos_tol=0",  # machine precision: compared with a dense eigh
    f"callbacks.indicators.llc_chains={CHAINS}",
    f"callbacks.indicators.llc_draws={DRAWS}",
    "callbacks.indicators.llc_burn_in=10",
    "callbacks.indicators.llc_batch_size=16",
    "callbacks.indicators.background=false",
]
DYCK = ["task=dyck", "task.datamodule.ood_sequences=0", "task.datamodule.n_sequences=1050"]
DYCK_STEPS = 60
P = 23
MODULAR = ["task=modular", f"task.datamodule.modulus={P}", "task.datamodule.batch_size=64"]
MODULAR_STEPS = 40
CHEAP = ("indicator/theta_norm", "indicator/theta_norm_selected", "indicator/loss_gap")
FOURIER_KEYS = ("indicator/restricted_loss", "indicator/excluded_loss")


@dataclass
class Runs:
    dyck: Run
    dyck_gram: Run
    modular: Run


def built(run_dir: Path, overrides: list[str]) -> Run:
    return build(compose([*COMMON, *overrides], run_dir), run_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("indicator_runs")
    dyck = built(root / "dyck", [*DYCK, *INDICATORS, f"trainer.max_steps={DYCK_STEPS}"])
    fit(dyck)
    gram = built(root / "gram", [*DYCK, "callbacks=gram", f"trainer.max_steps={DYCK_STEPS}"])
    fit(gram)
    modular = built(
        root / "modular",
        [*MODULAR, *INDICATORS, "callbacks.indicators.n_sequences=64"]
        + [f"trainer.max_steps={MODULAR_STEPS}"],
    )
    fit(modular)
    return Runs(dyck, gram, modular)


def callback(run: Run) -> IndicatorCallback:
    (found,) = [c for c in run.trainer.callbacks if isinstance(c, IndicatorCallback)]
    return found


def series(run: Run, key: str) -> dict[int, float]:
    by_step = metrics_by_step(run.trainer.default_root_dir)
    return {step: row[key] for step, row in by_step.items() if key in row}


def run_dir(run: Run) -> Path:
    return Path(run.trainer.default_root_dir)


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("task", ["dyck", "modular"])
def test_keys_appear_finite_at_their_cadences(runs: Runs, task: str) -> None:
    run = getattr(runs, task)
    steps = DYCK_STEPS if task == "dyck" else MODULAR_STEPS
    evals = list(range(EVAL, steps + 1, EVAL))
    for key in CHEAP:
        values = series(run, key)
        assert sorted(values) == evals, key
        assert all(math.isfinite(v) for v in values.values()), key
    for key in ("indicator/sharpness", "indicator/edge_hessian_overlap"):
        assert sorted(series(run, key)) == list(range(SHARP, steps + 1, SHARP)), key
    for key in ("indicator/llc", "indicator/llc_converged"):
        assert sorted(series(run, key)) == list(range(LLC_EVERY, steps + 1, LLC_EVERY)), key
    assert set(series(run, "indicator/llc_converged").values()) <= {0.0, 1.0}
    for key in FOURIER_KEYS:  # modular addition only
        values = series(run, key)
        if task == "dyck":
            assert values == {}, key
        else:
            assert sorted(values) == evals, key
            assert all(math.isfinite(v) and v > 0 for v in values.values()), key


def test_rows_hold_the_vectors(runs: Runs) -> None:
    rows = read_analyses(run_dir(runs.dyck), ["indicators"])
    assert [r["step"] for r in rows] == list(range(SHARP, DYCK_STEPS + 1, SHARP))
    for row in rows:
        sharp = row["sharpness"]
        assert len(sharp["eigenvalues"]) == K and len(sharp["overlap"]) == K
        assert sharp["eigenvalues"] == sorted(sharp["eigenvalues"], reverse=True)
        assert all(0.0 <= c <= 1.0 for c in sharp["overlap"])
        assert sharp["n_sequences"] == 50  # the whole Dyck training set
        assert ("llc" in row) == (row["step"] % LLC_EVERY == 0)
        assert "fourier" not in row
    llc = next(r["llc"] for r in rows if "llc" in r)
    assert llc["n"] == 50 and math.isclose(llc["n_beta"], 50 / math.log(50))
    trace = torch.tensor(llc["loss_trace"], dtype=torch.float64)
    assert trace.shape == (CHAINS, DRAWS)
    # λ̂ = nβ (mean of the draws − L_n(w*)), per chain and pooled, from the row's own trace.
    per_chain = llc["n_beta"] * (trace.mean(dim=1) - llc["init_loss"])
    assert torch.allclose(per_chain, torch.tensor(llc["per_chain"], dtype=torch.float64))
    assert math.isclose(llc["llc"], float(per_chain.mean()), rel_tol=1e-9)
    modular = read_analyses(run_dir(runs.modular), ["indicators"])
    assert all(len(r["fourier"]["key_frequencies"]) == 4 for r in modular)


def test_cheap_indicators_match_the_final_weights(runs: Runs) -> None:
    run = runs.dyck
    net = analysed_module(run.module)
    flat = torch.cat([p.detach().double().reshape(-1) for p in net.parameters()])
    selected = [p for n, p in net.named_parameters() if "in_proj_weight" in n or "out_proj" in n]
    selected = [p for p in selected if p.ndim == 2]  # out_proj.weight, not its bias
    row = metrics_by_step(run_dir(run))[DYCK_STEPS]
    assert math.isclose(row["indicator/theta_norm"], float(flat.norm()), rel_tol=1e-12)
    sel = torch.cat([p.detach().double().reshape(-1) for p in selected])
    assert math.isclose(row["indicator/theta_norm_selected"], float(sel.norm()), rel_tol=1e-9)
    gap = row["test/loss"] - row["train/loss"]
    assert math.isclose(row["indicator/loss_gap"], gap, rel_tol=1e-6, abs_tol=1e-7)


def test_sharpness_equals_a_dense_hessian(runs: Runs) -> None:
    """The last row (step 60: the final weights) against eigh of torch.func.hessian of the
    subset's loss in float64, and v_1's overlap against the dense top eigenvector."""
    run = runs.dyck
    cb = callback(run)
    row = read_analyses(run_dir(run), ["indicators"])[-1]
    assert row["step"] == DYCK_STEPS
    net = analysed_module(run.module).eval()
    selector = find_gram_callback(run.trainer).selector
    theta = selector.flatten(net).double()
    assert theta.numel() == row["p_selected"] == 256
    batch = cb.subset(run.trainer, run.module)
    loss = flat_loss(run.module.evaluate, selector, net, batch, dtype=torch.float64)
    dense = hessian(loss)(theta)
    values, vectors = torch.linalg.eigh((dense + dense.T) / 2)
    top = values.flip(0)[:K]
    got = torch.tensor(row["sharpness"]["eigenvalues"], dtype=torch.float64)
    assert torch.allclose(got, top, rtol=1e-6, atol=1e-8 * float(top[0].abs()))
    edge = find_gram_callback(run.trainer).edge
    assert row["edge_step"] == edge.step == DYCK_STEPS
    v1 = edge.vectors[0].double()
    expected = float((v1 @ vectors[:, -1]) ** 2 / (v1 @ v1))
    assert math.isclose(row["sharpness"]["overlap"][0], expected, rel_tol=1e-5, abs_tol=1e-9)


def test_restricted_loss_equals_a_direct_call(runs: Runs) -> None:
    """The last row against the math called on a grid built here, pair by pair."""
    run = runs.modular
    dm = run.trainer.datamodule
    row = read_analyses(run_dir(run), ["indicators"])[-1]
    assert row["step"] == MODULAR_STEPS
    logits = torch.zeros(P, P, P, dtype=torch.float64)
    train = torch.zeros(P, P, dtype=torch.bool)
    train_set = set(dm.train_rows.tolist())
    with torch.no_grad():
        out = run.module.evaluate({}, {"tokens": dm.tokens, "labels": dm.labels,
                                       "weight": torch.ones(len(dm.tokens))}).logits  # fmt: skip
    for i, (a, _, b, _) in enumerate(dm.tokens.tolist()):
        assert int(dm.labels[i, -1]) == (a + b) % P and int(dm.labels[i, 0]) == IGNORE_INDEX
        logits[a, b] = out[i, -1].double()
        train[a, b] = i in train_set
    freqs = row["fourier"]["key_frequencies"]
    restricted, excluded = restricted_excluded_loss(logits, train, freqs)
    assert math.isclose(row["fourier"]["restricted"], restricted, rel_tol=1e-5)
    assert math.isclose(row["fourier"]["excluded"], excluded, rel_tol=1e-5)


def test_training_is_unchanged_by_the_indicators(runs: Runs) -> None:
    for a, b in zip(runs.dyck.module.parameters(), runs.dyck_gram.module.parameters(), strict=True):
        assert torch.equal(a, b)


def test_state_round_trips_a_checkpoint(runs: Runs) -> None:
    """The checkpoint at step 40 (weights_only load) holds the state at that step, and a
    fresh callback loaded from it reports the same state."""
    run = runs.dyck
    cb = callback(run)
    ckpt = torch.load(
        run_dir(run) / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu"
    )
    state = ckpt["callbacks"][cb.state_key]
    # Saved after step 40's evaluation (grokedge.resume.RunCheckpoint): calls at 20 and 40.
    assert ckpt["global_step"] == 40
    assert state["last_step"] == 40 and state["calls"] == 2
    assert state["part_calls"] == {"sharpness": 2, "llc": 1, "fourier": 0}
    fresh = IndicatorCallback()
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    assert cb.state_dict()["part_calls"] == {"sharpness": 3, "llc": 1, "fourier": 0}


WALL_TIMES = ("seconds", "worker_seconds")


def _untimed(rows: list[dict]) -> list[dict]:
    """Rows without their wall times (the one thing a resumed run cannot share)."""
    return [{k: v for k, v in row.items() if k not in WALL_TIMES} for row in rows]


def test_a_resumed_run_writes_what_the_uninterrupted_run_writes(runs: Runs, tmp_path: Path) -> None:
    """Resumed from the step-40 checkpoint into a new directory, the run ends with the
    uninterrupted run's metrics.jsonl (every float bit: the SGLD generator is seeded from
    the step, the Lanczos start from its seed) and its analyses.jsonl but for wall times,
    the calls after the checkpoint included (sharpness at 60; no LLC call is due there)."""
    full = run_dir(runs.dyck)
    ckpt = full / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True, map_location="cpu")["global_step"] == 40
    overrides = [*DYCK, *INDICATORS, f"trainer.max_steps={DYCK_STEPS}", f"resume={ckpt}"]
    resumed = built(tmp_path / "resumed", overrides)
    fit(resumed)
    assert read_metrics(run_dir(resumed)) == read_metrics(full)
    rows, full_rows = read_analyses(run_dir(resumed)), read_analyses(full)
    assert [r["step"] for r in full_rows if r["analysis"] == "indicators"] == [20, 40, 60]
    assert _untimed(rows) == _untimed(full_rows)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["callbacks.indicators.llc_chains=0"], "callbacks.indicators.llc_chains=0"),
        (["callbacks.indicators.sharpness_every=0"], "callbacks.indicators.sharpness_every=0"),
        (["callbacks.indicators.hvp_dtype=half"], "callbacks.indicators.hvp_dtype='half'"),
        (["callbacks.indicators.llc_step_size=-1"], "callbacks.indicators.llc_step_size=-1"),
    ],
)
def test_a_bad_knob_fails_before_training(tmp_path: Path, overrides, needle) -> None:
    with pytest.raises(ValueError) as err:
        built(tmp_path, [*DYCK, "callbacks=indicators", *overrides])
    assert needle in str(err.value) and "is not allowed" in str(err.value)


def test_fourier_on_another_operation_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"callbacks.indicators.fourier_every=500 .*add"):
        built(tmp_path, [*MODULAR, "task.datamodule.operation=mul", "callbacks=indicators"])
