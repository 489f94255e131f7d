"""The shape contract of an own model (issue 22, items 1 and 7).

A classifier's labels [B] and an MLP's hidden state [B, d] go through every analysis that
reads them (probes, the classes' functional read-out, ablation); each violation of the
contract stops before the first training step with one message naming the class, the
argument, what was given, what is allowed and the fix (pinned here); and README.md's
"Your own model" example runs exactly as printed.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from grokedge.adapters import FunctionalAdapter
from grokedge.analysis.probe_targets import probe_data
from grokedge.analysis.subsets import fixed_subset, loader_batches
from grokedge.analysis_log import read_analyses
from grokedge.batch import named_batch, token_labels
from grokedge.callbacks import AblationCallback, ClassCallback, GramCallback, ProbeCallback
from grokedge.functional import check_trace
from grokedge.models.trace import ModelTrace

REPO = Path(__file__).resolve().parents[1]
P = 11  # (a + b) mod P: small enough for a few-second run
HIDDEN = 24

pytestmark = pytest.mark.filterwarnings("ignore", category=ConvergenceWarning)


# --------------------------------------------------------------------------- a classifier


class SumMLP(L.LightningModule):
    """(a + b) mod P from x [B, 2]: logits [B, P]; ``net.3`` is the hidden state [B, d]."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Embedding(P, 8), nn.Flatten(), nn.Linear(16, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, P)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict, i: int) -> torch.Tensor:
        return F.cross_entropy(self(batch["x"]), batch["labels"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=1.0)


def _pairs() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.cartesian_prod(torch.arange(P), torch.arange(P))
    return x, x.sum(1) % P


class SumData(L.LightningDataModule):
    """Dict batches ``{"x": [B, 2], "labels": [B]}``; ``targets`` overrides probe_targets."""

    def __init__(self, labels=None, targets=None, probe: bool = True) -> None:
        super().__init__()
        x, y = _pairs()
        self.rows = [
            {"x": x[i], "labels": y[i] if labels is None else labels(y[i])} for i in range(len(x))
        ]
        self.targets = targets
        if not probe:
            self.probe_targets = None

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.rows, batch_size=32, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.rows, batch_size=64)

    def probe_targets(self, batch: dict) -> dict:
        if self.targets is not None:
            return self.targets(batch)
        return {"a": batch["x"][:, 0], "b": batch["x"][:, 1]}


def _fit(module: L.LightningModule, data: L.LightningDataModule, callbacks: list, root: Path):
    L.Trainer(
        max_steps=20,
        accelerator="cpu",
        callbacks=callbacks,
        logger=False,
        default_root_dir=root,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module, datamodule=data)


def _adapted(**kwargs) -> SumMLP:
    torch.manual_seed(0)
    kwargs.setdefault("inputs", ["x"])
    kwargs.setdefault("hidden", "net.3")
    return FunctionalAdapter.attach(SumMLP(), F.cross_entropy, **kwargs)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- [B] and [B, d]


def test_classifier_evaluate_and_trace_against_direct_computation():
    module = _adapted()
    x, y = _pairs()
    batch = {"x": x, "labels": y}
    with torch.no_grad():
        logits = module.net(x)
        result = module.evaluate({}, batch)
        assert result.logits.shape == (len(x), 1, P)
        torch.testing.assert_close(result.logits[:, 0], logits)
        assert float(result.loss) == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-6)
        direct_acc = sum(int(logits[i].argmax()) == int(y[i]) for i in range(len(y))) / len(y)
        assert float(result.acc) == pytest.approx(direct_acc)
        hidden = module.trace({}, batch).hidden
        assert len(hidden) == 1 and hidden[0].shape == (len(x), 1, HIDDEN)
        torch.testing.assert_close(hidden[0][:, 0], module.net[:4](x))
        # params in place: a halved last layer changes the logits exactly as computed
        half = {"4.weight": module.net[4].weight * 0.5}
        moved = module.evaluate(half, batch).logits[:, 0]
        torch.testing.assert_close(
            moved, F.linear(module.net[:4](x), half["4.weight"], module.net[4].bias)
        )


def test_probe_samples_of_one_vector_per_row_equal_the_explicit_layout():
    x, y = _pairs()
    batch = {"x": x, "labels": y}
    hidden = torch.randn(len(x), HIDDEN)
    flat = probe_data(None, _adapted(), batch, hidden, x[:, 0])
    explicit = probe_data(
        None, _adapted(), {"x": x, "labels": y[:, None]}, hidden[:, None], x[:, :1]
    )
    assert len(flat.targets) == len(x)  # one sample per row
    for field in ("features", "targets", "groups", "weights"):
        assert (getattr(flat, field) == getattr(explicit, field)).all()
    assert (flat.features == hidden.numpy()).all()


