"""Probes (grouped cross-validation) and attention entropy against known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning

from grokedge.analysis.probe_targets import probe_data
from grokedge.analysis.subsets import fixed_subset
from grokedge.experiments.attention_stats import attention_entropies, attention_entropy
from grokedge.experiments.probes import (
    ProbeConfig,
    StringGroups,
    functional_r2,
    hidden_states_and_targets,
    probe_splits,
    row_strings,
    score_probes,
)
from grokedge.models import CausalTransformer
from grokedge.tasks.dyck import DyckDataModule

# Tiny synthetic sets stop the MLP at max_iter before early stopping does; harmless here.
pytestmark = pytest.mark.filterwarnings("ignore", category=ConvergenceWarning)

N_GROUPS, PER_GROUP, DIM = 40, 10, 4


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(N_GROUPS), PER_GROUP)
    x = rng.normal(size=(N_GROUPS * PER_GROUP, DIM))
    return rng, x, groups


# ---------------------------------------------------------------------------- splits


def test_grouped_folds_never_split_a_sequence():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(23), rng.integers(1, 12, size=23))  # uneven sequence lengths
    rng.shuffle(groups)  # positions of a sequence need not be contiguous
    splits = probe_splits(groups, folds=5, seed=3)
    assert len(splits) == 5
    tested = np.concatenate([test for _, test in splits])
    assert np.array_equal(np.sort(tested), np.arange(len(groups)))  # each sample tested once
    for train, test in splits:
        assert not set(groups[train]) & set(groups[test])
        assert len(train) + len(test) == len(groups)
    # Reproducible from the seed; another seed assigns groups differently.
    again = probe_splits(groups, folds=5, seed=3)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(splits, again, strict=True))
    other = probe_splits(groups, folds=5, seed=4)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(splits, other, strict=True))
    with pytest.raises(ValueError, match="folds"):
        probe_splits(np.zeros(10), folds=5)


def test_paper_split_is_one_random_split_of_positions(data):
    _, _, groups = data
    (train, test), *rest = probe_splits(groups, protocol="paper_split", seed=0)
    assert not rest
    assert len(test) == round(0.3 * len(groups))
    assert set(groups[train]) & set(groups[test])  # sequences straddle it: the paper's leak
    with pytest.raises(ValueError, match="protocol"):
        probe_splits(groups, protocol="nope")


def test_grouping_stops_the_probe_reading_sequence_identity():
    """Target constant per sequence, features = a per-sequence code: only a leak predicts it."""
    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(N_GROUPS), PER_GROUP)
    codes, values = rng.normal(size=(N_GROUPS, 64)), rng.normal(size=N_GROUPS)
    x = codes[groups] + 0.05 * rng.normal(size=(len(groups), 64))
    y = values[groups]
    grouped = score_probes(x, y, groups, kinds=("linear",))["linear"]
    paper = score_probes(x, y, groups, kinds=("linear",), protocol="paper_split")["linear"]
    assert paper.mean > 0.95  # positions of a test sequence were seen in training
    assert grouped.mean < 0.1  # unseen sequences: nothing to read
    assert len(paper.per_fold) == 1 and math.isnan(paper.sd)


# ---------------------------------------------------------------------------- probes


def test_probes_recover_a_linear_target(data):
    rng, x, groups = data
    y = x @ np.array([1.0, -2.0, 0.5, 0.3]) + 0.01 * rng.normal(size=len(x))
    scores = score_probes(torch.from_numpy(x).float(), torch.from_numpy(y), groups)
    assert set(scores) == {"linear", "quadratic", "mlp"}
    assert scores["linear"].mean > 0.999
    assert scores["quadratic"].mean > 0.99
    assert scores["mlp"].mean > 0.9
    assert len(scores["linear"].per_fold) == 5 and scores["linear"].sd >= 0
    assert scores["linear"].mean == pytest.approx(np.mean(scores["linear"].per_fold))


def test_quadratic_probe_beats_linear_on_quadratic_targets(data):
    _, x, groups = data
    product = score_probes(x, x[:, 0] * x[:, 1], groups, kinds=("linear", "quadratic"))
    assert product["quadratic"].mean > 0.95 and product["linear"].mean < 0.1
    # Squares are in by default; the products-only reading cannot fit x0².
    square = x[:, 0] ** 2
    assert score_probes(x, square, groups, kinds=("quadratic",))["quadratic"].mean > 0.95
    products_only = ProbeConfig(quadratic_interaction_only=True)
    only = score_probes(x, square, groups, kinds=("quadratic",), config=products_only)
    assert only["quadratic"].mean < 0.1


def test_probes_find_nothing_in_noise(data):
    rng, x, groups = data
    scores = score_probes(x, rng.normal(size=len(x)), groups)
    for kind, score in scores.items():
        assert score.mean < 0.05, kind


def test_sample_weights_reach_fit_and_score(data):
    """Zero-weight rows of garbage change nothing; unweighted they spoil the fit."""
    rng, x, groups = data
    y = x @ np.array([1.0, -2.0, 0.5, 0.3])
    weight = np.ones(len(y))
    bad = groups % 4 == 0  # every fourth sequence is garbage
    y_bad = np.where(bad, 50 * rng.normal(size=len(y)), y)
    weight[bad] = 0.0
    weighted = score_probes(x, y_bad, groups, sample_weight=weight)
    assert weighted["linear"].mean > 0.999 and weighted["quadratic"].mean > 0.99
    assert weighted["mlp"].mean > 0.8
    assert score_probes(x, y_bad, groups, kinds=("linear",))["linear"].mean < 0.5


def test_functional_r2(data):
    rng, x, groups = data
    depth = rng.integers(0, 13, size=len(x)).astype(float)
    direction = rng.normal(size=DIM)
    # The hidden change along the edge encodes depth (tiny, as for ε = 0.005‖θ‖) ...
    moved = x + 1e-4 * np.outer(depth, direction) + 1e-7 * rng.normal(size=x.shape)
    assert functional_r2(x, moved, depth, groups).mean > 0.99
    # ... or does not.
    unrelated = x + 1e-4 * rng.normal(size=x.shape)
    assert functional_r2(x, unrelated, depth, groups).mean < 0.05


def test_hidden_states_and_targets_selects_labelled_positions():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    labels = torch.tensor([[0, 1, -100], [1, 2, 1]])
    weight = torch.tensor([2.0, 1.0])
    data = hidden_states_and_targets(hidden, labels, weight, string_ids=StringGroups(start=7))
    assert np.array_equal(data.features, hidden.view(6, 2)[[0, 1, 3, 4, 5]].numpy())
    assert np.array_equal(data.targets, [0, 1, 1, 2, 1])
    assert np.array_equal(data.groups, [7, 7, 8, 8, 8])
    assert np.array_equal(data.weights, [2, 2, 1, 1, 1])
    unweighted = hidden_states_and_targets(hidden, labels)
    assert np.array_equal(unweighted.weights, np.ones(5)) and unweighted.groups[0] == 0


# ---------------------------------------------------------------------------- string groups


def test_row_strings_read_the_tokens_not_the_padding():
    """Equal token content, equal key, whatever the padding's width and id."""
    labels = torch.tensor([[1, 2, -100, -100], [1, 0, 1, 0], [1, 2, -100, -100]])
    tokens = torch.tensor([[0, 0, 2, 2], [0, 1, 0, 1], [0, 0, 0, 0]])  # rows 0, 2: "(("
    src = torch.tensor([[5, 0, 0], [5, 6, 0], [5, 0, 0]])
    keys = row_strings(labels, [tokens])
    assert keys[0] == keys[2] and keys[0] != keys[1]
    # Another batch, another width: row 0 again, and "((" with the source of row 1.
    labels2 = torch.tensor([[1, 2], [1, 2]])
    tokens2, src2 = torch.tensor([[0, 0], [0, 0]]), torch.tensor([[5], [5]])
    assert row_strings(labels2, [tokens2])[0] == keys[0]
    both = row_strings(labels, [tokens], [src])
    assert both[0] == both[2] and row_strings(labels2, [tokens2], [src2])[0] == both[0]
    src2 = torch.tensor([[5, 0, 0, 0], [5, 6, 0, 0]])
    assert row_strings(labels2, [tokens2], [src2])[1] not in both  # "((" with source 5 6
    with pytest.raises(ValueError, match="input"):
        row_strings(labels)
    with pytest.raises(ValueError, match="aligned"):
        row_strings(labels, [tokens[:, :3]])


