"""trainer=ddp with the sharded Gram: 2 CPU processes (gloo) against 1 process.

Lightning's DDP launcher re-runs the command line of the process that calls ``fit``, so
the runs happen in subprocesses — ``scripts/ddp_equivalence.py`` and
``python -m grokedge.train`` — never inside pytest.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

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


@pytest.mark.slow
def test_ddp_run_matches_one_process(tmp_path: Path) -> None:
    """scripts/ddp_equivalence.py: σ_j, gradient shares and ablation within tolerance."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "120", "--keep", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert proc.returncode == 0 and result["ok"], result
    # Compared something of each kind, in both runs.
    for group in ("sigma", "grad_frac", "ablation_loss", "ablation_acc"):
        assert result["counts"][group] > 0
    assert result["ablation_rows"] == [1, 1] and result["perturbation_rows"] == [1, 1]
    one, per_rank = result["predicted_bytes"]
    assert per_rank < one  # the DDP ranks each hold a slice of the window
    assert "on 2 ranks" in proc.stdout


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
    assert "on 2 ranks" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["gram/sigma_1"] > 0
    rows = [json.loads(x) for x in (run_dir / "analyses.jsonl").read_text().splitlines()]
    spectra = [r for r in rows if r["analysis"] == "gram_spectrum"]
    # Windows close at 20, 30, 40 (two deltas needed), written once (rank 0 only).
    assert [r["step"] for r in spectra] == [20, 30, 40]
