"""``FunctionalAdapter``: the ``grokedge.functional`` protocol for a plain LightningModule.

grokedge's causal callbacks evaluate a module functionally (``evaluate(params, batch)``)
and read its hidden states (``trace(params, batch)``); ``GrokModule`` has both. Any other
LightningModule gets them from its own ``forward`` and a loss function::

    module = MyLightningModule(...)
    FunctionalAdapter.attach(
        module, F.cross_entropy, inputs=("tokens",), hidden="model.blocks"
    )
    trainer = L.Trainer(callbacks=[GramCallback(), AblationCallback(), ProbeCallback()])

A classifier or an MLP is first-class: labels [B] are read as [B, 1], a forward returning
logits [B, C] gives [B, 1, C] and a block returning [B, d] gives hidden [B, 1, d]. A
``DataLoader`` of tuples (a ``TensorDataset``) is named with ``batch_keys``::

    FunctionalAdapter.attach(module, batch_keys=("x", "labels"), hidden="net")

``attach`` sets ``module.evaluate``, ``module.trace`` (when ``hidden`` is given),
``module.input_keys``, ``module.batch_keys`` and ``module.n_blocks``; nothing else of the
module changes and nothing is added to its ``state_dict``. Plain torch (no Lightning import).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from grokedge.batch import IGNORE_INDEX, LABELS, Batch, token_labels
from grokedge.checks import not_allowed
from grokedge.functional import EvalResult, analysed_module
from grokedge.models.trace import ModelTrace

LossFn = Callable[[Tensor, Tensor], Tensor]


class FunctionalAdapter:
    """``evaluate`` and ``trace`` for ``module``, built from its ``forward``.

    Args:
        module: the LightningModule (any ``nn.Module``) the callbacks analyse.
            ``params`` names are those of ``grokedge.functional.analysed_module(module)``
            (``module.net`` if it is an ``nn.Module``, else ``module``), the names the
            GramCallback's selector matches.
        loss_fn: ``(logits [N, C], labels [N]) -> scalar``, called on the flattened
            tokens, mean over the labels that are not -100 (``F.cross_entropy``, the
            default, or ``F.nll_loss`` for a forward that returns log-probabilities).
            Row weights (``batch["weight"]``, the multiplicities of deduplicated rows)
            are applied by repeating rows, so they must be whole numbers.
        inputs: batch keys passed positionally to ``module.forward``, in order (None,
            with ``batch_keys``: every named position but ``labels`` and ``weight``).
        batch_keys: names of the positions of a tuple batch, in order (e.g. ``("x",
            "labels")`` for ``TensorDataset(x, y)``), ``labels`` among them; None: the
            evaluation batches are dicts.
        hidden: where the hidden states are: the name of a submodule whose children are
            the blocks (an ``nn.ModuleList`` or ``nn.Sequential``, e.g.
            ``"model.transformer.decoder.layers"``), or a list of submodule names. Each
            block's output (its first element if it returns a tuple) must be [B, T, d],
            batch first, or [B, d] when the labels are [B] (read as [B, 1, d]). None: no
            ``trace`` (probes and classes then refuse the module).
        math_attention: run under ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``:
            PyTorch's fused attention kernels (``nn.MultiheadAttention`` uses them) have
            no forward-mode AD, which the exact Hessian-vector products need.

    The forward's output may be logits [B, T, C], flattened [B·T, C] (as Lightning's demo
    ``Transformer`` returns them; a classifier's [B, C] is this with T = 1), or a tuple /
    an object with ``logits`` whose first element / ``logits`` is one of those.
    """

    def __init__(
        self,
        module: nn.Module,
        loss_fn: LossFn | None = None,
        *,
        inputs: Sequence[str] | str | None = None,
        batch_keys: Sequence[str] | None = None,
        hidden: str | Sequence[str] | None = None,
        math_attention: bool = True,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        cls = type(self).__name__
        names = None if batch_keys is None else batch_keys
        if names is not None:
            names = (names,) if isinstance(names, str) else tuple(names)
            if LABELS not in names or not all(isinstance(k, str) and k for k in names):
                raise not_allowed(
                    f"{cls}(batch_keys)",
                    batch_keys,
                    "one name per position of a tuple batch, 'labels' among them (e.g. "
                    "('x', 'labels') for TensorDataset(x, y))",
                )
        self.batch_keys: tuple[str, ...] | None = names
        if inputs is None:
            if names is None:
                raise ValueError(
                    f"{cls}: no inputs; allowed: inputs=[the batch keys module.forward takes, "
                    "in order] or batch_keys=(names of a tuple batch's positions); fix: "
                    "FunctionalAdapter.attach(module, loss_fn, inputs=('x',)) for dict "
                    "batches {'x': ..., 'labels': ...}"
                )
            inputs = tuple(k for k in names if k not in (LABELS, "weight"))
        keys = (inputs,) if isinstance(inputs, str) else tuple(inputs)
        if not keys or not all(isinstance(k, str) and k for k in keys):
            raise not_allowed(f"{cls}(inputs)", inputs, "a non-empty list of batch keys")
        if names is not None and any(k not in names for k in keys):
            raise not_allowed(f"{cls}(inputs)", inputs, f"batch keys among batch_keys={names!r}")
        self.module = module
        self.loss_fn: LossFn = F.cross_entropy if loss_fn is None else loss_fn
        self.input_keys = keys
        self.math_attention = bool(math_attention)
        net = analysed_module(module)
        self.prefix = "" if net is module else _name_of(module, net) + "."
        self.blocks = _resolve_blocks(module, hidden)
        self.n_blocks = len(self.blocks) if self.blocks else None

    @classmethod
    def attach(cls, module: nn.Module, loss_fn: LossFn | None = None, **kwargs: Any) -> nn.Module:
        """Give ``module`` the protocol's ``evaluate``, ``trace`` (with ``hidden``),
        ``input_keys`` and ``n_blocks``; returns ``module``. ``kwargs``: as the class."""
        adapter = cls(module, loss_fn, **kwargs)
        module.functional_adapter = adapter
        module.evaluate = adapter.evaluate
        module.input_keys = adapter.input_keys
        module.batch_keys = adapter.batch_keys
        module.n_blocks = adapter.n_blocks
        if adapter.blocks:
            module.trace = adapter.trace
        return module

    # ------------------------------------------------------------------ the protocol

    def evaluate(self, params: Mapping[str, Tensor], batch: Batch) -> EvalResult:
        """Loss (``loss_fn``), token accuracy over labels != -100 and logits [B, T, C]
        with ``params`` in place of the analysed module's parameters (labels [B] are read
        as [B, 1]: logits [B, 1, C])."""
        labels = token_labels(batch[LABELS])
        with self._kernels():
            out = self._call(params, batch)
        logits = _as_logits(out, labels)
        weight = batch.get("weight")
        return EvalResult(
            self._loss(logits, labels, weight), token_accuracy(logits, labels, weight), logits
        )

    def trace(self, params: Mapping[str, Tensor], batch: Batch) -> ModelTrace:
        """The output of every block of ``hidden`` (forward hooks), ``params`` in place;
        a block's [B, d] is [B, 1, d] when the labels have one position per row."""
        if not self.blocks:
            raise ValueError("FunctionalAdapter(hidden=None) has no hidden states to trace")
        outputs: list[Tensor] = []

        def keep(_module: nn.Module, _args: Any, output: Any) -> None:
            outputs.append(output[0] if isinstance(output, tuple | list) else output)

        handles = [block.register_forward_hook(keep) for block in self.blocks]
        try:
            with self._kernels():
                self._call(params, batch)
        finally:
            for handle in handles:
                handle.remove()
        positions = token_labels(batch[LABELS]).shape[1] if LABELS in batch else None
        if positions == 1:
            # An MLP's hidden state is one vector per row: the one labelled position.
            outputs = [h[:, None] if isinstance(h, Tensor) and h.ndim == 2 else h for h in outputs]
        return ModelTrace(hidden=outputs)

    # -------------------------------------------------------------------- plumbing

    def _call(self, params: Mapping[str, Tensor], batch: Batch) -> Any:
        named = {self.prefix + name: t for name, t in params.items()}
        return functional_call(self.module, named, self._inputs(batch), strict=False)

    def _inputs(self, batch: Batch) -> tuple[Tensor, ...]:
        missing = [k for k in self.input_keys if k not in batch]
        if missing:
            raise ValueError(
                f"{type(self).__name__}(inputs={self.input_keys!r}): the batch has no "
                f"{missing} (its keys: {sorted(batch)}); fix: inputs=[the batch keys "
                "module.forward takes, in order]"
            )
        return tuple(batch[k] for k in self.input_keys)

    def _kernels(self) -> contextlib.AbstractContextManager:
        if not self.math_attention:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])

    def _loss(self, logits: Tensor, labels: Tensor, weight: Tensor | None) -> Tensor:
        if weight is not None and not bool((weight == 1).all()):
            counts = weight.round()
            if not bool((counts == weight).all()) or bool((counts < 0).any()):
                raise ValueError(
                    "FunctionalAdapter: row weights must be whole numbers (multiplicities) "
                    "to weight a loss_fn"
                )
            rows = torch.repeat_interleave(
                torch.arange(labels.shape[0], device=labels.device), counts.long()
            )
            logits, labels = logits[rows], labels[rows]
        return self.loss_fn(logits.flatten(0, 1), labels.flatten())