def test_string_groups_join_duplicate_rows_across_batches():
    """Duplicate rows share a group, distinct rows never do, over concatenated batches."""
    texts = [["()", "(())", "()", "()()"], ["(())", "((()))", "()", "((()))"]]
    ids, datas = StringGroups(), []
    for batch_texts in texts:
        width = max(len(t) for t in batch_texts) + 1  # one column of padding at least
        tokens = torch.full((len(batch_texts), width), 2)
        labels = torch.full((len(batch_texts), width), -100)
        for r, text in enumerate(batch_texts):
            tokens[r, : len(text)] = torch.tensor([0 if c == "(" else 1 for c in text])
            labels[r, : len(text)] = 1
        hidden = torch.randn(len(batch_texts), width, 3)
        strings = row_strings(labels, [tokens])
        datas.append(hidden_states_and_targets(hidden, labels, None, strings, ids))
    groups = np.concatenate([d.groups for d in datas])
    text_of = [t for batch_texts in texts for t in batch_texts for _ in t]  # per position
    assert len(groups) == len(text_of)
    for i in range(len(groups)):
        for j in range(len(groups)):
            assert (groups[i] == groups[j]) == (text_of[i] == text_of[j])
    # Numbered by first appearance: "()" 0, "(())" 1, "()()" 2, "((()))" 3.
    assert [int(g) for g in dict.fromkeys(groups.tolist())] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="strings"):
        hidden_states_and_targets(hidden, labels, None, strings[:2])


