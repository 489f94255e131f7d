"""A LightningModule grokedge did not write, under its causal analyses.

The example ``scripts/own_module.py`` (Lightning's demo Transformer + the
``grokedge.adapters.FunctionalAdapter``) run for a few dozen steps: every analysis of
``callbacks=full`` that applies writes rows with finite numbers. And the protocol checks
(``grokedge.functional``): a module without ``evaluate`` / ``trace``, or whose
``evaluate`` / ``trace`` answers in the wrong shape, stops before the first training step
with one message naming the callback's config key, what was expected and what came back.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from torch import nn

from grokedge.adapters import FunctionalAdapter
from grokedge.analysis.subsets import fixed_subset, loader_batches
from grokedge.analysis_log import read_analyses
from grokedge.callbacks import AblationCallback, GramCallback, ProbeCallback, WDRemovalCallback
from grokedge.functional import (
    EvalResult,
    FunctionalModel,
    TracedModel,
    check_evaluate,
    check_module_has,
    check_trace,
)
from grokedge.models import CausalTransformer
from grokedge.module import GrokModule
from grokedge.run_files import read_metrics
from grokedge.tasks.dyck import DyckDataModule

REPO = Path(__file__).resolve().parents[1]
STEPS = 30

pytestmark = pytest.mark.filterwarnings("ignore", category=ConvergenceWarning)


def _example():
    spec = importlib.util.spec_from_file_location("own_module", REPO / "scripts" / "own_module.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return _example()


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _finite(*values: float) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) for v in values)


# --------------------------------------------------------------------------- the example


def test_example_runs_every_analysis_on_the_demo_transformer(example, tmp_path, one_thread):
    out = example.main([str(tmp_path / "run"), "--steps", str(STEPS), "--threads", "1"])
    rows = read_analyses(out)
    by = {}
    for row in rows:
        by.setdefault(row["analysis"], []).append(row)
    for name in ("gram_spectrum", "edge_directions", "ablation", "perturbation", "probe"):
        assert by.get(name), f"no {name} rows in {sorted(by)}"
    assert {r["step"] for r in by["ablation"]} == {10, 20, 30}

    spectrum = by["gram_spectrum"][-1]
    assert _finite(*spectrum["sigma"]) and spectrum["sigma"][0] > 0
    direction = by["edge_directions"][-1]["directions"][0]
    assert _finite(direction["grad_frac"], direction["wd_frac"], direction["align"])

    ablation = by["ablation"][-1]
    assert _finite(ablation["base_acc"], ablation["base_loss"], ablation["edge"]["dacc"])
    assert _finite(ablation["v1"]["dloss"], *ablation["random_dacc"])
    assert 0 <= ablation["base_acc"] <= 1

    perturbation = by["perturbation"][-1]
    assert perturbation["sweep"] and all(
        _finite(r["loss"], r["kl"], r["delta_acc"]) for r in perturbation["sweep"]
    )
    curvature = perturbation["curvature"]
    assert curvature and all(_finite(c["fd"], c["hvp"]) for c in curvature)
    # The exact HVP through nn.MultiheadAttention (math kernel) agrees with the
    # paper's central difference.
    c = curvature[0]
    assert c["hvp"] == pytest.approx(c["fd"], rel=0.2, abs=1e-2)

    probe = by["probe"][-1]
    assert probe["primary"] == "next_value" and probe["n_samples"] > 0
    for target in ("next_value", "left"):
        assert _finite(*(s["mean"] for s in probe["scores"][target].values()))

    # The gap flow (exact HVP of the training loss) and the class run too.
    assert by.get("gap_flow") and _finite(by["gap_flow"][-1]["h_k"], by["gap_flow"][-1]["term2"])
    assert by.get("classes") and _finite(by["classes"][-1]["functional_r2"])

    metrics = {k for row in read_metrics(out) for k in row}
    for name in ("ablation/edge_dacc", "curvature/hvp_v1", "probe/linear_r2", "gram/sigma_1"):
        assert name in metrics

    # RunFiles made it a run directory as the CLI writes one: the report reads it.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps"] == STEPS
    from grokedge.reporting.discover import discover

    assert [run.path for run in discover(out).ok] == [out]


# --------------------------------------------------------------------------- the checks


def _fit(example, module, callbacks, tmp_path) -> None:
    """Five steps of the example's data with the Gram and ``callbacks``."""
    trainer = L.Trainer(
        max_steps=5,
        accelerator="cpu",
        default_root_dir=tmp_path,
        logger=False,
        callbacks=[GramCallback(interval=2, window=3, top_k=2), *callbacks],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=example.SortingData())


