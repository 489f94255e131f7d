"""GrokModule: the LightningModule every grokedge run trains.

It owns the loss, the evaluation metrics, grok detection and a *functional* evaluation
(``evaluate(params, batch)``) through which the analysis callbacks ablate and perturb the
model without ever touching the live parameters or the optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.optim import Optimizer
from torchmetrics import MeanMetric

from grokedge.batch import IGNORE_INDEX, Batch
from grokedge.checks import not_allowed
from grokedge.functional import EvalResult
from grokedge.models.trace import ModelTrace

OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]


@dataclass(frozen=True)
class TokenStats:
    """Per-token results of one forward pass.

    ``loss`` [B, T] cross-entropy (0 where not scored), ``correct`` [B, T] bool,
    ``valid`` [B, T] bool (the token has a label), ``reachable`` [B, T] bool (its label is
    one of the head's classes: out-of-distribution labels beyond them count as wrong and
    carry no loss), ``weight`` [B] row multiplicities, ``logits`` [B, T, C].
    """

    loss: Tensor
    correct: Tensor
    valid: Tensor
    reachable: Tensor
    weight: Tensor
    logits: Tensor

    @property
    def token_weight(self) -> Tensor:
        """[B, T] weight of each labelled token: its row's multiplicity, 0 where ignored."""
        return self.weight[:, None] * self.valid

    @property
    def loss_weight(self) -> Tensor:
        """[B, T] like ``token_weight``, 0 also where the label is out of the head's range."""
        return self.weight[:, None] * self.reachable

    def mean_loss(self) -> Tensor:
        """Scalar: the loss averaged over the batch's original (undeduplicated) tokens."""
        w = self.loss_weight
        return (self.loss * w).sum() / w.sum()

    def accuracy(self) -> Tensor:
        w = self.token_weight
        return (self.correct * w).sum() / w.sum()

    def row_correct(self) -> Tensor:
        """[B] bool: every labelled token of the row is right (sequence accuracy)."""
        return (self.correct | ~self.valid).all(dim=1)


