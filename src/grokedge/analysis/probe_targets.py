"""What a probe reads: the task's declared targets and the samples of one target.

A task's DataModule declares its probe targets with ``probe_targets(batch)`` (name ->
[B, T] tensor aligned with ``labels``, or [B] when the labels are [B] (a classifier: one
position per row); ``IGNORE_INDEX`` where a position has no value) and their names in
``probe_target_names``. The analyses (probes, the functional R² of the
classes, the interventions' read-outs) read them here, checked, and build their grouped
samples with :func:`probe_data`.

The functional R² reads one of them, its :class:`FunctionalTarget`: as a number
(``value``: Dyck's depth, SCAN's actions still to emit) or, for a cyclic answer, through
its Fourier features at the network's key frequencies (``fourier``: modular arithmetic;
:mod:`grokedge.experiments.fourier`). Plain torch: no Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from grokedge.batch import IGNORE_INDEX, LABELS, Batch, token_labels
from grokedge.checks import not_allowed
from grokedge.experiments.fourier import answer_power_spectrum, fourier_features, key_frequencies
from grokedge.experiments.perturbation import UNALIGNED_KEYS
from grokedge.experiments.probes import ProbeData, hidden_states_and_targets, row_strings
from grokedge.functional import input_keys_of

VALUE, FOURIER = "value", "fourier"
BASES = (VALUE, FOURIER)
"""How the functional R² reads its target: the number itself, or its Fourier features."""


@dataclass(frozen=True)
class FunctionalTarget:
    """The task variable the functional R² reads (``task.functional_target``).

    ``name``: one of the task's ``probe_target_names``; ``basis``: ``value`` (the linear
    probe's R² of the number) or ``fourier`` (the mean R² over cos/sin(2πkc/p) of the
    ``n_frequencies`` key frequencies k of the answer logits; needs the task's
    ``answer_modulus`` p and the target to be the answer).
    """

    name: str
    basis: str = VALUE
    n_frequencies: int = 4


def declared_names(datamodule: Any) -> tuple[str, ...]:
    """The probe targets the task declares (``probe_target_names``; () if none)."""
    return tuple(getattr(datamodule, "probe_target_names", ()) or ())


def task_label(datamodule: Any) -> str:
    """The task's name for messages (its ``task_name``, else the DataModule's class)."""
    return getattr(datamodule, "task_name", "") or type(datamodule).__name__


def check_names_declared(key: str, names: Any, declared: Sequence[str], task: str) -> None:
    """ValueError naming ``key``, the value and the ``declared`` targets unless every name
    in ``names`` (a name or a list) is among them."""
    given = [names] if isinstance(names, str) else list(names)
    if any(n not in declared for n in given):
        raise not_allowed(
            f"{key}", names, f"the task ({task}) declares the probe targets {', '.join(declared)}"
        )


def check_target_names(key: str, names: Any, datamodule: Any) -> None:
    """:func:`check_names_declared` against the task's ``probe_target_names``; nothing to
    check for a DataModule without them (the first call checks the returned targets)."""
    declared = declared_names(datamodule)
    if declared:
        check_names_declared(key, names, declared, task_label(datamodule))


def check_functional_target(key: str, target: FunctionalTarget, datamodule: Any) -> None:
    """The target is declared by the task and its basis can be read there; else one
    ValueError naming ``key`` and what is allowed."""
    check_target_names(f"{key}.target", target.name, datamodule)
    if target.basis == FOURIER and getattr(datamodule, "answer_modulus", None) is None:
        raise not_allowed(
            f"{key}.target_basis",
            target.basis,
            f"{VALUE} (the task ({task_label(datamodule)}) declares no cyclic answer: "
            "answer_modulus)",
        )


def probe_target_tensors(datamodule: Any, batch: Batch, key: str) -> dict[str, Tensor]:
    """``datamodule.probe_targets(batch)`` checked: name -> [B, T] aligned with the
    labels [B, T] (a target [B] under labels [B] or [B, 1] is read as [B, 1]). A DataModule
    without ``probe_targets``, an empty answer, a value that is not a tensor or of another
    shape is one ValueError naming ``key``, the class, what was given and the fix."""
    cls = type(datamodule).__name__
    fn = getattr(datamodule, "probe_targets", None)
    if not callable(fn):
        raise ValueError(
            f"{key}: the DataModule ({cls}) has no probe_targets(batch); allowed: a "
            "DataModule with probe_targets(batch) -> {name: tensor [B, T] aligned with the "
            "labels, or [B] for labels [B]}; fix: add that method (the task variables to "
            "probe, e.g. the operands of a sum) or leave this analysis out"
        )
    where = f"{key}: {cls}.probe_targets(batch)"
    labels = token_labels(batch[LABELS], where)
    answer = fn(batch)
    if not isinstance(answer, dict) or not answer:
        raise ValueError(
            f"{where} returned {answer!r:.60}; allowed: a non-empty dict name -> tensor; fix: "
            "return {'name': tensor, ...} (the first name is the primary target)"
        )
    targets = {}
    for name, t in answer.items():
        if isinstance(t, Tensor) and t.ndim == 1 and labels.shape[1] == 1:
            t = t[:, None]  # one value per row, as the labels
        if not isinstance(t, Tensor) or t.shape != labels.shape:
            got = f"shape {list(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            allowed = f"{list(labels.shape)} (the labels' shape)"
            if labels.shape[1] == 1:
                allowed += f" or [{labels.shape[0]}]"
            raise ValueError(
                f"{where}: target {name!r} has {got}; allowed: a tensor of shape {allowed}, "
                "IGNORE_INDEX (-100) where a position has no value; fix: one value per "
                "labelled position, computed from the batch it is given"
            )
        targets[name] = t
    return targets


def pad_id_of(datamodule: Any) -> int:
    """The task's padding id (``model_dims()["pad_id"]``; 0 where it declares none)."""
    dims = getattr(datamodule, "model_dims", None)
    return int(dims().get("pad_id", 0)) if callable(dims) else 0


