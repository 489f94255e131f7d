"""What the causal analyses need from a LightningModule: the ``FunctionalModel`` protocol.

grokedge's causal callbacks (ablation, perturbation, gap flow, probes, classes, the
interventions' read-outs) never touch the live model: they evaluate it *functionally*,
with parameter tensors of their own in place of its parameters
(``torch.func.functional_call`` semantics). This module says exactly what that takes, so
that any LightningModule can be analysed, not only grokedge's ``GrokModule``. Plain torch:
nothing here imports Lightning, Hydra or W&B.

The module (the ``LightningModule`` handed to ``Trainer.fit``) provides

``evaluate(params, batch) -> EvalResult``  (:class:`FunctionalModel`; ablation,
perturbation, gap flow)
    ``params``: ``{name: tensor}`` over parameters of the *analysed module*
    (:func:`analysed_module`: ``module.net`` when that is an ``nn.Module``, else the
    module itself; these are the names the GramCallback's selector matches, e.g.
    ``blocks.0.attn.in_proj_weight``). Every given tensor replaces the parameter of that
    name for this call only; names left out keep their live values; nothing of the live
    model, its gradients or the optimizer changes. The result must be differentiable in
    ``params`` (curvature and the gap flow take exact Hessian-vector products through it
    with ``torch.func``; an attention kernel without forward-mode AD, such as PyTorch's
    fused CPU flash attention, needs the math kernel:
    :class:`grokedge.adapters.FunctionalAdapter` selects it).
    Returns ``EvalResult(loss, acc, logits)`` (a named tuple, so ``loss, acc, logits =
    ...`` works; a plain 3-tuple is accepted too): ``loss`` a 0-dim floating tensor, the
    mean loss per labelled token over the batch's original (undeduplicated) rows (nats
    for a cross-entropy); ``acc`` a 0-dim floating tensor in [0, 1], the fraction of
    labelled tokens whose argmax is the label (each row weighted by ``weight``);
    ``logits`` a floating tensor [B, T, C], B and T those of ``batch["labels"]``
    (log-probabilities serve as well: only softmaxes and argmaxes are taken). The analyses
    always hand ``evaluate`` and ``trace`` labels [B, T]: a classifier's labels [B] arrive as
    [B, 1], so its logits are [B, 1, C] (``FunctionalAdapter`` reshapes a forward's [B, C]).

``input_keys: tuple[str, ...]``  (both protocols)
    The batch entries the network takes, in positional order (``("tokens",)`` for
    grokedge's encoder, ``("src", "tgt_in")`` for its seq2seq model). The analyses read
    them to tell identical strings apart (probe folds are grouped by string).

``trace(params, batch) -> ModelTrace``  (:class:`TracedModel`; probes, classes, the
interventions' read-outs)
    The hidden states of one forward pass with ``params`` in place (``{}``: the live
    weights), as a :class:`~grokedge.models.trace.ModelTrace`: ``hidden`` the output of
    every block in order, each [B, T, d] aligned with ``batch["labels"]`` ([B, 1, d] for
    one vector per row, an MLP's hidden state under labels [B]; probes read
    ``hidden[block]``, block -1 the last); ``attn`` the attention weights per block
    [B, H, T, T] (the interventions' attention entropy; may be empty, the entropy is then
    not logged). ``n_blocks`` (optional int) lets ``block`` indices be checked before
    training.

Optional: ``grok_step`` (int or None; without it nothing runs "at the grok step" and every
row's phase is ``pre``), ``log_scalars(values)`` (else the callbacks log straight to the
trainer's loggers).

The evaluation data (the trainer's LightningDataModule) provides ``val_dataloader()``
(one loader, or one per name of ``eval_names``, default ``("test",)``) whose batches are
``dict[str, Tensor]`` (or tuples named by the module's ``batch_keys``:
``FunctionalAdapter.attach(..., batch_keys=("x", "labels"))``) with the ``input_keys``,
``labels`` integer [B] (a classifier: read as [B, 1]) or [B, T] (``IGNORE_INDEX`` = -100
where a position has no label) and optionally ``weight`` [B] (row multiplicities, default
1); for probes, classes and the interventions also ``probe_targets(batch) -> {name: tensor}``
(the task variables, [B, T] aligned with the labels the analyses hand it, or [B] for labels
[B, 1]; the first is the primary); optionally ``model_dims()["pad_id"]``
(the padding id of the inputs, default 0). The analyses merge evaluation batches into one
subset, right-padding shorter rows (``labels`` with -100, inputs with the pad id) and
evaluating it in length buckets: padding must not change a real position's output (a
causal model), or every row must have the same length.

A module that lacks these fails before training with one message naming the callback's
config key and what is missing (:func:`check_module_has`); on the first real evaluation
batch, before the first step, labels of the wrong kind, a result of the wrong type or shape
and (probes, classes) probe targets of the wrong shape do too (:func:`check_evaluate`,
:func:`check_trace`, ``grokedge.analysis.probe_targets.probe_target_tensors``): one
ValueError naming the callback's key, the class, what was given, what is allowed and the
fix. docs/own_model.md has the contract as a table. ``grokedge.adapters.FunctionalAdapter``
builds all of it for a plain LightningModule from its ``forward`` and a loss function.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from grokedge.batch import LABELS, Batch, token_labels
from grokedge.checks import not_allowed
from grokedge.models.trace import ModelTrace

EVALUATE = "evaluate"
TRACE = "trace"

ADAPTER_HINT = (
    "a plain LightningModule gets them from "
    "grokedge.adapters.FunctionalAdapter.attach(module, loss_fn, inputs=[...batch keys], "
    "hidden='<name of its blocks>')"
)


class EvalResult(NamedTuple):
    """``evaluate``'s answer: scalar ``loss`` and token accuracy ``acc``, ``logits``
    [B, T, C] (see the module docstring for units)."""

    loss: Tensor
    acc: Tensor
    logits: Tensor


@runtime_checkable
class FunctionalModel(Protocol):
    """A module the ablation, perturbation and gap-flow callbacks can evaluate functionally.

    ``GrokModule`` satisfies it; ``grokedge.adapters.FunctionalAdapter`` makes any
    LightningModule satisfy it. Semantics: the module docstring.
    """

    input_keys: tuple[str, ...]

    def evaluate(self, params: Mapping[str, Tensor], batch: Batch) -> EvalResult:
        """Loss, accuracy and logits with ``params`` in place of the analysed module's."""
        ...


