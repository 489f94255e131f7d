"""trainer=ddp with the sharded Gram: 2 CPU processes (gloo) against 1 process.

Lightning's DDP launcher re-runs the command line of the process that calls ``fit``, so
the runs happen in subprocesses — ``scripts/ddp_equivalence.py`` and
``python -m grokedge.train`` — never inside pytest. The shard-aware paths of the
callbacks that read edge vectors (classes, gap flow, decoupling) are also checked here
without processes, with ranks as threads (``tests/test_spectral_sharding.py``'s
in-memory collective) against the same code on one process.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from grokedge.callbacks.decoupling import EdgeDecouplingCallback
from grokedge.callbacks.gap_flow import GapFlowCallback
from grokedge.callbacks.gram import GramCallback
from grokedge.callbacks.universality import ClassCallback
from grokedge.edge.geometry import rotation_deg
from tests.conftest import REPO
from tests.test_spectral_sharding import _Net, _train_step, run_ranks

SCRIPT = REPO / "scripts" / "ddp_equivalence.py"


def _script():
    spec = importlib.util.spec_from_file_location("ddp_equivalence", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (7, 9), generator=g)
    lengths = torch.tensor([9, 3, 5, 9, 1, 7, 4])
    labels[torch.arange(9)[None, :] >= lengths[:, None]] = -100
    labels[2, 0] = 6  # beyond the head's 6 classes: no loss
    return {
        "tokens": torch.randint(0, 3, (7, 9), generator=g),
        "labels": labels,
        "weight": torch.tensor([1.0, 3.0, 2.0, 1.0, 5.0, 1.0, 2.0]),
    }


@pytest.mark.parametrize("world", [2, 3])
def test_split_batch_shares_token_weight_equally_and_adds_up(world: int) -> None:
    split_batch = _script().split_batch
    batch = _batch()
    classes = 6
    tokens = ((batch["labels"] != -100) & (batch["labels"] < classes)).sum(1).double()
    total = float((batch["weight"].double() * tokens).sum())
    summed = torch.zeros(7, dtype=torch.float64)
    for rank in range(world):
        part = split_batch(batch, rank, world, classes)
        rows = [int(torch.nonzero((batch["tokens"] == t).all(1))[0]) for t in part["tokens"]]
        mine = ((part["labels"] != -100) & (part["labels"] < classes)).sum(1).double()
        # Each rank's loss denominator is 1/world of the batch's token weight.
        assert float((part["weight"].double() * mine).sum()) == pytest.approx(total / world)
        summed[rows] += part["weight"].double()
    # The union of the ranks' rows, weights added, is the batch.
    torch.testing.assert_close(summed, batch["weight"].double())


def test_split_batch_mean_gradient_is_the_whole_batch_gradient() -> None:
    """DDP averages the ranks' mean-loss gradients: that average is the whole batch's."""
    split_batch = _script().split_batch
    batch = _batch()
    classes = 6
    emb = torch.randn(3, classes, dtype=torch.float64, requires_grad=True)

    def loss(b: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = emb[b["tokens"]]
        ok = (b["labels"] != -100) & (b["labels"] < classes)
        ce = torch.nn.functional.cross_entropy(logits[ok], b["labels"][ok], reduction="none")
        w = b["weight"].double()[:, None].expand_as(ok)[ok]
        return (ce * w).sum() / w.sum()

    (whole,) = torch.autograd.grad(loss(batch), emb)
    grads = [torch.autograd.grad(loss(split_batch(batch, r, 2, classes)), emb)[0] for r in (0, 1)]
    torch.testing.assert_close((grads[0] + grads[1]) / 2, whole, rtol=1e-6, atol=1e-9)


# ------------------------------------------------- shard-aware callbacks, ranks as threads


def _train(
    collective: Any, steps: int, hook: Any = None, decouple: str | None = None
) -> tuple[_Net, GramCallback, EdgeDecouplingCallback | None]:
    """A tiny net trained by AdamW on a fixed stream (the same on every rank, as DDP keeps
    replicas identical) with a GramCallback (interval 1, window 4, top_k 3) sharded over
    ``collective`` (None: one process) and, with ``decouple``, an EdgeDecouplingCallback
    in that mode from step 0. ``hook(gram, step)`` runs after each captured delta (every
    rank: a Gram listener)."""
    net = _Net()
    opt = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.5)
    gram = GramCallback(select="all", interval=1, window=4, top_k=3, collective=collective)
    gram.attach(net, opt)
    cb = None
    if decouple is not None:
        cb = EdgeDecouplingCallback(mode=decouple, at_step=0)
        cb.selector, cb.gram, cb.fired_step = gram.selector, gram, 0
        cb.attach(net, opt)
    for step in range(steps):
        _train_step(net, opt, step)
        if gram.capture(step + 1) and gram.edge is not None and hook is not None:
            hook(gram, step + 1)
    if cb is not None:
        cb.teardown(None, None, "fit")
    gram.teardown(None, None, "fit")
    return net, gram, cb


def _flat(net: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def _assert_rows_close_up_to_sign(got: Tensor, want: Tensor, atol: float) -> None:
    """Row by row, ``got`` equals ``want`` or ``-want`` (edge vectors are defined up to
    sign; the Gram fixes it by u_j's largest entry, which a float rounding can flip when
    two entries are nearly tied)."""
    got, want = got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1])
    assert got.shape == want.shape
    for g, w in zip(got, want, strict=True):
        sign = 1.0 if float(g.double() @ w.double()) >= 0 else -1.0
        torch.testing.assert_close(g, sign * w, rtol=0, atol=atol)


@pytest.mark.parametrize(("world", "mode"), [(2, "remove"), (3, "flip")])
def test_sharded_decoupling_keeps_replicas_equal_and_matches_one_process(
    world: int, mode: str
) -> None:
    """Every rank applies the v_1 intervention to the whole replicated parameters: they
    must stay bit-identical across ranks and match the 1-process run."""
    plain, _, _ = _train(None, 10)
    one, _, ref_cb = _train(None, 10, decouple=mode)
    assert ref_cb is not None and ref_cb._stats is not None
    ref_stats = ref_cb._stats.clone()
    assert ref_stats[0] >= 5  # steps modified: the edge exists from the 2nd delta on
    # The intervention changed the trajectory (else nothing below is tested).
    assert float((_flat(one) - _flat(plain)).abs().max()) > 1e-3

    def rank(r: int, coll: Any) -> tuple[Tensor, Tensor]:
        net, gram, cb = _train(coll, 10, decouple=mode)
        assert gram.shard is not None and gram.shard.sharded and cb is not None
        assert cb._v1_whole is not None and cb._v1_whole.shape == (gram.shard.p,)
        assert cb._stats is not None
        return _flat(net), cb._stats.clone()

    results = run_ranks(world, rank)
    for params, stats in results:
        assert torch.equal(params, results[0][0])  # replicas identical, bit for bit
        assert torch.equal(stats, results[0][1])
        torch.testing.assert_close(params, _flat(one), rtol=0, atol=1e-5)
        torch.testing.assert_close(stats, ref_stats, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_class_windows_and_checkpoint_match_one_process(world: int) -> None:
    """ClassCallback.on_edge on slices (rotation from the reduced 2×2 Gram) against one
    process; its checkpointed ``prev_v1`` is whole and resumes on another rank count."""

    def record(collective: Any) -> tuple[ClassCallback, GramCallback, dict]:
        cls = ClassCallback()

        def on_edge(gram: GramCallback, step: int) -> None:
            cls.gram = gram  # as ClassCallback.setup finds it
            cls.on_edge(None, None, gram.edge)

        _, gram, _ = _train(collective, 8, hook=on_edge)
        return cls, gram, cls.state_dict()  # collective under sharding

    ref, ref_gram, ref_state = record(None)
    rotations = [w[2] for w in ref.windows]
    assert len(ref.windows) == 7 and math.isnan(rotations[0])
    assert all(r > 0.01 for r in rotations[1:])  # the edge turns: something to compare
    results = run_ranks(world, lambda r, coll: record(coll))
    for cls, gram, state in results:
        assert gram.shard is not None and gram.shard.sharded
        assert cls.v1_turn.previous is not None and cls.v1_turn.previous.shape == (gram.shard.n,)
        steps = [w[0] for w in cls.windows]
        assert steps == [w[0] for w in ref.windows]
        torch.testing.assert_close(
            torch.tensor([w[1] for w in cls.windows]),
            torch.tensor([w[1] for w in ref.windows]),
            rtol=1e-5,
            atol=1e-7,
        )
        # Angles compared through their cosines (arccos is ill-conditioned near 0).
        got = torch.tensor([w[2] for w in cls.windows][1:], dtype=torch.float64)
        torch.testing.assert_close(
            got.deg2rad().cos(),
            torch.tensor(rotations[1:], dtype=torch.float64).deg2rad().cos(),
            rtol=0,
            atol=1e-5,
        )
        _assert_rows_close_up_to_sign(state["prev_v1"], ref_state["prev_v1"], atol=1e-5)

    # A 2-rank-or-3-rank checkpoint resumed on one process and on two ranks: the next
    # window's rotation is measured against the restored whole v_1.
    saved = copy.deepcopy(results[0][2])
    v1_next = ref_gram.edge.vectors[0]
    want = rotation_deg(ref_state["prev_v1"], v1_next)

    def resumed(collective: Any) -> float:
        cls = ClassCallback()
        cls.load_state_dict(copy.deepcopy(saved))
        _, gram, _ = _train(collective, 8)
        cls.gram = gram
        cls.on_edge(None, None, gram.edge)  # rotation of the same v_1 against itself
        return cls.windows[-1][2]

    assert want == pytest.approx(0.0, abs=0.1)
    assert resumed(None) == pytest.approx(want, abs=0.1)
    for got in run_ranks(2, lambda r, coll: resumed(coll)):
        assert got == pytest.approx(want, abs=0.1)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_gap_flow_gathers_modes_k_and_k1_at_their_rows(k: int) -> None:
    """``GapFlowCallback._whole_modes``: rows k−1, k gathered whole at their own indices
    (what ``gap_flow_at`` reads); rows before are left zero; k+1 beyond the rows leaves
    the row count short, so ``gap_flow_at`` skips the window as it does on one process."""
    _, ref, _ = _train(None, 6)
    whole = ref.edge.vectors

    def rank(r: int, coll: Any) -> Tensor:
        _, gram, _ = _train(coll, 6)
        gf = GapFlowCallback()
        gf.gram = gram
        return gf._whole_modes(gram.edge.vectors, k)

    for out in run_ranks(2, rank):
        rows = min(k + 1, whole.shape[0])
        assert out.shape == (rows, whole.shape[1])
        assert torch.count_nonzero(out[: k - 1]) == 0
        _assert_rows_close_up_to_sign(out[k - 1 :], whole[k - 1 : rows], atol=1e-5)


# ------------------------------------------------------------------ real DDP processes


def _run_equivalence(tmp_path: Path, *args: str) -> tuple[Any, dict[str, Any]]:
    """Run scripts/ddp_equivalence.py ARGS (keeping its runs in ``tmp_path``); its process
    and the RESULT it printed, which must say ok."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--keep", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert proc.returncode == 0 and result["ok"], result
    return proc, result