def test_labels_b_and_hidden_b_d_run_probes_classes_and_ablation(tmp_path, one_thread):
    module = _adapted()
    every = {"every": 10, "n_sequences": 64, "background": False}
    callbacks = [
        GramCallback(select="all", interval=5),
        AblationCallback(n_random=2, **every),
        ProbeCallback(folds=2, kinds=["linear", "quadratic"], **every),
        ClassCallback(n_sequences=64, folds=2),
    ]
    _fit(module, SumData(), callbacks, tmp_path)
    rows = read_analyses(tmp_path)
    by: dict[str, list] = {}
    for row in rows:
        by.setdefault(row["analysis"], []).append(row)
    assert [r["step"] for r in by["probe"]] == [10, 20]
    assert [r["step"] for r in by["ablation"]] == [10, 20]
    probe = by["probe"][-1]
    assert probe["n_samples"] == probe["n_rows"] == 64  # one position per row
    for target in ("a", "b"):
        for kind in ("linear", "quadratic"):
            assert math.isfinite(probe["scores"][target][kind]["mean"])
    classes = by["classes"][-1]
    assert classes["step"] == 20
    assert math.isfinite(classes["functional_r2"])
    assert classes["n_positions"] == 64  # one position per row
    assert set(classes["functional_r2_by_target"]) == {"a", "b"}
    assert math.isfinite(by["ablation"][-1]["base_loss"])


def test_a_trace_of_ones_own_may_return_b_d(tmp_path):
    module = _adapted()
    x, y = _pairs()
    module.trace = lambda params, batch: ModelTrace(hidden=[module.net[:4](batch["x"])])
    trace = check_trace(module, {"x": x, "labels": y}, "callbacks.probe", block=-1)
    assert trace.hidden[0].shape == (len(x), HIDDEN)


# --------------------------------------------------------------------------- the messages


def _refused(module, data, callbacks, tmp_path) -> str:
    with pytest.raises(ValueError) as info:
        _fit(module, data, callbacks, tmp_path)
    assert module.global_step == 0  # before training
    return str(info.value)


def _probe() -> ProbeCallback:
    return ProbeCallback(every=10, n_sequences=32, folds=2, background=False)


def test_labels_of_rank_three_are_refused_before_training(tmp_path):
    data = SumData(labels=lambda y: y.expand(2, 3))
    message = _refused(_adapted(), data, [_probe()], tmp_path)
    assert message == (
        "evaluation batch 0 (val_dataloader): labels has shape [64, 2, 3]; allowed: [B] (a "
        "classifier) or [B, T] (one label per position, -100 where none); fix: one class "
        "index per row or per position (e.g. labels.argmax(-1) for one-hot labels, "
        "labels.flatten(1) for several positions)"
    )


def test_one_hot_float_labels_are_refused_before_training(tmp_path):
    data = SumData(labels=lambda y: F.one_hot(y, P).float())
    message = _refused(_adapted(), data, [_probe()], tmp_path)
    assert message == (
        "evaluation batch 0 (val_dataloader): labels has dtype float32 (shape [64, 11]); "
        "allowed: integer class indices, [B] or [B, T]; fix: labels.long() (a regression "
        "target is not a label: give it as a probe target)"
    )


class TupleData(SumData):
    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*_pairs()), batch_size=64)


def test_tuple_batches_without_names_are_refused_before_training(tmp_path):
    message = _refused(_adapted(), TupleData(), [_probe()], tmp_path)
    assert message == (
        "evaluation batch 0 (val_dataloader) is a list of 2; allowed: a dict with 'labels' "
        "and the model's inputs, or a tuple whose positions are named; fix: "
        "FunctionalAdapter.attach(module, loss_fn, batch_keys=(... one name per position, "
        "'labels' among them))"
    )


def test_tuple_batches_are_named_by_batch_keys():
    module = _adapted(inputs=None, batch_keys=("x", "labels"))
    assert module.input_keys == ("x",) and module.batch_keys == ("x", "labels")
    loader = DataLoader(TensorDataset(*_pairs()), batch_size=64)
    batches = loader_batches(loader, module.batch_keys)
    x, y = _pairs()
    assert sorted(batches[0]) == ["labels", "x"]
    merged = fixed_subset(batches, None, 0)
    assert merged["labels"].shape == (len(y), 1)
    assert sorted(merged["labels"][:, 0].tolist()) == sorted(y.tolist())
    with pytest.raises(ValueError) as info:
        named_batch((x, y, y), ("x", "labels"), "a batch")
    assert str(info.value) == (
        "a batch is a tuple of 3 but batch_keys=('x', 'labels') names 2 positions; fix: one "
        "name per position"
    )