@runtime_checkable
class TracedModel(Protocol):
    """A module whose hidden states the probe, class and intervention callbacks can read."""

    input_keys: tuple[str, ...]

    def trace(self, params: Mapping[str, Tensor], batch: Batch) -> ModelTrace:
        """Hidden states per block (and attention weights, if any), ``params`` in place."""
        ...


def analysed_module(module: nn.Module) -> nn.Module:
    """The module whose parameter names ``params`` uses (and the GramCallback's selector
    matches): ``module.net`` if it is an ``nn.Module``, else ``module`` (names are then
    those of ``GrokModule.evaluate``, e.g. ``blocks.0.attn.in_proj_weight``)."""
    net = getattr(module, "net", None)
    return net if isinstance(net, nn.Module) else module


def count_blocks(module: nn.Module) -> int | None:
    """Blocks whose outputs ``ModelTrace.hidden`` holds (decoder blocks for seq2seq): the
    module's ``n_blocks`` if it declares one, else its network's block list's length
    (None: neither)."""
    declared = getattr(module, "n_blocks", None)
    if isinstance(declared, int) and not isinstance(declared, bool):
        return declared
    net = analysed_module(module)
    for name in ("decoder_blocks", "blocks"):
        blocks = getattr(net, name, None)
        if isinstance(blocks, nn.ModuleList):
            return len(blocks)
    return None


def check_block(key: str, block: int, module: nn.Module) -> None:
    """ValueError naming ``key`` unless ``block`` indexes one of the module's blocks."""
    n = count_blocks(module)
    if n is not None and not -n <= block < n:
        raise not_allowed(
            f"{key}",
            block,
            f"a block index in [{-n}, {n - 1}] (the model has {n} blocks; -1 = the last)",
        )


