"""Probes of a task variable in the hidden states (PAPER.md §3, experiments 5–6, and §5).

Three regressors predict the target (Dyck: the depth after each token) from the hidden
state at every labelled position:

- ``linear``: StandardScaler → Ridge(α = 1);
- ``quadratic``: StandardScaler → degree-2 polynomial features → StandardScaler →
  Ridge(α = 10). The paper says "degree-2 interaction features"; we include the squares
  x_i² by default (``ProbeConfig.quadratic_interaction_only = False``) because a
  quadratic probe without them cannot represent even |x|²-type targets; set it True for
  the literal products-only reading. The second scaler puts products on the same scale
  as the linear terms, so the ridge penalty treats them alike;
- ``mlp``: StandardScaler → MLPRegressor(64 hidden, α = 0.01, early stopping).

Each is scored by R² on held-out data. The default protocol (``grouped_kfold``) is K-fold
cross-validation grouped by sequence: all positions of one sequence sit on the same side
of every split, so a probe cannot read a sequence's identity off its other positions;
scores are mean ± sd over the folds. ``paper_split`` is the paper's single random 70/30
split of positions (sequences straddle it; kept for comparison). Scalers are fitted
inside each training fold (Pipelines), so nothing of the test fold leaks.

Row weights (deduplicated evaluation rows stand for ``weight`` identical sequences) are
passed to every fit and to R² as sample weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import Tensor

from grokedge.spectral.perturbation import IGNORE_LABEL

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

# scikit-learn (and SciPy behind it) is imported inside the functions that fit probes:
# importing it here would add ~1 s to every ``import grokedge.spectral``, probes or not.

GROUPED_KFOLD = "grouped_kfold"
PAPER_SPLIT = "paper_split"
PROTOCOLS = (GROUPED_KFOLD, PAPER_SPLIT)

LINEAR, QUADRATIC, MLP = "linear", "quadratic", "mlp"
PROBE_KINDS = (LINEAR, QUADRATIC, MLP)

DEFAULT_FOLDS = 5

ArrayLike = np.ndarray | Tensor


@dataclass(frozen=True)
class ProbeConfig:
    """Hyper-parameters of the probes (defaults: the paper's, PAPER.md §3.5)."""

    linear_alpha: float = 1.0
    quadratic_alpha: float = 10.0
    quadratic_interaction_only: bool = False
    mlp_hidden: tuple[int, ...] = (64,)
    mlp_alpha: float = 0.01
    mlp_max_iter: int = 200  # sklearn's default; early stopping usually ends sooner
    paper_test_fraction: float = 0.3


@dataclass(frozen=True)
class ProbeScore:
    """R² of one probe: ``mean`` and ``sd`` (ddof = 1; NaN for a single split) of ``per_fold``."""

    mean: float
    sd: float
    per_fold: tuple[float, ...] = field(default_factory=tuple)

    @classmethod
    def from_folds(cls, scores: Sequence[float]) -> ProbeScore:
        values = tuple(float(s) for s in scores)
        sd = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
        return cls(float(np.mean(values)), sd, values)


class ProbeData(NamedTuple):
    """Probe inputs, one row per labelled position (numpy, float64 / int64)."""

    features: np.ndarray  # [n, d]
    targets: np.ndarray  # [n]
    groups: np.ndarray  # [n], the sequence (row) each position belongs to
    weights: np.ndarray  # [n], the row weight of each position


def _numpy(x: ArrayLike, dtype: type = np.float64) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        # float64 first: numpy has no bfloat16, and the probes work in double anyway.
        x = (x.to(torch.float64) if x.is_floating_point() else x).numpy()
    return np.asarray(x, dtype=dtype)


def hidden_states_and_targets(
    hidden: Tensor,
    labels: Tensor,
    weight: Tensor | None = None,
    group_offset: int = 0,
) -> ProbeData:
    """Every labelled position of a batch as a probe sample.

    Args:
        hidden: [B, T, d] hidden states (e.g. ``ModelTrace.hidden[-1]``: the last block's
            output before the final LayerNorm, what the paper probes).
        labels: [B, T] targets (Dyck: depth after the token); ``-100`` = unlabelled.
        weight: [B] row weights (None: 1).
        group_offset: added to the row index, so that batches concatenated one after the
            other keep distinct groups (pass the number of rows already collected).
    Returns:
        :class:`ProbeData` (features [n, d], targets [n] = the labels, groups [n] = row
        index + offset, weights [n]), positions in row-major order.
    """
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden {list(hidden.shape)} and labels {list(labels.shape)} differ")
    mask = labels != IGNORE_LABEL
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)
    w = torch.ones(labels.shape[0]) if weight is None else weight.detach()
    return ProbeData(
        features=_numpy(hidden[mask]),
        targets=_numpy(labels[mask]),
        groups=_numpy(rows[mask], np.int64) + group_offset,
        weights=_numpy(w.to(labels.device)[rows[mask]]),
    )