def token_stats(logits: Tensor, labels: Tensor, weight: Tensor) -> TokenStats:
    """Cross-entropy and correctness per token; ``labels == IGNORE_INDEX`` are skipped."""
    valid = labels != IGNORE_INDEX
    reachable = valid & (labels < logits.shape[-1])
    scored = torch.where(reachable, labels, IGNORE_INDEX)
    loss = F.cross_entropy(
        logits.flatten(0, 1), scored.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(labels)
    correct = (logits.argmax(-1) == labels) & valid
    return TokenStats(loss, correct, valid, reachable, weight.to(logits.dtype), logits)


class GrokModule(L.LightningModule):
    """Trains ``net`` on a grokking task and decides when it has grokked.

    Args:
        net: a grokedge model (``input_keys`` names the batch entries it reads).
        optimizer: builds the optimizer from parameters (Hydra ``_partial_`` AdamW).
        eval_names: names of the evaluation sets, in ``val_dataloader()`` order.
        grok_metric: metric that decides grokking, e.g. ``test/acc``.
        grok_threshold: the metric must reach this value...
        grok_patience: ...at this many consecutive evaluations; the grok step is the
            first of them.
        warmup_steps: linear learning-rate warm-up from 0 (0: constant from the start).
        stop_after_grok: stop this many steps after the grok step (None: run on).
        exact_match_sets: evaluation sets on which seq2seq models are also decoded
            greedily for ``{set}/exact_match`` (costly: one decoder pass per position).
        eval_cadence: evaluation sets evaluated less often than every evaluation, as
            ``{name: steps}`` (e.g. ``{"ood": 1000}``); the others run at every one.
        log_every_n_steps: cadence of ``train/batch_loss``.

    Attributes:
        grok_step: the run's grok step (``None``: not grokked yet).
        grok_history: ``(step, value)`` of ``grok_metric`` at every evaluation, in step
            order, checkpointed with the grok state; :meth:`grok_steps` reads the grok step
            under other thresholds and patiences from it.

    Example:
        >>> from functools import partial
        >>> from grokedge.models import CausalTransformer
        >>> net = CausalTransformer(vocab_size=3, num_classes=13, max_len=24)
        >>> module = GrokModule(net, partial(torch.optim.AdamW, lr=1e-3))
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory,
        eval_names: Sequence[str] = ("test",),
        grok_metric: str = "test/acc",
        grok_threshold: float = 0.95,
        grok_patience: int = 1,
        warmup_steps: int = 0,
        stop_after_grok: int | None = None,
        exact_match_sets: Sequence[str] = ("test",),
        eval_cadence: Mapping[str, int] | None = None,
        log_every_n_steps: int = 50,
    ) -> None:
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer
        self.eval_names = tuple(eval_names)
        self.grok_metric = grok_metric
        self.grok_threshold = grok_threshold
        self.grok_patience = grok_patience
        self.warmup_steps = warmup_steps
        self.stop_after_grok = stop_after_grok
        self.log_every_n_steps = log_every_n_steps
        self.eval_cadence = dict(eval_cadence or {})
        self.is_seq2seq = hasattr(net, "generate")
        self.exact_match_sets = tuple(exact_match_sets) if self.is_seq2seq else ()
        self.metric_names = self._metric_names()
        self.metrics = nn.ModuleDict({_key(name): MeanMetric() for name in self.metric_names})
        self.grok_step: int | None = None
        self._streak_start: int | None = None
        self._streak = 0
        # (step, value) of the grok metric at every evaluation that measured it, in step
        # order: the run's grok step under other thresholds and patiences is read from it
        # at the end (grok_steps). Kept in the checkpoint, so a resumed run (whose own
        # metrics.jsonl starts at the resume) still has the evaluations before the resume.
        self.grok_history: list[tuple[int, float]] = []

    # -- model ------------------------------------------------------------------------
    def forward(self, batch: Batch) -> Tensor:
        return self.net(*(batch[k] for k in self.net.input_keys))

    def stats(self, batch: Batch) -> TokenStats:
        return token_stats(self(batch), batch["labels"], batch["weight"])

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def evaluate(self, params: Mapping[str, Tensor], batch: Batch) -> EvalResult:
        """Loss, accuracy and logits of the model with ``params`` in place of its own.

        ``params`` maps parameter names of ``net`` (e.g. ``blocks.0.attn.in_proj_weight``)
        to tensors; names left out keep the live values. Nothing of the live model or the
        optimizer changes, so analyses can run between training steps.
        """
        logits = functional_call(
            self.net, dict(params), tuple(batch[k] for k in self.net.input_keys), strict=False
        )
        stats = token_stats(logits, batch["labels"], batch["weight"])
        return EvalResult(stats.mean_loss(), stats.accuracy(), logits)

    @property
    def input_keys(self) -> tuple[str, ...]:
        """The batch keys ``net`` takes (the ``grokedge.functional`` protocol)."""
        return tuple(self.net.input_keys)

    def trace(self, params: Mapping[str, Tensor], batch: Batch) -> ModelTrace:
        """``net``'s ``ModelTrace`` (hidden states and attention per block) with ``params``
        in place of its own (``{}``: the live weights); the ``grokedge.functional``
        protocol's hidden-state hook. Nothing of the live model changes."""
        inputs = tuple(batch[k] for k in self.net.input_keys)
        _, trace = functional_call(
            self.net, dict(params), inputs, {"return_trace": True}, strict=False
        )
        return trace

    # -- training ---------------------------------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss = self.stats(batch).mean_loss()
        # Logging every step costs more than a small model's step; log on a cadence, and
        # stamp the loss with the step of the weights it was computed at (self.log would
        # hold it until Lightning's own flush, a batch count later, so a resumed run could
        # not reproduce the rows).
        if self.global_step % self.log_every_n_steps == 0:
            self.log_scalars({"train/batch_loss": loss.detach()})
        return loss

    def on_train_batch_end(self, outputs: object, batch: Batch, batch_idx: int) -> None:
        self._stop_if_done()

    def _stop_if_done(self) -> None:
        if (
            self.grok_step is not None
            and self.stop_after_grok is not None
            and self.global_step >= self.grok_step + self.stop_after_grok
        ):
            self.trainer.should_stop = True

    def configure_optimizers(self) -> dict:
        optimizer = self.optimizer_factory(self.net.parameters())
        if not self.warmup_steps:
            return {"optimizer": optimizer}
        warmup = self.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # -- evaluation -------------------------------------------------------------------
    def _metric_names(self) -> list[str]:
        names = []
        for s in self.eval_names:
            names += [f"{s}/loss", f"{s}/acc"]
            if s == "test":
                names.append("test/acc_unseen")
            if self.is_seq2seq:
                names.append(f"{s}/seq_acc")
            if s in self.exact_match_sets:
                names.append(f"{s}/exact_match")
        return names

    def _update(self, name: str, values: Tensor, weights: Tensor) -> None:
        metric = self.metrics[_key(name)]
        metric.update(values.to(torch.float32), weights.to(torch.float32))

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        name = self.eval_names[dataloader_idx]
        if self.global_step % self.eval_cadence.get(name, 1):
            return
        s = self.stats(batch)
        w = s.token_weight
        self._update(f"{name}/loss", s.loss[s.reachable], w[s.reachable])
        self._update(f"{name}/acc", s.correct[s.valid], w[s.valid])
        if "unseen" in batch and f"{name}/acc_unseen" in self.metric_names:
            mask = s.valid & batch["unseen"][:, None]
            if mask.any():
                self._update(f"{name}/acc_unseen", s.correct[mask], w[mask])
        if self.is_seq2seq:
            self._update(f"{name}/seq_acc", s.row_correct(), s.weight)
        if name in self.exact_match_sets:
            self._update(f"{name}/exact_match", self._exact_match(batch), s.weight)

    def _exact_match(self, batch: Batch) -> Tensor:
        """[B] bool: greedy decoding reproduces the target sequence exactly."""
        labels = batch["labels"]
        decoded = self.net.generate(batch["src"], max_len=labels.shape[1])
        width = min(decoded.shape[1], labels.shape[1])
        valid = labels != IGNORE_INDEX
        agree = decoded[:, :width] == labels[:, :width]
        # Positions past the decoded length count as wrong unless they are padding.
        agree = torch.cat([agree, ~valid[:, width:]], dim=1)
        return (agree | ~valid).all(dim=1)

    def on_validation_epoch_end(self) -> None:
        values = {}
        for name in self.metric_names:
            metric = self.metrics[_key(name)]
            if metric.update_called:
                values[name] = metric.compute()
            metric.reset()
        self.log_scalars(values)
        self._detect_grok(values, self.global_step)
        self._stop_if_done()

    def _detect_grok(self, values: Mapping[str, Tensor], step: int) -> None:
        if self.grok_metric not in values:
            return
        value = values[self.grok_metric]
        self._record_grok_metric(step, float(value))
        if self.grok_step is not None:
            return
        # Compare in the metric's own precision: a float32 accuracy of 475/500 is
        # 0.949999988, which the float64 0.95 would refuse although it is exactly 95 %.
        threshold = torch.as_tensor(self.grok_threshold, dtype=value.dtype, device=value.device)
        if bool(value >= threshold):
            if self._streak == 0:
                self._streak_start = step
            self._streak += 1
        else:
            self._streak, self._streak_start = 0, None
        if self._streak >= self.grok_patience:
            self.grok_step = self._streak_start
            self.log_scalars({"grok/step": float(self.grok_step)})

    def _record_grok_metric(self, step: int, value: float) -> None:
        # An evaluation at a step already recorded (one repeated after a resume from a
        # checkpoint written after it) replaces the earlier record and what followed it.
        while self.grok_history and self.grok_history[-1][0] >= step:
            self.grok_history.pop()
        self.grok_history.append((int(step), value))

    def grok_steps(
        self, thresholds: Sequence[float], patiences: Sequence[int]
    ) -> dict[str, int | None]:
        """The grok step under each threshold × patience, over this run's evaluations of
        ``grok_metric`` (see :func:`grok_steps`)."""
        return grok_steps(self.grok_history, thresholds, patiences)

    def log_scalars(self, values: Mapping[str, Tensor | float]) -> None:
        """Log scalars at ``global_step``, the number of optimizer steps taken so far.

        Lightning's own ``self.log`` stamps metrics logged during a mid-epoch validation
        with the count of batches *before* the current one (one less than the optimizer
        steps behind the evaluated weights); analyses and evaluations are labelled with the
        step of the weights they measured instead. The values still reach
        ``trainer.callback_metrics`` (progress bar, checkpoint monitors).
        """
        if not values:
            return
        self.log_dict(dict(values), logger=False)
        scalars = {k: float(v) for k, v in values.items()}
        for logger in self.loggers:
            logger.log_metrics(scalars, step=self.global_step)

    # -- checkpoint -------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["grok"] = {
            "step": self.grok_step,
            "streak": self._streak,
            "streak_start": self._streak_start,
            "history": [[step, value] for step, value in self.grok_history],
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        grok = checkpoint.get("grok", {})
        self.grok_step = grok.get("step")
        self._streak = grok.get("streak", 0)
        self._streak_start = grok.get("streak_start")
        # A checkpoint written before the history was kept has none: grok_steps then see
        # only the evaluations after the resume.
        self.grok_history = [(int(step), float(value)) for step, value in grok.get("history", [])]


def grok_step_of(
    history: Sequence[tuple[int, float]], threshold: float, patience: int
) -> int | None:
    """The first step of the first ``patience`` consecutive evaluations whose metric is at
    or above ``threshold`` (``None``: no such run of evaluations) — GrokModule's rule.

    Args:
        history: ``(step, value)`` of each evaluation, in step order (values are the
            metric's float32 numbers, as logged).
        threshold: the value to reach, compared in float32 as the metric is computed (a
            float32 accuracy of 475/500 is 0.949999988: exactly 95 %, so it meets 0.95).
        patience: evaluations in a row (>= 1).
    """
    if patience < 1:
        raise not_allowed("patience", patience, "an integer >= 1")
    bar = torch.tensor(threshold, dtype=torch.float32)
    streak, start = 0, None
    for step, value in history:
        if bool(torch.tensor(value, dtype=torch.float32) >= bar):
            if streak == 0:
                start = step
            streak += 1
            if streak >= patience:
                return start
        else:
            streak, start = 0, None
    return None


def grok_step_key(threshold: float, patience: int) -> str:
    """``summary.json``'s ``grok_steps`` key of a threshold and patience, e.g. ``"0.95/3"``."""
    return f"{threshold:.2f}/{patience}"


def grok_steps(
    history: Sequence[tuple[int, float]], thresholds: Sequence[float], patiences: Sequence[int]
) -> dict[str, int | None]:
    """``{grok_step_key(t, p): grok_step_of(history, t, p)}`` for every threshold × patience
    (thresholds outer, patiences inner, in the given order)."""
    return {grok_step_key(t, p): grok_step_of(history, t, p) for t in thresholds for p in patiences}


def _key(metric_name: str) -> str:
    # ModuleDict keys may not contain "."; "/" is kept readable as "__".
    return metric_name.replace("/", "__")