def test_folds_never_split_a_string():
    """Brute force over every fold: no string on both sides, whatever rows hold it."""
    rng = np.random.default_rng(5)
    n_strings, rows = 15, 60
    texts = rng.integers(0, n_strings, size=rows)  # rows holding the same string repeatedly
    width = 6
    labels = torch.full((rows, width), -100)
    tokens = torch.zeros(rows, width, dtype=torch.long)
    for r, t in enumerate(texts.tolist()):
        length = 1 + t % width
        labels[r, :length] = 1
        tokens[r, :length] = t
    strings = row_strings(labels, [tokens])
    data = hidden_states_and_targets(torch.randn(rows, width, 2), labels, None, strings)
    row_of = np.repeat(np.arange(rows), (labels != -100).sum(dim=1).numpy())
    string_of = texts[row_of]
    assert len(np.unique(data.groups)) == len(np.unique(texts)) < rows
    for seed in range(3):
        for train, test in probe_splits(data.groups, folds=4, seed=seed):
            assert not set(string_of[train]) & set(string_of[test])
    # Grouped by row, copies of a string would straddle a fold (the leak fixed here).
    by_row = hidden_states_and_targets(torch.randn(rows, width, 2), labels).groups
    assert any(
        set(string_of[train]) & set(string_of[test])
        for train, test in probe_splits(by_row, folds=4, seed=0)
    )


def test_distinct_rows_keep_the_row_groups_and_scores(data):
    """All rows distinct: the string groups are the row indices, the R² bit for bit."""
    rng, x, _ = data
    rows, width = N_GROUPS, PER_GROUP
    tokens = torch.from_numpy(rng.permutation(rows)[:, None] + np.zeros(width, int))
    labels = torch.ones(rows, width, dtype=torch.long)
    hidden = torch.from_numpy(x.reshape(rows, width, DIM))
    target = torch.from_numpy(rng.integers(0, 5, size=(rows, width)))
    by_string = hidden_states_and_targets(hidden, target, None, row_strings(labels, [tokens]))
    by_row = hidden_states_and_targets(hidden, target)
    assert np.array_equal(by_string.groups, by_row.groups)
    assert np.array_equal(by_row.groups, np.repeat(np.arange(rows), width))
    kinds = ("linear", "quadratic")
    assert score_probes(*by_string[:3], kinds=kinds) == score_probes(*by_row[:3], kinds=kinds)