def _adapted(example):
    return FunctionalAdapter.attach(
        example.SortingTransformer(),
        F.nll_loss,
        inputs=("input", "decoder_input"),
        hidden="model.transformer.decoder.layers",
    )


def test_a_module_without_evaluate_fails_before_training(example, tmp_path):
    module = example.SortingTransformer()  # not adapted
    ablation = AblationCallback(n_sequences=16, every=2)
    with pytest.raises(ValueError) as info:
        _fit(example, module, [ablation], tmp_path)
    message = str(info.value)
    assert message.startswith("AblationCallback: the module (SortingTransformer) has no ")
    assert "evaluate(params, batch)" in message and "FunctionalAdapter.attach" in message
    assert "trace" not in message.split(";")[0]  # the ablation needs no hidden states
    assert module.global_step == 0
    assert isinstance(_adapted(example), FunctionalModel)
    assert not isinstance(module, FunctionalModel)


def test_a_module_without_hidden_states_fails_for_the_probe_only(example):
    module = FunctionalAdapter.attach(
        example.SortingTransformer(), F.nll_loss, inputs=("input", "decoder_input")
    )
    AblationCallback().check_module(module)  # evaluate is there
    WDRemovalCallback().check_module(module)  # off (no trigger): needs nothing
    with pytest.raises(ValueError, match=r"^ProbeCallback: .* has no trace\(params, batch\)"):
        ProbeCallback().check_module(module)
    with pytest.raises(ValueError, match=r"WDRemovalCallback: .* has no trace"):
        WDRemovalCallback(at_step=3).check_module(module)


def test_wrong_logit_shape_fails_on_the_first_batch_before_training(example, tmp_path):
    module = _adapted(example)
    adapter = module.functional_adapter

    def flat_logits(params, batch):  # the demo's raw [B·T, V] output, not [B, T, V]
        loss, acc, logits = adapter.evaluate(params, batch)
        return loss, acc, logits.flatten(0, 1)

    module.evaluate = flat_logits
    with pytest.raises(ValueError) as info:
        _fit(example, module, [AblationCallback(n_sequences=16, every=2)], tmp_path)
    message = str(info.value)
    assert message.startswith(
        "AblationCallback: SortingTransformer.evaluate(params, batch) on one evaluation "
        "batch returned logits a tensor of shape [128, 12] (float32); expected "
    )
    assert "logits: float tensor [16, 8, C]) for labels of shape [16, 8]" in message
    assert module.global_step == 0


def test_wrong_hidden_shape_fails_on_the_first_batch_before_training(example, tmp_path):
    module = _adapted(example)
    adapter = module.functional_adapter
    module.trace = lambda params, batch: type(adapter.trace(params, batch))(
        hidden=[h.transpose(0, 1) for h in adapter.trace(params, batch).hidden]
    )
    probe = ProbeCallback(n_sequences=16, every=2, folds=2)
    with pytest.raises(ValueError) as info:
        _fit(example, module, [probe], tmp_path)
    message = str(info.value)
    assert message.startswith("ProbeCallback: SortingTransformer.trace(params, batch)")
    assert "returned hidden[0] a tensor of shape [8, 16, 32] (float32)" in message
    assert "expected a ModelTrace whose hidden is a list of float tensors [16, 8, d]" in message
    assert module.global_step == 0


def test_weight_decay_removal_reads_out_an_adapted_module(example, tmp_path):
    """The interventions read hidden states through trace; the adapter captures no
    attention weights, so the attention entropy is left out, the rest is measured."""
    wd = WDRemovalCallback(at_step=2, every=2, n_sequences=32, folds=3)
    _fit(example, _adapted(example), [wd], tmp_path)
    rows = [r for r in read_analyses(tmp_path) if r["analysis"] == "wd_removal"]
    assert [r["step"] for r in rows] == [2, 4]
    measures = rows[-1]["measures"]
    assert _finite(measures["theta_norm"], measures["linear_r2"], measures["weight_decay"])
    assert "attn_entropy" not in measures