def make_probe(kind: str, seed: int = 0, config: ProbeConfig = ProbeConfig()) -> Pipeline:
    """The unfitted sklearn Pipeline of probe ``kind`` (see the module docstring)."""
    from sklearn.linear_model import Ridge
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import PolynomialFeatures, StandardScaler

    if kind == LINEAR:
        steps = [("scale", StandardScaler()), ("ridge", Ridge(alpha=config.linear_alpha))]
    elif kind == QUADRATIC:
        poly = PolynomialFeatures(
            degree=2, interaction_only=config.quadratic_interaction_only, include_bias=False
        )
        steps = [
            ("scale", StandardScaler()),
            ("poly", poly),
            ("scale_poly", StandardScaler()),
            ("ridge", Ridge(alpha=config.quadratic_alpha)),
        ]
    elif kind == MLP:
        mlp = MLPRegressor(
            hidden_layer_sizes=config.mlp_hidden,
            alpha=config.mlp_alpha,
            early_stopping=True,
            max_iter=config.mlp_max_iter,
            random_state=seed,
        )
        steps = [("scale", StandardScaler()), ("mlp", mlp)]
    else:
        raise ValueError(f"unknown probe kind {kind!r}; allowed: {PROBE_KINDS}")
    return Pipeline(steps)


def probe_splits(
    groups: ArrayLike,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    protocol: str = GROUPED_KFOLD,
    config: ProbeConfig = ProbeConfig(),
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (train indices, test indices) pairs that :func:`score_probes` uses.

    ``grouped_kfold``: ``GroupKFold(folds, shuffle=True, random_state=seed)``: every
    sample is tested exactly once and no group is on both sides of a split.
    ``paper_split``: one random split of positions (``config.paper_test_fraction`` test),
    ignoring groups.
    """
    from sklearn.model_selection import GroupKFold, train_test_split

    g = _numpy(groups, np.int64)
    index = np.arange(len(g))
    if protocol == GROUPED_KFOLD:
        n_groups = len(np.unique(g))
        if not 2 <= folds <= n_groups:
            raise ValueError(f"folds={folds} needs 2 <= folds <= number of groups ({n_groups})")
        splitter = GroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        return [(train, test) for train, test in splitter.split(index, groups=g)]
    if protocol == PAPER_SPLIT:
        train, test = train_test_split(
            index, test_size=config.paper_test_fraction, random_state=seed
        )
        return [(np.sort(train), np.sort(test))]
    raise ValueError(f"unknown protocol {protocol!r}; allowed: {PROTOCOLS}")


def _fit_score(
    probe: Pipeline, x: np.ndarray, y: np.ndarray, w: np.ndarray | None, split: tuple
) -> float:
    from sklearn.metrics import r2_score
    from sklearn.utils.validation import has_fit_parameter

    train, test = split
    fit_params = {}
    if w is not None:
        # Pipeline routes "<step>__sample_weight" to the steps whose fit accepts it.
        fit_params = {
            f"{name}__sample_weight": w[train]
            for name, step in probe.steps
            if has_fit_parameter(step, "sample_weight")
        }
    probe.fit(x[train], y[train], **fit_params)
    test_weight = None if w is None else w[test]
    return float(r2_score(y[test], probe.predict(x[test]), sample_weight=test_weight))


def score_probes(
    features: ArrayLike,
    targets: ArrayLike,
    groups: ArrayLike,
    kinds: Sequence[str] = PROBE_KINDS,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    protocol: str = GROUPED_KFOLD,
    sample_weight: ArrayLike | None = None,
    config: ProbeConfig = ProbeConfig(),
) -> dict[str, ProbeScore]:
    """R² of each probe kind under ``protocol`` (mean ± sd over folds).

    Args:
        features: [n, d] hidden states.
        targets: [n] the task variable.
        groups: [n] sequence id of each sample.
        kinds: any of ``linear``, ``quadratic``, ``mlp``.
        folds: K of the grouped K-fold (ignored by ``paper_split``).
        seed: seed of the fold assignment, the paper split and the MLP.
        protocol: ``grouped_kfold`` (default) or ``paper_split``.
        sample_weight: [n] weights (e.g. ``ProbeData.weights``); None: unweighted.
    Returns:
        kind -> :class:`ProbeScore`. Every kind sees the same splits.
    """
    x, y = _numpy(features), _numpy(targets)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"features must be [n, d] and targets [n], got {x.shape}, {y.shape}")
    from sklearn.base import clone

    w = None if sample_weight is None else _numpy(sample_weight)
    splits = probe_splits(groups, folds, seed, protocol, config)
    scores = {}
    for kind in kinds:
        template = make_probe(kind, seed, config)
        scores[kind] = ProbeScore.from_folds(
            [_fit_score(clone(template), x, y, w, split) for split in splits]
        )
    return scores


def functional_r2(
    features_base: ArrayLike,
    features_perturbed: ArrayLike,
    targets: ArrayLike,
    groups: ArrayLike,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    protocol: str = GROUPED_KFOLD,
    sample_weight: ArrayLike | None = None,
    config: ProbeConfig = ProbeConfig(),
) -> ProbeScore:
    """The "functional R²" (PAPER.md, universality classes): the linear probe's R² on the
    *change* of the hidden state, ``features_perturbed − features_base`` [n, d].

    High: moving θ along the direction (the paper: ε = 0.005‖θ_sel‖ along v_1) changes
    the representation in a way that encodes the task variable. Rows of both feature
    arrays must be the same positions (build both with :func:`hidden_states_and_targets`
    and the same labels). Features are standardised inside each fold, so the tiny scale
    of the change does not matter.
    """
    delta = _numpy(features_perturbed) - _numpy(features_base)
    return score_probes(
        delta, targets, groups, (LINEAR,), folds, seed, protocol, sample_weight, config
    )[LINEAR]
