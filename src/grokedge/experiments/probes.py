"""Probes of a task variable in the hidden states (docs/theory.md §3, experiments 5–6, and §5).

Three regressors predict the target (Dyck: the depth after each token) from the hidden
state at every labelled position:

- ``linear``: StandardScaler → Ridge(α = 1);
- ``quadratic``: StandardScaler → degree-2 polynomial features → StandardScaler →
  Ridge(α = 10). The paper says "degree-2 interaction features"; we include the squares
  x_i² by default (``ProbeConfig.quadratic_interaction_only = False``) because a
  quadratic probe without them cannot represent even |x|²-type targets; set it True for
  the literal products-only reading. The second scaler puts products on the same scale
  as the linear terms, so the ridge penalty treats them alike. The ridge is
  :class:`~grokedge.experiments.ridge.CholeskyRidge`: scikit-learn's ``Ridge`` solved by a
  Cholesky factorisation of its n × n dual system (D = 8,384 features > n positions),
  whose products run in ``ProbeConfig.quadratic_dtype``: float32 by default (blocks
  summed in float64, float64 solve; R² within 1e-7 of scikit-learn's on Dyck at 0.67 of
  its time, docs/benchmarks.md), float64 on request;
- ``mlp``: StandardScaler → MLPRegressor(64 hidden, α = 0.01, early stopping).

Each is scored by R² on held-out data. The default protocol (``grouped_kfold``) is K-fold
cross-validation grouped by *string*: all positions of one string sit on the same side of
every split, so a probe cannot read a string's identity off its other positions; scores
are mean ± sd over the folds. The group of a position is the token content of its row
(:func:`row_strings`, numbered by :class:`StringGroups`), not the row itself: an
evaluation set that is not deduplicated (Dyck's ``deduplicate=false``: the 5,000 test
sequences hold ~2,200 distinct strings) has identical strings in several rows, and
grouping by row would put copies of one string on both sides of a fold. With distinct
rows the string ids are the row indices, so the folds are the row-grouped ones.
``paper_split`` is the paper's single random 70/30 split of positions (sequences
straddle it; kept for comparison). Scalers are fitted inside each training fold
(Pipelines), so nothing of the test fold leaks.

Row weights (deduplicated evaluation rows stand for ``weight`` identical sequences) are
passed to every fit and to R² as sample weights.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import Tensor

from grokedge.batch import IGNORE_INDEX

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

# scikit-learn (and SciPy behind it) is imported inside the functions that fit probes:
# importing it here would add ~1 s to every import of this module, probes or not.

GROUPED_KFOLD = "grouped_kfold"
PAPER_SPLIT = "paper_split"
PROTOCOLS = (GROUPED_KFOLD, PAPER_SPLIT)

LINEAR, QUADRATIC, MLP = "linear", "quadratic", "mlp"
PROBE_KINDS = (LINEAR, QUADRATIC, MLP)

DEFAULT_FOLDS = 5

ArrayLike = np.ndarray | Tensor


@dataclass(frozen=True)
class ProbeConfig:
    """Hyper-parameters of the probes (defaults: the paper's, docs/theory.md §3.5)."""

    linear_alpha: float = 1.0
    quadratic_alpha: float = 10.0
    quadratic_interaction_only: bool = False
    quadratic_dtype: str = "float32"  # products of the ridge's normal matrix (float64 solve)
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
    not_converged: int = 0  # folds whose iterative fit (the MLP) stopped at its max_iter

    @classmethod
    def from_folds(cls, scores: Sequence[float], not_converged: int = 0) -> ProbeScore:
        values = tuple(float(s) for s in scores)
        sd = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
        return cls(float(np.mean(values)), sd, values, not_converged)


class ProbeData(NamedTuple):
    """Probe inputs, one row per labelled position (numpy, float64 / int64)."""

    features: np.ndarray  # [n, d]
    targets: np.ndarray  # [n]
    groups: np.ndarray  # [n], the string (StringGroups id of its row) of each position
    weights: np.ndarray  # [n], the row weight of each position


def _numpy(x: ArrayLike, dtype: type = np.float64) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        # float64 first: numpy has no bfloat16, and the probes work in double anyway.
        x = (x.to(torch.float64) if x.is_floating_point() else x).numpy()
    return np.asarray(x, dtype=dtype)


def row_strings(
    labels: Tensor,
    aligned: Sequence[Tensor] = (),
    unaligned: Sequence[Tensor] = (),
    pad_id: int = 0,
) -> list[tuple[bytes, ...]]:
    """The string of each row of a batch: the key the probes group positions by.

    Args:
        labels: [B, T] the batch's labels (``-100`` = unlabelled).
        aligned: input tensors [B, T, ...] position-aligned with ``labels`` (Dyck and
            modular ``tokens``, SCAN ``tgt_in``): each row is read up to its last
            labelled position. What lies past it is padding, whatever its id (merged
            subsets pad with another id than the task's own batches), and a causal model
            never reads it into a labelled position.
        unaligned: input tensors [B, S, ...] with their own width (a seq2seq ``src``):
            each row without its trailing ``pad_id`` entries.
        pad_id: the padding id of ``unaligned``.
    Returns:
        [B] hashable keys (one bytes string per tensor): equal for rows with the same
        tokens, whatever batch or padding width they come from, different otherwise.
    """
    if not aligned and not unaligned:
        raise ValueError("row_strings needs at least one input tensor")
    rows, width = labels.shape[:2]
    for t in (*aligned, *unaligned):
        if t.shape[0] != rows:
            raise ValueError(f"input {list(t.shape)} and labels {list(labels.shape)} differ")
    for t in aligned:
        if t.ndim < 2 or t.shape[1] != width:
            raise ValueError(f"aligned input {list(t.shape)} and labels {list(labels.shape)}")
    for t in unaligned:
        if t.ndim < 2:
            raise ValueError(f"unaligned input {list(t.shape)}: needs [B, S, ...]")
    valid = (labels != IGNORE_INDEX).cpu()
    position = torch.arange(1, width + 1).expand(rows, width)
    lengths = torch.where(valid, position, 0).amax(dim=1).tolist() if width else [0] * rows
    aligned_np = [t.detach().cpu().numpy() for t in aligned]
    unaligned_np = [t.detach().cpu().numpy() for t in unaligned]
    ends = []  # per unaligned tensor: [B] 1 + the last non-pad position of each row
    for u in unaligned_np:
        real = np.any(u != pad_id, axis=tuple(range(2, u.ndim)))  # [B, S]
        last = np.where(real, np.arange(1, real.shape[1] + 1), 0)
        ends.append(last.max(axis=1, initial=0).tolist())
    return [
        tuple(a[r, : lengths[r]].tobytes() for a in aligned_np)
        + tuple(u[r, : end[r]].tobytes() for u, end in zip(unaligned_np, ends, strict=True))
        for r in range(rows)
    ]


class StringGroups:
    """Group ids of strings, for the probes' folds: equal strings share one id.

    Each string not seen before gets the next integer (from ``start``), in order of first
    appearance. Give one instance to every batch of a concatenation (see
    :func:`hidden_states_and_targets`): ids then stay equal for equal strings across the
    batches and distinct for distinct ones. With all rows distinct the ids are the
    running row indices (+ ``start``), i.e. the row grouping, hence the same folds:
    ``GroupKFold`` depends on the ids only through their order.
    """

    def __init__(self, start: int = 0) -> None:
        self._ids: dict[Hashable, int] = {}
        self._next = int(start)

    def ids(self, strings: Sequence[Hashable]) -> np.ndarray:
        """[len(strings)] int64: the id of each string (new ones numbered on)."""
        out = np.empty(len(strings), dtype=np.int64)
        for i, key in enumerate(strings):
            found = self._ids.get(key)
            if found is None:
                found = self._ids[key] = self._next
                self._next += 1
            out[i] = found
        return out

    def fresh(self, n: int) -> np.ndarray:
        """[n] int64: n new ids, one per row taken as a string of its own."""
        out = np.arange(self._next, self._next + n, dtype=np.int64)
        self._next += n
        return out


def hidden_states_and_targets(
    hidden: Tensor,
    labels: Tensor,
    weight: Tensor | None = None,
    strings: Sequence[Hashable] | None = None,
    string_ids: StringGroups | None = None,
) -> ProbeData:
    """Every labelled position of a batch as a probe sample, grouped by string.

    Args:
        hidden: [B, T, d] hidden states (e.g. ``ModelTrace.hidden[-1]``: the last block's
            output before the final LayerNorm, what the paper probes).
        labels: [B, T] targets (Dyck: depth after the token); ``-100`` = unlabelled.
        weight: [B] row weights (None: 1).
        strings: [B] the string of each row (:func:`row_strings`): rows with equal
            strings are one group. None: every row a string of its own (only right when
            the rows are known to be distinct).
        string_ids: the :class:`StringGroups` that numbers the strings; pass the same one
            to every batch to be concatenated, so that equal strings share an id across the
            batches and distinct ones never do. None: a fresh one (ids from 0).
    Returns:
        :class:`ProbeData` (features [n, d], targets [n] = the labels, groups [n] = the
        string id of each position's row, weights [n]), positions in row-major order.
    """
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden {list(hidden.shape)} and labels {list(labels.shape)} differ")
    if strings is not None and len(strings) != labels.shape[0]:
        raise ValueError(f"{len(strings)} strings for {labels.shape[0]} rows")
    numbering = StringGroups() if string_ids is None else string_ids
    n_rows = labels.shape[0]
    row_ids = numbering.fresh(n_rows) if strings is None else numbering.ids(strings)
    mask = labels != IGNORE_INDEX
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)
    w = torch.ones(labels.shape[0]) if weight is None else weight.detach()
    return ProbeData(
        features=_numpy(hidden[mask]),
        targets=_numpy(labels[mask]),
        groups=row_ids[_numpy(rows[mask], np.int64)],
        weights=_numpy(w.to(labels.device)[rows[mask]]),
    )