@pytest.mark.parametrize("deduplicate", [True, False])
def test_dyck_probe_groups_follow_the_strings(deduplicate: bool):
    """A real Dyck test subset: deduplicated rows keep their row groups and R² exactly;
    with ``deduplicate=false`` copies of a string are one group and never straddle a fold."""
    dm = DyckDataModule(ood_sequences=0, n_sequences=1050, deduplicate=deduplicate)
    dm.setup()
    batch = fixed_subset(list(dm.val_dataloader()[0]), 300, seed=0)
    torch.manual_seed(0)
    net = CausalTransformer(vocab_size=3, num_classes=13, max_len=24, d_model=16).eval()
    with torch.no_grad():
        _, trace = net(batch["tokens"], return_trace=True)
    hidden, labels = trace.hidden[-1], batch["labels"]
    data = probe_data(dm, net, batch, hidden, labels)
    by_row = hidden_states_and_targets(hidden, labels, batch["weight"])  # the old grouping
    valid = labels != -100
    texts = [tuple(row[ok].tolist()) for row, ok in zip(batch["tokens"], valid, strict=True)]
    string_of = np.array([hash(t) for t in texts])[by_row.groups]  # per position
    assert np.array_equal(data.features, by_row.features)
    assert np.array_equal(data.weights, by_row.weights)
    if deduplicate:
        assert len(set(texts)) == len(texts)
        assert np.array_equal(data.groups, by_row.groups)
        args = (data.features, data.targets)
        kinds = ("linear",)
        new = score_probes(*args, data.groups, kinds, 3, sample_weight=data.weights)
        old = score_probes(*args, by_row.groups, kinds, 3, sample_weight=by_row.weights)
        assert new == old
        return
    assert len(set(texts)) < len(texts) == 300  # one row per sequence, copies among them
    assert len(np.unique(data.groups)) == len(set(texts))
    for train, test in probe_splits(data.groups, folds=3, seed=0):
        assert not set(string_of[train]) & set(string_of[test])
    assert any(  # the row grouping leaked copies across the folds
        set(string_of[train]) & set(string_of[test])
        for train, test in probe_splits(by_row.groups, folds=3, seed=0)
    )


# ---------------------------------------------------------------------------- attention


def uniform_causal(batch: int, heads: int, length: int) -> torch.Tensor:
    counts = torch.arange(1, length + 1, dtype=torch.float64)[:, None]
    rows = torch.ones(length, length, dtype=torch.float64).tril() / counts
    return rows.expand(batch, heads, length, length)


def test_entropy_of_uniform_causal_attention_is_mean_log_t():
    length = 24
    expected = math.lgamma(length + 1) / length  # mean of ln t over t = 1..24
    assert expected == pytest.approx(2.28, abs=0.005)  # the paper's "uniform" value
    attn = uniform_causal(3, 4, length)
    valid = torch.ones(3, length, dtype=torch.bool)
    assert attention_entropy(attn, valid) == pytest.approx(expected, rel=1e-12)
    per = attention_entropies([attn, attn], valid)
    assert per.shape == (2, 4) and torch.allclose(
        per, torch.full((2, 4), expected, dtype=torch.float64)
    )
    # Valid queries only, weighted by row: row 0 has 5 valid queries (weight 2), row 1 has 24.
    valid[0, 5:] = False
    weighted = attention_entropy(attn[:2], valid[:2], torch.tensor([2.0, 1.0]))
    by_hand = (2 * sum(math.log(t) for t in range(1, 6)) + math.lgamma(25)) / (2 * 5 + 24)
    assert weighted == pytest.approx(by_hand, rel=1e-12)
    # One-hot attention has zero entropy.
    one_hot = torch.eye(length).expand(1, 1, length, length)
    assert attention_entropy(one_hot, torch.ones(1, length, dtype=torch.bool)) == 0.0


def test_entropy_of_a_model_with_constant_scores():
    """Zero query/key projections give equal scores: the model's attention is uniform causal."""
    length = 24
    torch.manual_seed(0)
    net = CausalTransformer(vocab_size=3, num_classes=4, max_len=length, d_model=8, n_layers=2)
    with torch.no_grad():
        for block in net.blocks:
            block.attn.in_proj_weight[: 2 * 8].zero_()
            block.attn.in_proj_bias.zero_()
    tokens = torch.randint(0, 3, (2, length))
    _, trace = net(tokens, return_trace=True)
    valid = torch.ones(2, length, dtype=torch.bool)
    expected = math.lgamma(length + 1) / length
    assert attention_entropy(trace.attn, valid) == pytest.approx(expected, rel=1e-5)
