"""GrokModule: functional evaluation, weighted metrics, grok detection."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from grokedge.models import CausalTransformer
from grokedge.module import GrokModule, grok_step_of, grok_steps, token_stats
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


def brute_force_grok_step(
    history: list[tuple[int, float]], threshold: float, patience: int
) -> int | None:
    """The first evaluation i such that evaluations i .. i + patience − 1 all reach the
    threshold (float32, as the metric), by checking every i."""
    values = np.asarray([v for _, v in history], dtype=np.float32)
    bar = np.float32(threshold)
    for i in range(len(history) - patience + 1):
        if all(values[i : i + patience] >= bar):
            return history[i][0]
    return None


HAND_MADE = [
    (100, 0.50),
    (200, 0.91),  # one evaluation >= 0.90 ...
    (300, 0.89),  # ... then below: a patience of 3 must start again
    (400, 0.95),
    (500, 0.96),
    (600, 0.94),
    (700, 0.99),
    (800, 0.995),
    (900, 0.991),
    (1000, float(torch.tensor(475.0) / torch.tensor(500.0))),  # exactly 95 % in float32
]


def test_grok_step_of_a_hand_made_history() -> None:
    # Read off the table by hand: >= 0.90 first at 200; three in a row from 400 (0.95,
    # 0.96, 0.94); >= 0.95 first at 400, three in a row from 700; >= 0.99 first at 700
    # and three in a row from 700 too.
    expected = {
        "0.90/1": 200,
        "0.90/3": 400,
        "0.95/1": 400,
        "0.95/3": 700,
        "0.99/1": 700,
        "0.99/3": 700,
    }
    assert grok_steps(HAND_MADE, [0.90, 0.95, 0.99], [1, 3]) == expected
    for key, step in expected.items():
        threshold, patience = float(key.split("/")[0]), int(key.split("/")[1])
        assert brute_force_grok_step(HAND_MADE, threshold, patience) == step
    # 475/500 in float32 (0.949999988) meets 0.95, as the run's own detection has it.
    assert grok_step_of([(1000, HAND_MADE[-1][1])], 0.95, 1) == 1000
    assert grok_step_of(HAND_MADE, 0.999, 1) is None
    assert grok_step_of([], 0.5, 1) is None


def test_grok_step_of_random_histories_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(0, 15))
        # Values on a coarse grid, so that ties with the thresholds happen.
        values = rng.choice([0.5, 0.89, 0.9, 0.93, 0.95, 0.97, 0.99, 1.0], size=n)
        history = [(100 * (i + 1), float(np.float32(v))) for i, v in enumerate(values)]
        for threshold in (0.9, 0.95, 0.99):
            for patience in (1, 2, 3, 5):
                expected = brute_force_grok_step(history, threshold, patience)
                assert grok_step_of(history, threshold, patience) == expected


def test_grok_steps_include_the_modules_own_grok_step_and_survive_a_checkpoint() -> None:
    """The module records every evaluation (also after its grok step); its grok step is
    grok_steps' entry for its own threshold and patience; the history round-trips
    through the checkpoint, and an evaluation repeated at a recorded step replaces it."""
    module = make_module(grok_threshold=0.95, grok_patience=3)
    module.log_scalars = lambda values: None  # no trainer attached here
    for step, acc in HAND_MADE[:6]:
        module._detect_grok({"test/acc": torch.tensor(acc)}, step)
        module._detect_grok({"train/acc": torch.tensor(1.0)}, step)  # not the grok metric
    ckpt: dict = {}
    module.on_save_checkpoint(ckpt)
    resumed = make_module(grok_threshold=0.95, grok_patience=3)
    resumed.log_scalars = lambda values: None
    resumed.on_load_checkpoint(ckpt)
    # The resumed run evaluates again at the checkpoint's step, then goes on.
    for step, acc in HAND_MADE[5:]:
        resumed._detect_grok({"test/acc": torch.tensor(acc)}, step)
    for step, acc in HAND_MADE[6:]:
        module._detect_grok({"test/acc": torch.tensor(acc)}, step)
    assert [s for s, _ in resumed.grok_history] == [s for s, _ in HAND_MADE]
    assert resumed.grok_history == module.grok_history
    alternatives = ([0.90, 0.95, 0.99], [1, 3])
    assert resumed.grok_steps(*alternatives) == module.grok_steps(*alternatives)
    assert module.grok_steps(*alternatives)["0.95/3"] == module.grok_step == 700