def token_accuracy(logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
    """Scalar: the fraction of labelled tokens (labels [B, T] or [B] != -100) whose argmax
    of ``logits`` [B, T, C] is the label, each row weighted by ``weight`` [B] (None: 1);
    NaN with no labelled token."""
    labels = token_labels(labels)
    valid = labels != IGNORE_INDEX
    w = valid.to(logits.dtype)
    if weight is not None:
        w = w * weight.to(logits.dtype)[:, None]
    correct = (logits.argmax(-1) == labels).to(logits.dtype)
    return (correct * w).sum() / w.sum()


def _as_logits(out: Any, labels: Tensor) -> Tensor:
    """The forward's output as [B, T, C] for ``labels`` [B, T] (as given when it is not
    one of the accepted layouts: the protocol check then names it)."""
    if not isinstance(out, Tensor):
        if hasattr(out, "logits"):
            out = out.logits
        elif isinstance(out, tuple | list) and out:
            out = out[0]
    if not isinstance(out, Tensor):
        return out
    b, t = labels.shape[0], labels.shape[1] if labels.ndim > 1 else 1
    if out.ndim == 2 and out.shape[0] == b * t:
        return out.view(b, t, out.shape[-1])
    return out


def _name_of(root: nn.Module, child: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is child:
            return name
    raise ValueError(f"{type(child).__name__} is not a submodule of {type(root).__name__}")


def _resolve_blocks(module: nn.Module, hidden: str | Sequence[str] | None) -> list[nn.Module]:
    if hidden is None:
        return []
    names = [hidden] if isinstance(hidden, str) else list(hidden)
    blocks: list[nn.Module] = []
    for name in names:
        try:
            sub = module.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"hidden={hidden!r}: {type(module).__name__} has no {name!r}") from e
        if isinstance(hidden, str) and isinstance(sub, nn.ModuleList | nn.Sequential):
            blocks.extend(sub)
        else:
            blocks.append(sub)
    if not blocks:
        raise ValueError(f"hidden={hidden!r} names no blocks")
    return blocks