def as_eval_result(value: Any) -> EvalResult:
    """An ``EvalResult`` from one (or anything with ``loss``, ``acc``, ``logits``, or a
    3-tuple in that order); ValueError otherwise."""
    if isinstance(value, EvalResult):
        return value
    if all(hasattr(value, a) for a in EvalResult._fields):
        return EvalResult(value.loss, value.acc, value.logits)
    if isinstance(value, tuple | list) and len(value) == 3:
        return EvalResult(*value)
    raise ValueError(f"returned {_describe(value)}")


# --------------------------------------------------------------------------- checks


def check_module_has(module: Any, needs: Sequence[str], key: str) -> None:
    """Before training: ``module`` has ``input_keys`` and every method in ``needs``
    (``"evaluate"``, ``"trace"``); else one ValueError naming ``key`` and what is missing."""
    name = type(module).__name__
    missing = []
    if EVALUATE in needs and not callable(getattr(module, EVALUATE, None)):
        missing.append("evaluate(params, batch) -> EvalResult(loss, acc, logits)")
    if TRACE in needs and not callable(getattr(module, TRACE, None)):
        missing.append("trace(params, batch) -> ModelTrace (hidden states per block)")
    keys = _input_keys(module)
    if keys is None:
        missing.append("input_keys (the batch keys its network takes)")
    if missing:
        raise ValueError(
            f"{key}: the module ({name}) has no {' and no '.join(missing)}; expected the "
            f"grokedge.functional protocol (GrokModule has it; {ADAPTER_HINT})"
        )


def input_keys_of(module: Any) -> tuple[str, ...]:
    """The batch keys ``module`` takes (its ``input_keys``, else its network's)."""
    keys = _input_keys(module)
    if keys is None:
        raise ValueError(f"{type(module).__name__} declares no input_keys")
    return keys


def model_inputs(module: Any, batch: Batch) -> tuple[Tensor, ...]:
    """The batch entries ``module`` takes (its ``input_keys``), in order."""
    return tuple(batch[k] for k in input_keys_of(module))


def _input_keys(module: Any) -> tuple[str, ...] | None:
    for owner in (module, analysed_module(module) if isinstance(module, nn.Module) else None):
        keys = getattr(owner, "input_keys", None)
        if isinstance(keys, str):
            keys = (keys,)
        if isinstance(keys, Sequence) and keys and all(isinstance(k, str) for k in keys):
            return tuple(keys)
    return None


def check_evaluate(module: Any, batch: Batch, key: str) -> EvalResult:
    """On one real batch: ``module.evaluate({}, batch)`` returns a scalar loss and accuracy
    and logits [B, T, C] matching ``batch["labels"]``, and it honours ``params`` (halving
    every parameter changes the logits). One ValueError naming ``key``, what was expected
    and what came back, otherwise. Returns the result."""
    where = f"{key}: {type(module).__name__}.evaluate(params, batch) on one evaluation batch"
    labels = token_labels(batch[LABELS], where)
    b, t = labels.shape
    expected = (
        f"expected EvalResult(loss: 0-dim float tensor, acc: 0-dim float tensor, logits: "
        f"float tensor [{b}, {t}, C]) for labels of shape {list(labels.shape)}; fix: "
        f"return logits batch first, one row of C scores per labelled position (a "
        f"classifier's [B, C] as logits[:, None]), or let FunctionalAdapter.attach(module, "
        f"loss_fn, inputs=...) build evaluate from forward"
    )
    try:
        raw = module.evaluate({}, batch)
    except Exception as e:
        raise ValueError(f"{where} raised {type(e).__name__}: {e}; {expected}") from e
    try:
        result = as_eval_result(raw)
    except ValueError as e:
        raise ValueError(f"{where} {e}; {expected}") from None
    problems = []
    for field in ("loss", "acc"):
        value = getattr(result, field)
        if not (isinstance(value, Tensor) and value.ndim == 0 and value.is_floating_point()):
            problems.append(f"{field} {_describe(value)}")
    logits = result.logits
    if not (
        isinstance(logits, Tensor)
        and logits.is_floating_point()
        and logits.ndim == 3
        and tuple(logits.shape[:2]) == (b, t)
    ):
        problems.append(f"logits {_describe(logits)}")
    if problems:
        raise ValueError(f"{where} returned {', '.join(problems)}; {expected}")
    if isinstance(module, nn.Module):
        halved = {n: p.detach() * 0.5 for n, p in analysed_module(module).named_parameters()}
        if halved:
            other = as_eval_result(module.evaluate(halved, batch)).logits
            if other.shape == logits.shape and bool((other == logits).all()):
                raise ValueError(
                    f"{where} ignores params: every parameter halved gives the same logits; "
                    "expected the model evaluated with params in place of its own "
                    "(torch.func.functional_call)"
                )
    return result