def make_probe(kind: str, seed: int = 0, config: ProbeConfig = ProbeConfig()) -> Pipeline:
    """The unfitted sklearn Pipeline of probe ``kind`` (see the module docstring)."""
    from sklearn.linear_model import Ridge
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import PolynomialFeatures, StandardScaler

    from grokedge.experiments.ridge import GRAM_DTYPES, CholeskyRidge

    if kind == LINEAR:
        steps = [("scale", StandardScaler()), ("ridge", Ridge(alpha=config.linear_alpha))]
    elif kind == QUADRATIC:
        poly = PolynomialFeatures(
            degree=2, interaction_only=config.quadratic_interaction_only, include_bias=False
        )
        if config.quadratic_dtype not in GRAM_DTYPES:
            raise ValueError(f"quadratic_dtype={config.quadratic_dtype!r}; allowed: {GRAM_DTYPES}")
        ridge = CholeskyRidge(alpha=config.quadratic_alpha, gram_dtype=config.quadratic_dtype)
        steps = [
            ("scale", StandardScaler()),
            ("poly", poly),
            ("scale_poly", StandardScaler()),
            ("ridge", ridge),
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
) -> tuple[float, bool]:
    """Held-out R² of ``probe`` fitted on ``split``'s training part, and whether an
    iterative final step (the MLP) stopped at its ``max_iter`` without converging."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
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
    with warnings.catch_warnings():
        # Counted below instead (ProbeScore.not_converged) and reported by the caller.
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(x[train], y[train], **fit_params)
    final = probe.steps[-1][1]
    n_iter, max_iter = getattr(final, "n_iter_", None), getattr(final, "max_iter", None)
    stopped = isinstance(n_iter, int) and isinstance(max_iter, int) and n_iter >= max_iter
    test_weight = None if w is None else w[test]
    return float(r2_score(y[test], probe.predict(x[test]), sample_weight=test_weight)), stopped


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
        groups: [n] the group (string) of each sample (``ProbeData.groups``).
        kinds: any of ``linear``, ``quadratic``, ``mlp``.
        folds: K of the grouped K-fold (ignored by ``paper_split``).
        seed: seed of the fold assignment, the paper split and the MLP.
        protocol: ``grouped_kfold`` (default) or ``paper_split``.
        sample_weight: [n] weights (e.g. ``ProbeData.weights``); None: unweighted.
    Returns:
        kind -> :class:`ProbeScore`. Every kind sees the same splits. scikit-learn's
        ConvergenceWarning is not raised: an MLP fold stopped by ``mlp_max_iter`` counts
        in ``ProbeScore.not_converged``.
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
        folds_ = [_fit_score(clone(template), x, y, w, split) for split in splits]
        scores[kind] = ProbeScore.from_folds(
            [r2 for r2, _ in folds_], sum(stopped for _, stopped in folds_)
        )
    return scores


def score_targets(
    samples: Mapping[str, ProbeData],
    kinds: Sequence[str] = PROBE_KINDS,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    protocol: str = GROUPED_KFOLD,
    config: ProbeConfig = ProbeConfig(),
) -> dict[str, dict[str, ProbeScore]]:
    """:func:`score_probes` of every target: target name -> kind -> :class:`ProbeScore`.

    ``folds`` is capped at each target's number of groups (strings). Module-level and
    numpy-only, so that it can run in a worker process
    (:class:`grokedge.analysis.worker.AnalysisWorker`).
    """
    return {
        name: score_probes(
            data.features,
            data.targets,
            data.groups,
            kinds=kinds,
            folds=min(folds, len(np.unique(data.groups))),
            seed=seed,
            protocol=protocol,
            sample_weight=data.weights,
            config=config,
        )
        for name, data in samples.items()
    }


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
    """The "functional R²" (docs/theory.md §3, universality classes): the linear probe's R² on the
    *change* of the hidden state, ``features_perturbed − features_base`` [n, d].

    High: moving θ along the direction (the paper: ε = 0.005‖θ_sel‖ along v_1) changes
    the representation in a way that encodes the task variable. Rows of both feature
    arrays must be the same positions (build both with :func:`hidden_states_and_targets`
    and the same labels). Features are standardised inside each fold, so the tiny scale
    of the change does not matter.

    ``targets`` is [n] (one variable) or [n, m] (a variable read through m features, e.g.
    the Fourier features of a cyclic answer, :mod:`grokedge.experiments.fourier`): then each
    column is probed on the same folds and a fold's R² is the mean over the columns.
    """
    delta = _numpy(features_perturbed) - _numpy(features_base)
    y = _numpy(targets)
    if y.ndim == 1:
        return score_probes(
            delta, y, groups, (LINEAR,), folds, seed, protocol, sample_weight, config
        )[LINEAR]
    columns = [
        score_probes(
            delta, y[:, j], groups, (LINEAR,), folds, seed, protocol, sample_weight, config
        )[LINEAR].per_fold
        for j in range(y.shape[1])
    ]
    return ProbeScore.from_folds(np.mean(np.asarray(columns), axis=0).tolist())