def test_adapter_arguments_are_refused_with_their_fix():
    with pytest.raises(ValueError) as info:
        FunctionalAdapter.attach(SumMLP(), batch_keys=("x", "y"))
    assert str(info.value) == (
        "FunctionalAdapter(batch_keys)=('x', 'y') is not allowed: one name per position of a "
        "tuple batch, 'labels' among them (e.g. ('x', 'labels') for TensorDataset(x, y))"
    )
    with pytest.raises(ValueError) as info:
        FunctionalAdapter.attach(SumMLP())
    assert str(info.value) == (
        "FunctionalAdapter: no inputs; allowed: inputs=[the batch keys module.forward takes, "
        "in order] or batch_keys=(names of a tuple batch's positions); fix: "
        "FunctionalAdapter.attach(module, loss_fn, inputs=('x',)) for dict batches "
        "{'x': ..., 'labels': ...}"
    )


def test_a_missing_input_key_is_refused_before_training(tmp_path):
    module = _adapted(inputs=["tokens"])
    message = _refused(module, SumData(), [_probe()], tmp_path)
    assert message.startswith(
        "ProbeCallback: SumMLP.trace(params, batch) on one evaluation batch raised "
        "ValueError: FunctionalAdapter(inputs=('tokens',)): the batch has no ['tokens'] (its "
        "keys: ['labels', 'weight', 'x']); fix: inputs=[the batch keys module.forward takes, "
        "in order];"
    )


def test_hidden_b_d_under_labels_b_t_is_refused_with_its_fix(tmp_path):
    data = SumData(labels=lambda y: y.expand(3))  # three labelled positions per row
    data.targets = lambda batch: {"a": batch["x"][:, :1].expand(-1, 3)}
    message = _refused(_adapted(), data, [_probe()], tmp_path)
    assert message == (
        "ProbeCallback: SumMLP.trace(params, batch) on one evaluation batch returned "
        "hidden[0] a tensor of shape [32, 24] (float32); expected a ModelTrace whose hidden "
        "is a list of float tensors [32, 3, d] (batch first, one vector per labelled "
        "position; [B, d] is read as [B, 1, d] only when the labels are [B]); fix: "
        "FunctionalAdapter.attach(..., hidden=...) naming blocks whose outputs are [B, T, d] "
        "(transpose a sequence-first [T, B, d]); a model with one hidden vector per row "
        "needs labels [B] (one label per row)"
    )


def test_probe_targets_of_the_wrong_shape_are_refused_before_training(tmp_path):
    data = SumData(targets=lambda batch: {"a": batch["x"]})  # [B, 2], not [B]
    message = _refused(_adapted(), data, [_probe()], tmp_path)
    assert message == (
        "ProbeCallback: SumData.probe_targets(batch): target 'a' has shape [32, 2]; "
        "allowed: a tensor of shape [32, 1] (the labels' shape) or [32], IGNORE_INDEX (-100) "
        "where a position has no value; fix: one value per labelled position, computed from "
        "the batch it is given"
    )


def test_a_data_module_without_probe_targets_is_refused_before_training(tmp_path):
    classes = ClassCallback(n_sequences=32, folds=2)
    message = _refused(
        _adapted(), SumData(probe=False), [GramCallback(select="all"), classes], tmp_path
    )
    assert message == (
        "ClassCallback: the DataModule (SumData) has no probe_targets(batch); allowed: a "
        "DataModule with probe_targets(batch) -> {name: tensor [B, T] aligned with the "
        "labels, or [B] for labels [B]}; fix: add that method (the task variables to probe, "
        "e.g. the operands of a sum) or leave this analysis out"
    )


def test_token_labels_keeps_b_t_and_reads_b_as_one_position():
    y = torch.tensor([3, -100, 5])
    assert token_labels(y).tolist() == [[3], [-100], [5]]
    two = torch.tensor([[1, 2], [3, -100]])
    assert token_labels(two) is two


# --------------------------------------------------------------------------- the README


def _readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Your own model\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section holds exactly one python example"
    return blocks[0]


def test_readme_example_is_short_and_not_a_transformer():
    code = _readme_example()
    assert len(code.splitlines()) <= 40
    assert "Transformer" not in code and "Attention" not in code
    assert 'if __name__ == "__main__":' in code
    assert "AdamW" in code and "weight_decay=1.0" in code


def test_readme_example_runs_as_printed(tmp_path):
    script = tmp_path / "own_model.py"
    script.write_text(_readme_example())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run(
        [sys.executable, script.name],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "analyses.jsonl").open()]
    steps: dict[str, list[int]] = {}
    for row in rows:
        steps.setdefault(row["analysis"], []).append(row["step"])
    assert steps == {"ablation": [100, 200, 300], "perturbation": [100, 200, 300],
                     "probe": [100, 200, 300]}  # fmt: skip
    probe = [r for r in rows if r["analysis"] == "probe"][-1]
    assert set(probe["scores"]) == {"a", "b"} and probe["n_samples"] == probe["n_rows"]
    assert all(math.isfinite(r["base_loss"]) for r in rows if r["analysis"] == "ablation")