def check_trace(module: Any, batch: Batch, key: str, block: int | None = None) -> ModelTrace:
    """On one real batch: ``module.trace({}, batch).hidden`` is a non-empty list of
    [B, T, d] tensors (B, T of ``batch["labels"]``; [B, d] when T = 1) holding index
    ``block``. One
    ValueError naming ``key``, what was expected and what came back, otherwise."""
    where = f"{key}: {type(module).__name__}.trace(params, batch) on one evaluation batch"
    labels = token_labels(batch[LABELS], where)
    b, t = labels.shape
    expected = (
        f"expected a ModelTrace whose hidden is a list of float tensors [{b}, {t}, d] (batch "
        f"first, one vector per labelled position; [B, d] is read as [B, 1, d] only when "
        f"the labels are [B]); fix: {_hidden_fix(t)}"
    )
    try:
        trace = module.trace({}, batch)
    except Exception as e:
        raise ValueError(f"{where} raised {type(e).__name__}: {e}; {expected}") from e
    hidden = getattr(trace, "hidden", None)
    if not isinstance(hidden, Sequence) or not hidden:
        got = _describe(trace) if hidden is None else f"hidden {_describe(hidden)}"
        raise ValueError(f"{where} returned {got}; {expected}")
    bad = [
        f"hidden[{i}] {_describe(h)}"
        for i, h in enumerate(hidden)
        if not (
            isinstance(h, Tensor)
            and h.is_floating_point()
            and (
                (h.ndim == 3 and tuple(h.shape[:2]) == (b, t))
                or (h.ndim == 2 and t == 1 and h.shape[0] == b)
            )
        )
    ]
    if bad:
        raise ValueError(f"{where} returned {', '.join(bad[:3])}; {expected}")
    if block is not None and not -len(hidden) <= block < len(hidden):
        raise not_allowed(
            f"{key}.block",
            block,
            f"a block index in [{-len(hidden)}, {len(hidden) - 1}] (the trace has {len(hidden)} "
            "hidden states)",
        )
    return trace


def _hidden_fix(positions: int) -> str:
    """How to give hidden states for labels with ``positions`` positions per row."""
    if positions == 1:
        return (
            "FunctionalAdapter.attach(..., hidden=...) naming layers whose outputs are [B, d] "
            "or [B, 1, d], or a trace returning those"
        )
    return (
        "FunctionalAdapter.attach(..., hidden=...) naming blocks whose outputs are [B, T, d] "
        "(transpose a sequence-first [T, B, d]); a model with one hidden vector per row "
        "needs labels [B] (one label per row)"
    )


def _describe(value: Any) -> str:
    """What came back, in a few words: a tensor's shape and dtype, a container's length."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {list(value.shape)} ({str(value.dtype).replace('torch.', '')})"
    if isinstance(value, tuple | list):
        inner = ", ".join(_describe(v) for v in value[:4])
        return f"a {type(value).__name__} of {len(value)} ({inner})"
    if value is None:
        return "None"
    return f"a {type(value).__name__}"


@torch.no_grad()
def trace_of(model: Any, batch: Batch, params: Mapping[str, Tensor] | None = None) -> Any:
    """``model.trace(params, batch)``: the ``ModelTrace`` (hidden states per block) of the
    module (:class:`TracedModel`) with ``params`` in place (None: the live
    weights); nothing is mutated."""
    return model.trace({} if params is None else params, batch)
