"""GrokModule: functional evaluation, weighted metrics, grok detection."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from grokedge.models import CausalTransformer
from grokedge.module import GrokModule, token_stats
from grokedge.tasks.dyck import DyckDataModule


@pytest.fixture(scope="module")
def dyck() -> DyckDataModule:
    dm = DyckDataModule(ood_sequences=0)
    dm.setup()
    return dm


def make_module(**kw) -> GrokModule:
    torch.manual_seed(0)
    net = CausalTransformer(vocab_size=3, num_classes=13, max_len=24)
    return GrokModule(net, partial(torch.optim.AdamW, lr=1e-3), **kw)


def test_evaluate_matches_forward_and_leaves_the_model_alone(dyck) -> None:
    module = make_module()
    batch = dyck.sample_train_batch(0)
    params = dict(module.net.named_parameters())
    before = {k: v.detach().clone() for k, v in params.items()}
    same = module.evaluate({}, batch)
    torch.testing.assert_close(same.logits, module(batch))
    name = "blocks.0.attn.in_proj_weight"
    moved = module.evaluate({name: params[name] * 0}, batch)
    assert not torch.allclose(moved.logits, same.logits)
    for k, v in module.net.named_parameters():
        assert torch.equal(v, before[k])


def test_weighted_accuracy_equals_row_by_row_accuracy(dyck) -> None:
    """Deduplicated evaluation gives the plain figure exactly, not approximately."""
    module = make_module()
    plain = DyckDataModule(ood_sequences=0, deduplicate=False)
    plain.setup()

    def accuracy(loaders) -> float:
        correct = total = 0.0
        with torch.no_grad():
            for b in loaders[0]:
                s = token_stats(module(b), b["labels"], b["weight"])
                correct += float((s.correct * s.token_weight).sum())
                total += float(s.token_weight.sum())
        return correct / total

    # The plain path evaluates all 5,000 rows one by one; the figures must be identical.
    assert accuracy(dyck.val_dataloader()) == accuracy(plain.val_dataloader())


def test_an_accuracy_of_exactly_the_threshold_groks_in_float32() -> None:
    """475 / 500 correct is 0.949999988 in float32: exactly 95 %, so it meets 0.95."""
    torchmetrics_acc = torch.tensor(475.0) / torch.tensor(500.0)  # float32, as computed
    assert float(torchmetrics_acc) < 0.95  # what a float64 comparison would refuse
    module = make_module(grok_threshold=0.95)
    module.log_scalars = lambda values: None
    module._detect_grok({"test/acc": torch.tensor(474.0) / 500}, 100)
    assert module.grok_step is None
    module._detect_grok({"test/acc": torchmetrics_acc}, 200)
    assert module.grok_step == 200


def test_grok_detection_with_patience() -> None:
    module = make_module(grok_patience=2, grok_threshold=0.9)
    module.log_scalars = lambda values: None  # no trainer attached here
    for step, acc in zip((100, 200, 300, 400, 500), (0.95, 0.5, 0.91, 0.93, 0.99), strict=True):
        module._detect_grok({"test/acc": torch.tensor(acc)}, step)
    assert module.grok_step == 300  # the first of two consecutive evaluations >= 0.9
    ckpt: dict = {}
    module.on_save_checkpoint(ckpt)
    fresh = make_module()
    fresh.on_load_checkpoint(ckpt)
    assert fresh.grok_step == 300