def test_checks_name_what_came_back(example):
    batch = fixed_subset(loader_batches(example.SortingData().val_dataloader()[0]), 4, 0)
    module = _adapted(example)
    result = check_evaluate(module, batch, "callbacks.x")
    assert isinstance(result, EvalResult) and result.logits.shape == (4, 8, 12)
    assert len(check_trace(module, batch, "callbacks.x", block=-1).hidden) == 2
    with pytest.raises(ValueError, match=r"callbacks\.x\.block=2 is not allowed"):
        check_trace(module, batch, "callbacks.x", block=2)

    module.evaluate = lambda params, batch: {"loss": 1.0}
    with pytest.raises(ValueError, match=r"^callbacks\.x: .* returned a dict; expected EvalResult"):
        check_evaluate(module, batch, "callbacks.x")
    live = module.functional_adapter.evaluate
    module.evaluate = lambda params, batch: live({}, batch)  # ignores params
    with pytest.raises(ValueError, match=r"ignores params: every parameter halved"):
        check_evaluate(module, batch, "callbacks.x")
    module.evaluate = lambda params, batch: (torch.tensor([1.0, 2.0]), 0.5, live({}, batch)[2])
    with pytest.raises(ValueError) as info:
        check_evaluate(module, batch, "callbacks.x")
    assert "returned loss a tensor of shape [2] (float32), acc a float;" in str(info.value)

    plain = nn.Linear(2, 2)
    with pytest.raises(ValueError) as info:
        check_module_has(plain, ("evaluate", "trace"), "callbacks.y")
    assert str(info.value).startswith(
        "callbacks.y: the module (Linear) has no evaluate(params, batch) -> EvalResult(loss, "
        "acc, logits) and no trace(params, batch) -> ModelTrace (hidden states per block) "
        "and no input_keys (the batch keys its network takes); expected"
    )


# --------------------------------------------------------------------------- the adapter


class PlainDyck(L.LightningModule):
    """A plain LightningModule around grokedge's own encoder (its network as ``net``)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, tokens):
        return self.net(tokens)


def test_adapter_matches_grok_module_on_weighted_dyck_rows():
    """Same network, same batch (deduplicated rows with multiplicities): the adapter's
    evaluate and trace equal GrokModule's, with and without params in place."""
    torch.manual_seed(0)
    dm = DyckDataModule(n_sequences=300, ood_sequences=0)
    dm.setup("fit")
    batch = fixed_subset(loader_batches(dm.val_dataloader()[0]), 200, 0)
    assert float(batch["weight"].max()) > 1  # some rows stand for several sequences
    net = CausalTransformer(**dm.model_dims()).eval()
    grok = GrokModule(net, torch.optim.AdamW)
    plain = FunctionalAdapter.attach(
        PlainDyck(net), F.cross_entropy, inputs="tokens", hidden="net.blocks"
    )
    assert isinstance(grok, FunctionalModel) and isinstance(grok, TracedModel)
    assert isinstance(plain, TracedModel) and plain.input_keys == grok.input_keys
    assert plain.n_blocks == len(net.blocks)
    name = "blocks.0.attn.in_proj_weight"
    moved = {name: dict(net.named_parameters())[name] * 0.7}
    with torch.no_grad():
        for params in ({}, moved):
            ours, theirs = plain.evaluate(params, batch), grok.evaluate(params, batch)
            assert float(ours.loss) == pytest.approx(float(theirs.loss), rel=1e-5)
            assert float(ours.acc) == pytest.approx(float(theirs.acc), rel=1e-6)
            torch.testing.assert_close(ours.logits, theirs.logits)
            hidden = plain.trace(params, batch).hidden
            expected = grok.trace(params, batch).hidden
            assert len(hidden) == len(expected)
            for a, b in zip(hidden, expected, strict=True):
                torch.testing.assert_close(a, b)