def probe_data(
    datamodule: Any, module: Any, batch: Batch, hidden: Tensor, target: Tensor
) -> ProbeData:
    """The probe samples of ``target`` [B, T] in ``hidden`` [B, T, d], grouped by string
    (with one position per row, [B] and [B, d] are read as [B, 1] and [B, 1, d]).

    The one place the analyses build their fold groups: a row's string is its model
    inputs (``module``'s ``input_keys``) read by
    :func:`~grokedge.experiments.probes.row_strings`, the inputs aligned with ``labels`` up
    to the row's last labelled position, a seq2seq source (``UNALIGNED_KEYS``) without
    its trailing padding. Identical strings in several rows (an evaluation set that is not
    deduplicated) are then one group and never straddle a fold; distinct rows keep their
    row indices as groups.
    """
    labels = token_labels(batch[LABELS])
    if hidden.ndim == 2 and labels.shape[1] == 1:
        hidden = hidden[:, None]  # one hidden vector per row: the row's one position
    if target.ndim == 1 and labels.shape[1] == 1:
        target = target[:, None]
    aligned, unaligned = [], []
    for key in input_keys_of(module):
        value = batch[key]
        is_aligned = value.ndim >= 2 and value.shape[1] == labels.shape[1]
        (aligned if is_aligned and key not in UNALIGNED_KEYS else unaligned).append(value)
    strings = row_strings(labels, aligned, unaligned, pad_id_of(datamodule))
    return hidden_states_and_targets(hidden, target, batch.get("weight"), strings)


def functional_target_values(
    target: FunctionalTarget, values: np.ndarray, datamodule: Any, logits: Tensor, labels: Tensor
) -> tuple[np.ndarray, list[int]]:
    """What the functional R² regresses on, for the probe samples' ``values`` [n].

    ``value``: the values themselves ([n]; no frequencies). ``fourier``: their Fourier
    features [n, 2K] at the K = ``n_frequencies`` key frequencies of the answer logits
    (``logits`` [B, T, C] of the live weights, read where ``labels`` [B, T] is labelled,
    classes 0..p−1), and those frequencies.
    """
    if target.basis == VALUE:
        return values, []
    p = int(datamodule.answer_modulus)
    answers = logits[labels != IGNORE_INDEX][:, :p]
    freqs = key_frequencies(answer_power_spectrum(answers), target.n_frequencies)
    return fourier_features(values.astype(np.int64), p, freqs), freqs


@dataclass(frozen=True)
class FunctionalReadout:
    """The functional R² of one call: ``r2`` ± ``sd`` (over folds) of the functional
    target on ``positions`` probe samples, the key ``frequencies`` it was read at
    (``fourier``; [] otherwise), and ``by_target``: the R² of every declared target read
    as a number (the functional target's own value-basis R² among them), for comparison."""

    r2: float
    sd: float
    positions: int
    frequencies: list[int]
    by_target: dict[str, float]


def functional_readout(
    datamodule: Any,
    module: Any,
    batch: Batch,
    base: Tensor,
    moved: Tensor,
    target: FunctionalTarget,
    logits: Tensor | None,
    folds: int,
    seed: int,
    key: str,
) -> FunctionalReadout:
    """R² of the task variables on the change ``moved − base`` of the hidden states
    [B, T, d] (:func:`grokedge.experiments.probes.functional_r2`, grouped K-fold over the
    strings of ``batch``): the functional ``target`` in its basis (``logits`` [B, T, C]
    of the base weights for ``fourier``; an unnamed target is the task's first probe
    target, read as a number), and every declared target as a number."""
    from grokedge.experiments.probes import functional_r2

    declared = probe_target_tensors(datamodule, batch, key)
    if not target.name:
        target = FunctionalTarget(next(iter(declared)), VALUE)
    nan = float("nan")
    result: dict[str, Any] = {"r2": nan, "sd": nan, "positions": 0, "frequencies": []}
    by_target: dict[str, float] = {}
    for name, tensor in declared.items():
        a = probe_data(datamodule, module, batch, base, tensor)
        b = probe_data(datamodule, module, batch, moved, tensor)
        n_groups = len(set(a.groups.tolist()))
        if n_groups < 2:
            by_target[name] = nan
            continue
        ys = {VALUE: (a.targets, [])}
        if name == target.name and target.basis == FOURIER:
            assert logits is not None
            ys[FOURIER] = functional_target_values(
                target, a.targets, datamodule, logits, token_labels(batch[LABELS])
            )
        for basis, (y, freqs) in ys.items():
            score = functional_r2(
                a.features,
                b.features,
                y,
                a.groups,
                min(folds, n_groups),
                seed,
                sample_weight=a.weights,
            )
            if basis == VALUE:
                by_target[name] = score.mean
            if name == target.name and basis == target.basis:
                result = {
                    "r2": score.mean,
                    "sd": score.sd,
                    "positions": len(a.targets),
                    "frequencies": freqs,
                }
    return FunctionalReadout(**result, by_target=by_target)