@pytest.mark.slow
def test_ddp_run_matches_one_process(tmp_path: Path) -> None:
    """scripts/ddp_equivalence.py: σ_j, gradient shares, ablation, gap flow, perturbation
    and classes within tolerance."""
    proc, result = _run_equivalence(tmp_path, "--steps", "120")
    # Compared something of each kind, in both runs.
    for group in (
        "sigma",
        "grad_frac",
        "ablation_loss",
        "ablation_acc",
        "gapflow",
        "gapflow_k",
        "perturb",
        "class",
        "class_rotation_deg",
    ):
        assert result["counts"][group] > 0, group
    assert result["ablation_rows"] == [1, 1] and result["perturbation_rows"] == [1, 1]
    assert result["class_rows"] == [1, 1]
    rows = result["gap_flow_rows"]
    assert rows[0] == rows[1] >= 3  # gap flow at (nearly) every window
    one, per_rank = result["predicted_bytes"]
    assert per_rank < one  # the DDP ranks each hold a slice of the window
    assert "on 2 ranks" in proc.stdout


@pytest.mark.slow
def test_ddp_decoupling_matches_one_process(tmp_path: Path) -> None:
    """experiment=decoupling under trainer=ddp: finishes, the ranks' final parameters are
    bit-identical, decouple/* and σ_j match a 1-process run with the same global batch."""
    _, result = _run_equivalence(tmp_path, "--experiment", "decoupling", "--steps", "60")
    assert result["ranks_equal"] is True
    for group in ("sigma", "decouple", "params"):
        assert result["counts"][group] > 0, group
    metrics = [
        json.loads(x) for x in (tmp_path / "world2" / "metrics.jsonl").read_text().splitlines()
    ]
    modified = [m["decouple/steps"] for m in metrics if "decouple/steps" in m]
    assert modified and max(modified) > 0  # the intervention ran under DDP


@pytest.mark.slow
def test_cli_trainer_ddp_with_callbacks_gram(tmp_path: Path, cli) -> None:
    """``python -m grokedge.train trainer=ddp callbacks=gram`` through Hydra's launcher."""
    run_dir = tmp_path / "run"
    proc = cli(
        [
            "task=dyck",
            "callbacks=gram",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.max_steps=40",
            "task.gram_interval=10",
            "task.eval_every=20",
            "task.datamodule.ood_sequences=0",
            "logger=none",
            "torch_threads=1",
            "progress_bar.refresh_rate=0",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The Gram's memory report, from rank 0 only (Lightning's rank_zero_info: on stderr).
    assert (proc.stdout + proc.stderr).count("on 2 ranks") == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["gram/sigma_1"] > 0
    rows = [json.loads(x) for x in (run_dir / "analyses.jsonl").read_text().splitlines()]
    spectra = [r for r in rows if r["analysis"] == "gram_spectrum"]
    # Windows close at 20, 30, 40 (two deltas needed), written once (rank 0 only).
    assert [r["step"] for r in spectra] == [20, 30, 40]
