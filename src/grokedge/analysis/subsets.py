"""Fixed evaluation subsets of a task's evaluation batches (no Lightning).

:func:`fixed_subset` draws a fixed, seeded subset of a set of (possibly deduplicated,
weighted) batches and merges it into one batch sorted by labelled length;
:func:`loader_batches` reads an evaluation loader's batches without touching the global
random state. The analysis callbacks (``grokedge.callbacks``) evaluate on these.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from grokedge.batch import IGNORE_INDEX, LABELS, Batch, labelled_length, named_batch, token_labels

SEQUENCES, ROWS = "sequences", "rows"
SAMPLE_UNITS = (SEQUENCES, ROWS)
"""How :func:`fixed_subset` counts ``n``: original sequences or distinct rows."""


def _rows_of(batches: Iterable[Batch]) -> tuple[list[Batch], list[tuple[int, int]], Tensor]:
    kept, where, weights = [], [], []
    for b, raw in enumerate(batches):
        what = f"evaluation batch {b} (val_dataloader)"
        batch = {k: v for k, v in named_batch(raw, None, what).items() if isinstance(v, Tensor)}
        if LABELS not in batch:
            raise ValueError(
                f"{what} has no 'labels' (its keys: {sorted(batch)}); allowed: a dict with "
                "'labels' [B] or [B, T] and the model's inputs; fix: name the labels 'labels' "
                "(a tuple batch: FunctionalAdapter.attach(..., batch_keys=(..., 'labels')))"
            )
        # The analyses read [B, T] labels: a classifier's [B] is one position per row.
        batch[LABELS] = token_labels(batch[LABELS], what)
        kept.append(batch)
        n = batch["labels"].shape[0]
        w = batch.get("weight")
        w = torch.ones(n) if w is None else w.detach().to("cpu", torch.float64)
        where += [(b, r) for r in range(n)]
        weights.append(w.to(torch.float64))
    return kept, where, torch.cat(weights) if weights else torch.zeros(0, dtype=torch.float64)


def fixed_subset(
    batches: Iterable[Batch],
    n: int | None,
    seed: int,
    unit: str = SEQUENCES,
    pad_id: int = 0,
) -> Batch:
    """A fixed, seeded evaluation subset of a set of batches, merged into one batch.

    Evaluation batches may hold *deduplicated* rows: a row of ``weight`` w stands for w
    identical sequences (Dyck's 5,000 test sequences are ~2,200 rows). Two ways to draw:

    - ``unit="sequences"`` (default): ``n`` of the *original* sequences (Σ weight of them)
      without replacement, deduplicated again: each drawn row gets as weight the number of
      its copies drawn. This is "n test sequences" as the paper evaluates them, at the
      cost of the distinct rows only. Needs integral weights (else rows are drawn);
    - ``unit="rows"``: ``n`` distinct rows, each keeping its full-set multiplicity as
      weight (a weighted subset of the whole set's distribution).

    ``n=None`` or ``n`` at least the set's size: the whole set, weights unchanged. The draw
    uses its own CPU generator seeded ``seed`` (no global random state is touched).
    Rows are ordered by labelled length (stable; see
    :class:`grokedge.experiments.perturbation.BucketedEvaluate`); tensors of rank >= 2 are
    right-padded to the widest batch (``labels`` with ``IGNORE_INDEX``, the others with
    ``pad_id``, the task's padding id: right padding never changes a real position of a
    causal encoder or decoder, and the seq2seq encoder masks ``pad_id``).

    Every batch must be a dict with ``labels`` [B] or [B, T] (integer); [B] is read as
    [B, 1]. Anything else (a tuple batch :func:`loader_batches` did not name, no
    ``labels``, another rank) is one ValueError naming what was given and the fix.

    Returns:
        One batch: every key of the input batches, ``labels`` [B, T], ``weight`` [B]
        float32.
    """
    kept, where, weights = _rows_of(batches)
    if not where:
        raise ValueError("the evaluation set has no rows")
    generator = torch.Generator().manual_seed(int(seed))
    total_rows = len(where)
    integral = bool(torch.all(weights == weights.round())) and bool(torch.all(weights >= 0))
    if n is None:
        chosen, new_weight = torch.arange(total_rows), weights
    elif unit == SEQUENCES and integral:
        counts = weights.round().long()
        total = int(counts.sum())
        if n >= total:
            chosen, new_weight = torch.arange(total_rows), weights
        else:
            owner = torch.repeat_interleave(torch.arange(total_rows), counts)
            drawn = owner[torch.randperm(total, generator=generator)[:n]]
            per_row = torch.bincount(drawn, minlength=total_rows)
            chosen = per_row.nonzero().squeeze(1)
            new_weight = per_row[chosen].to(torch.float64)
    else:
        if n >= total_rows:
            chosen, new_weight = torch.arange(total_rows), weights
        else:
            chosen = torch.randperm(total_rows, generator=generator)[:n].sort().values
            new_weight = weights[chosen]

    picked = [where[i] for i in chosen.tolist()]
    # Rows by labelled length (stable): length buckets are then contiguous row ranges.
    lengths = [labelled_length(kept[b]["labels"][r]) for b, r in picked]
    order = sorted(range(len(picked)), key=lambda i: lengths[i])
    picked = [picked[i] for i in order]
    new_weight = new_weight[torch.tensor(order, dtype=torch.long)]
    keys = [k for k in kept[0] if all(k in b for b in kept)]
    out: Batch = {}
    for key in keys:
        width = max(int(b[key].shape[1]) for b in kept) if kept[0][key].ndim >= 2 else None
        parts = []
        for b_idx, r in picked:
            part = kept[b_idx][key][r : r + 1]
            if width is not None and part.shape[1] < width:
                fill = IGNORE_INDEX if key == "labels" else pad_id
                pad = part.new_full((1, width - part.shape[1], *part.shape[2:]), fill)
                part = torch.cat([part, pad], dim=1)
            parts.append(part)
        out[key] = torch.cat(parts)
    out["weight"] = new_weight.to(torch.float32)
    return out


def loader_batches(loader: Any, keys: tuple[str, ...] | None = None) -> list[Batch]:
    """The batches of an evaluation loader: read from its map-style dataset of pre-built
    batches when it has one (no iteration: a DataLoader iterator draws a seed from the
    global random stream), else by iterating it. Tuple batches are named by ``keys``
    (the module's ``batch_keys``: ``FunctionalAdapter.attach(..., batch_keys=...)``);
    without ``keys`` they are returned as they are (:func:`fixed_subset` then names the
    fix)."""
    dataset = getattr(loader, "dataset", None)
    batches = None
    if getattr(loader, "batch_size", 0) is None and hasattr(dataset, "__getitem__"):
        try:
            batches = [dataset[i] for i in range(len(dataset))]
        except TypeError:  # not sized
            pass
    if batches is None:
        batches = list(loader)
    if keys is None:
        return batches
    return [named_batch(b, keys, f"evaluation batch {i}") for i, b in enumerate(batches)]
