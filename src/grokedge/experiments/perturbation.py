"""ε-sweeps along edge directions (docs/theory.md §3, experiment 3).

θ_sel + ε v_k for ε on a symmetric grid and each direction v_k: loss, accuracy and
KL(base ‖ perturbed) of the output distributions. ε is *absolute* (parameter units along
a unit direction), as in the paper: 25 points in [−0.03, 0.03].

Evaluation goes through a :data:`FlatEvaluate` closure, ``(flat θ [p], batch) ->
(loss, acc, logits)``, so this module knows nothing of Lightning; :func:`flat_evaluator`
builds one from ``GrokModule.evaluate`` and a ``ParameterSelector``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grokedge.batch import IGNORE_INDEX, Batch, labelled_length
from grokedge.edge.selection import ParameterSelector

FlatEvaluate = Callable[[Tensor, Batch], tuple[Any, Any, Tensor]]
"""``(flat θ_sel [p], batch) -> (loss (scalar), acc (scalar), logits [B, T, C])``."""

DEFAULT_GRID_POINTS = 25
DEFAULT_MAX_ABS_EPS = 0.03
"""The paper's grid: 25 points in [−0.03, 0.03] (parameter units)."""


def epsilon_grid(n: int = DEFAULT_GRID_POINTS, max_abs: float = DEFAULT_MAX_ABS_EPS) -> list[float]:
    """``n`` evenly spaced ε in [−max_abs, max_abs]; an odd ``n`` includes exactly 0."""
    if n < 2 or max_abs <= 0:
        raise ValueError(f"need n >= 2 and max_abs > 0, got n={n}, max_abs={max_abs}")
    grid = torch.linspace(-max_abs, max_abs, n, dtype=torch.float64)
    if n % 2:
        grid[n // 2] = 0.0  # linspace's midpoint can be ±1e-18 rather than 0
    return grid.tolist()


def flat_evaluator(
    evaluate_params: Callable[[dict[str, Tensor], Batch], Any],
    selector: ParameterSelector,
    params: Mapping[str, Tensor] | nn.Module,
    dtype: torch.dtype | None = None,
) -> FlatEvaluate:
    """A :data:`FlatEvaluate` from a parameter-dict evaluation such as ``GrokModule.evaluate``.

    Args:
        evaluate_params: ``(params dict, batch) -> result`` with ``.loss``, ``.acc`` and
            ``.logits`` (``EvalResult``) or the 3-tuple ``(loss, acc, logits)``, e.g.
            ``module.evaluate`` (``grokedge.functional``).
        selector: layout of the flat vector.
        params: every parameter of the model (a module or ``dict(named_parameters())``);
            the unselected ones are held fixed at these values (detached).
        dtype: evaluate in this dtype (e.g. ``torch.float64`` for finite differences):
            the fixed parameters are cast once and the flat vector at every call. The
            model must have no floating buffers (grokedge's models have none).
    """
    source = dict(params.named_parameters()) if isinstance(params, nn.Module) else params
    fixed = {n: t.detach() if dtype is None else t.detach().to(dtype) for n, t in source.items()}

    def evaluate(flat: Tensor, batch: Batch) -> tuple[Any, Any, Tensor]:
        vec = flat if dtype is None else flat.to(dtype)
        result = evaluate_params(selector.functional_params(vec, fixed), batch)
        if hasattr(result, "logits"):
            return result.loss, result.acc, result.logits
        loss, acc, logits = result
        return loss, acc, logits

    return evaluate


def valid_positions(batch: Batch) -> Tensor:
    """[B, T] bool: positions with a label (``labels != IGNORE_INDEX``)."""
    return batch["labels"] != IGNORE_INDEX


def kl_divergence(
    base_logits: Tensor,
    perturbed_logits: Tensor,
    valid_mask: Tensor,
    weight: Tensor | None = None,
) -> float:
    """KL(p_base ‖ p_perturbed) in nats, averaged over valid positions.

    Per position Σ_c p_c (ln p_c − ln q_c) with p, q the softmaxes of the logits
    (computed in float64, clamped at 0 against round-off), then the mean over positions
    where ``valid_mask``, each weighted by its row's ``weight`` (multiplicity).

    Args:
        base_logits, perturbed_logits: [B, T, C] (any leading shape matching the mask).
        valid_mask: [B, T] bool.
        weight: [B] row weights; None = 1.
    Returns:
        The weighted mean KL; NaN if no position is valid.
    """
    if base_logits.shape != perturbed_logits.shape:
        raise ValueError(
            f"logit shapes differ: {list(base_logits.shape)} vs {list(perturbed_logits.shape)}"
        )
    log_p = F.log_softmax(base_logits.to(torch.float64), dim=-1)
    log_q = F.log_softmax(perturbed_logits.to(torch.float64), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)
    w = valid_mask.to(torch.float64)
    if weight is not None:
        w = w * weight.to(torch.float64).view(-1, *([1] * (w.ndim - 1)))
    total = w.sum()
    return float((kl * w).sum() / total) if total > 0 else float("nan")


def epsilon_sweep(
    evaluate: FlatEvaluate,
    theta: Tensor,
    directions: Tensor,
    grid: Sequence[float],
    batch: Batch,
) -> list[dict[str, float]]:
    """Evaluate θ + ε v_k for every direction and ε; one row per (k, ε).

    Args:
        evaluate: ``(flat θ [p], batch) -> (loss, acc, logits)``.
        theta: [p] the current selected parameters.
        directions: [k, p] (unit) directions, e.g. ``EdgeState.vectors``.
        grid: ε values (parameter units), e.g. :func:`epsilon_grid`.
        batch: evaluation batch (``labels`` marks valid positions, ``weight`` if present
            weights rows in the KL).
    Returns:
        Rows ``{"direction": k (1-based), "epsilon", "loss", "acc", "kl", "delta_loss",
        "delta_acc"}``; ``kl`` = KL(base ‖ perturbed) of :func:`kl_divergence`, the deltas
        perturbed − base.
    """
    if directions.ndim != 2 or directions.shape[1] != theta.shape[0]:
        raise ValueError(f"directions must be [k, {theta.shape[0]}], got {list(directions.shape)}")
    mask, weight = valid_positions(batch), batch.get("weight")
    rows = []
    with torch.no_grad():
        base_loss, base_acc, base_logits = evaluate(theta, batch)
        base_loss, base_acc = float(base_loss), float(base_acc)
        for k, v in enumerate(directions, start=1):
            v = v.to(theta.dtype)
            for eps in grid:
                if eps == 0.0:  # θ + 0·v is θ bit for bit: the base evaluation, shared
                    loss, acc, logits = base_loss, base_acc, base_logits
                else:
                    loss, acc, logits = evaluate(theta + eps * v, batch)
                rows.append(
                    {
                        "direction": k,
                        "epsilon": float(eps),
                        "loss": float(loss),
                        "acc": float(acc),
                        "kl": kl_divergence(base_logits, logits, mask, weight),
                        "delta_loss": float(loss) - base_loss,
                        "delta_acc": float(acc) - base_acc,
                    }
                )
    return rows


def sweep_extremes(rows: Sequence[Mapping[str, float]]) -> dict[int, dict[str, float]]:
    """Per direction k: ``max_kl``, ``max_abs_delta_loss``, ``max_abs_delta_acc`` over ε."""
    out: dict[int, dict[str, float]] = {}
    for row in rows:
        k = int(row["direction"])
        cur = out.setdefault(
            k, {"max_kl": 0.0, "max_abs_delta_loss": 0.0, "max_abs_delta_acc": 0.0}
        )
        cur["max_kl"] = max(cur["max_kl"], row["kl"])
        cur["max_abs_delta_loss"] = max(cur["max_abs_delta_loss"], abs(row["delta_loss"]))
        cur["max_abs_delta_acc"] = max(cur["max_abs_delta_acc"], abs(row["delta_acc"]))
    return out


UNALIGNED_KEYS = ("src",)
"""Batch keys never trimmed with the labels (a seq2seq source has its own width)."""

DEFAULT_BUCKETS = 4


class BucketedEvaluate:
    """A :data:`FlatEvaluate` that runs one fixed batch in length buckets.

    The fixed subset is padded to its longest row; evaluating it in ``buckets`` groups of
    consecutive rows (rows sorted by length, as
    :func:`grokedge.analysis.subsets.fixed_subset` returns them), each trimmed to its own
    longest row, skips most of the padding (~30 % of the tokens of a
    300-sequence Dyck subset). Right padding never changes a real position (causal model),
    and the bucket results are combined with the same token weights as
    ``TokenStats.mean_loss`` / ``accuracy``, so loss and accuracy equal those of the whole
    batch up to float summation order; the logits come back [B, T, C] in the batch's
    layout (zeros past each bucket's width, where no label is). Called with any other
    batch it is the plain ``flat_evaluator``.

    Args:
        evaluate_params, selector, params, dtype: as ``flat_evaluator``.
        batch: the fixed batch (compared by identity at each call).
        buckets: number of row groups (1: no bucketing).
    """

    def __init__(
        self,
        evaluate_params: Any,
        selector: ParameterSelector,
        params: Any,
        batch: Batch,
        buckets: int = DEFAULT_BUCKETS,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.inner = flat_evaluator(evaluate_params, selector, params, dtype)
        self.batch = batch
        labels = batch["labels"]
        rows, width = labels.shape
        lengths = [labelled_length(row) for row in labels]
        if any(a > b for a, b in zip(lengths, lengths[1:], strict=False)):
            buckets = 1  # not sorted by length: no contiguous buckets
        n = max(1, min(buckets, rows))
        bounds = sorted({round(i * rows / n) for i in range(n + 1)})
        valid = labels != IGNORE_INDEX
        weight = batch["weight"].to(torch.float64)
        self.width = width
        self.parts: list[tuple[int, int, int, Batch]] = []
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            w = max(1, max(lengths[lo:hi]))
            sub = {}
            for key, value in batch.items():
                aligned = value.ndim >= 2 and value.shape[1] == width
                aligned = aligned and key not in UNALIGNED_KEYS
                sub[key] = value[lo:hi, :w] if aligned else value[lo:hi]
            self.parts.append((lo, hi, w, sub))
        self._acc_weight = [
            float((weight[lo:hi, None] * valid[lo:hi]).sum()) for lo, hi, *_ in self.parts
        ]
        self._loss_weight: list[float] | None = None

    def _loss_weights(self, classes: int) -> list[float]:
        if self._loss_weight is None:
            labels = self.batch["labels"]
            ok = (labels != IGNORE_INDEX) & (labels < classes)
            weight = self.batch["weight"].to(torch.float64)
            self._loss_weight = [
                float((weight[lo:hi, None] * ok[lo:hi]).sum()) for lo, hi, *_ in self.parts
            ]
        return self._loss_weight

    def __call__(self, flat: Tensor, batch: Batch) -> tuple[Any, Any, Tensor]:
        if batch is not self.batch:
            return self.inner(flat, batch)
        results = [self.inner(flat, sub) for *_, sub in self.parts]
        classes = results[0][2].shape[-1]
        loss_w = self._loss_weights(classes)
        loss = sum(r[0] * (w / sum(loss_w)) for r, w in zip(results, loss_w, strict=True) if w)
        acc = sum(
            r[1] * (w / sum(self._acc_weight))
            for r, w in zip(results, self._acc_weight, strict=True)
            if w
        )
        logits = torch.cat([F.pad(r[2], (0, 0, 0, self.width - r[2].shape[1])) for r in results])
        return loss, acc, logits

    def loss_fn(self) -> Any:
        """``θ_sel [p] -> loss`` on the fixed batch (differentiable under torch.func)."""
        return lambda flat: self(flat, self.batch)[0]


# --------------------------------------------------------------------------- measures
