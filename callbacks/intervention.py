"""Base of the interventions (weight-decay removal, edge decoupling) and their read-outs.

An intervention fires once at a trigger (a step, or a delay after the detected grok
step), changes how training proceeds, and then measures the compression read-outs of
the paper's weight-decay experiment (docs/theory.md §3, experiment 6) on a cadence.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import lightning as L
from torch import nn

from grokedge.analysis.background import Result
from grokedge.analysis.probe_targets import probe_data, probe_target_tensors
from grokedge.analysis_log import log_scalars
from grokedge.batch import IGNORE_INDEX, Batch
from grokedge.callbacks.common import CADENCE, AnalysisCallback
from grokedge.checks import check_int, check_optional_int, not_allowed
from grokedge.config_checks import names_python_arguments
from grokedge.edge.selection import ParameterSelector
from grokedge.experiments.attention_stats import attention_entropy
from grokedge.experiments.probes import LINEAR, ProbeConfig, score_probes
from grokedge.experiments.subspaces import theta_norms
from grokedge.functional import TRACE, analysed_module, check_block, trace_of
from grokedge.optimizer_facts import decay_of


def compression_measures(
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    batch: Batch,
    selector: ParameterSelector,
    block: int,
    folds: int,
    seed: int,
    key: str,
    prefix: str,
) -> dict[str, float]:
    """The weight-decay experiment's read-outs (docs/theory.md §3, experiment 6).

    ``{prefix}/theta_norm`` (‖θ‖ over every parameter of the network),
    ``{prefix}/theta_norm_selected`` (over the selected ones), ``{prefix}/attn_entropy``
    (mean attention entropy in nats over layers, heads and labelled queries of ``batch``;
    absent when the module's trace holds no attention weights, e.g. an adapted module),
    ``{prefix}/linear_r2`` and ``_sd`` (linear probe of the task's primary probe target
    on block ``block``, grouped K-fold), ``{prefix}/test_acc`` (the module's latest
    ``test/acc``; absent before the first evaluation), ``{prefix}/weight_decay`` (ω of the
    first parameter group of the optimizer now).
    """
    net = analysed_module(pl_module)
    values = {f"{prefix}/{name}": v for name, v in theta_norms(net, selector).items()}
    trace = trace_of(pl_module, batch)
    valid = batch["labels"] != IGNORE_INDEX
    if trace.attn:
        weight = batch.get("weight")
        values[f"{prefix}/attn_entropy"] = attention_entropy(trace.attn, valid, weight)
    targets = probe_target_tensors(trainer.datamodule, batch, key)
    name, target = next(iter(targets.items()))
    hidden = trace.hidden[block]
    data = probe_data(trainer.datamodule, pl_module, batch, hidden, target)
    score = score_probes(
        data.features,
        data.targets,
        data.groups,
        kinds=(LINEAR,),
        folds=min(folds, len(set(data.groups.tolist()))),
        seed=seed,
        sample_weight=data.weights,
        config=ProbeConfig(),
    )[LINEAR]
    values[f"{prefix}/linear_r2"] = score.mean
    values[f"{prefix}/linear_r2_sd"] = score.sd
    acc = trainer.callback_metrics.get("test/acc")
    if acc is not None:
        values[f"{prefix}/test_acc"] = float(acc)
    if trainer.optimizers:
        values[f"{prefix}/weight_decay"] = decay_of(trainer.optimizers[0].param_groups[0])
    return values


TRIGGER = "trigger"
"""``trigger`` of the measurement taken when an intervention fires (before its first step)."""


class InterventionCallback(AnalysisCallback):
    """Base of the interventions (weight-decay removal, edge decoupling).

    Fires once, at the start of the first training batch whose ``global_step`` reaches
    the trigger: ``at_step``, or the detected grok step + ``after_grok``. Off (does
    nothing at all) while neither is set. When it fires it applies :meth:`fire`, takes a
    first measurement of the current weights (``trigger: "trigger"``), then measures every
    ``every`` optimizer steps after the firing step (the compression read-outs of
    :func:`compression_measures`, under ``{prefix}/``, plus :meth:`extra_scalars`).
    """

    needs_edge = False
    prefix = "intervention"
    requires = (TRACE,)

    fixed_schedule: ClassVar[Mapping[str, Any]] = {"at_grok": False, "at_end": False}
    """Triggered by ``at_step`` / ``after_grok``, not by the grok step or the end."""

    @names_python_arguments
    def __init__(
        self,
        *,
        at_step: int | None = None,
        after_grok: int | None = None,
        block: int = -1,
        folds: int = 5,
        seed: int = 0,
        config_key: str,
        **schedule: Any,
    ) -> None:
        super().__init__(
            config_key=config_key,
            **schedule,
        )
        key = config_key
        self.at_step = check_optional_int(f"{key}.at_step", at_step, 0)
        self.after_grok = check_optional_int(f"{key}.after_grok", after_grok, 0)
        if self.at_step is not None and self.after_grok is not None:
            raise ValueError(
                f"{key}.at_step={at_step} and {key}.after_grok={after_grok} are both set: "
                "allowed is at most one trigger (the other null)"
            )
        if isinstance(block, bool) or not isinstance(block, int):
            raise not_allowed(f"{key}.block", block, "a block index (-1: the last)")
        self.block = block
        self.folds = check_int(f"{key}.folds", folds, 2)
        self.seed = check_int(f"{key}.seed", seed, 0)
        self.fired_step: int | None = None
        self.selector: ParameterSelector | None = None

    @property
    def enabled(self) -> bool:
        """A trigger is set."""
        return self.at_step is not None or self.after_grok is not None

    def trigger_step(self, pl_module: L.LightningModule) -> int | None:
        if self.at_step is not None:
            return self.at_step
        grok = getattr(pl_module, "grok_step", None)
        if self.after_grok is not None and grok is not None:
            return int(grok) + self.after_grok
        return None

    def idle_reason(self, max_steps: int, start_step: int, can_grok: bool) -> str | None:
        """Why the intervention cannot fire before ``max_steps`` (it fires at the start of a
        batch whose ``global_step`` reaches the trigger, so a trigger >= max_steps is never
        reached), else None. No trigger at all is reported only for a callback built in
        Python: the config sets (callbacks=full) ship some interventions off on purpose."""
        if self.fired_step is not None:
            return None
        name = type(self).__name__
        if self.at_step is not None:
            if self.at_step < max_steps:
                return None
            return (
                f"{self.argument('at_step', self.at_step)} cannot fire before "
                f"max_steps={max_steps}; {name} never intervenes (lower at_step)"
            )
        if self.after_grok is not None:
            if can_grok and self.after_grok < max_steps:
                return None
            why = (
                "the module reports no grok_step"
                if not can_grok
                else f"grok step + {self.after_grok} is past max_steps={max_steps}"
            )
            return (
                f"{self.argument('after_grok', self.after_grok)} cannot fire: {why}; "
                f"{name} never intervenes (use at_step)"
            )
        if self.from_config:
            return None
        return f"{name}() has no trigger: it does nothing (set at_step=... or after_grok=...)"

    def required(self) -> tuple[str, ...]:
        """Nothing while off (no trigger): the callback then does nothing at all."""
        return self.requires if self.enabled else ()

    @names_python_arguments
    def check_module(self, pl_module: nn.Module) -> None:
        super().check_module(pl_module)
        check_block(f"{self.config_key}.block", self.block, pl_module)

    @names_python_arguments
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if self.gram is not None:
            self.selector = self.gram.selector or self.gram.make_selector(pl_module)
        else:
            self.selector = ParameterSelector.from_module(analysed_module(pl_module))

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int
    ) -> None:
        if self.fired_step is not None or not self.enabled:
            return
        target = self.trigger_step(pl_module)
        if target is None or trainer.global_step < target:
            return
        self.fired_step = trainer.global_step
        values = self.fire(trainer, pl_module)
        log_scalars(trainer, pl_module, values, direct=False)
        self._run(trainer, pl_module, TRIGGER, direct=False)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        step = trainer.global_step
        if self.fired_step is None or self.every is None or step == self.last_step:
            return
        if step <= self.fired_step or (step - self.fired_step) % self.every:
            return
        self._run(trainer, pl_module, CADENCE, direct=False)

    @abstractmethod
    def fire(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Apply the intervention; returns scalars to log at the firing step."""

    def extra_scalars(self) -> dict[str, float]:
        """Scalars of the intervention itself, logged with each measurement."""
        return {}

    def analyse(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> Result:
        assert self.selector is not None
        batch = self.subset(trainer, pl_module)
        scalars = compression_measures(
            trainer,
            pl_module,
            batch,
            self.selector,
            self.block,
            self.folds,
            self.seed,
            self.config_key,
            self.prefix,
        )
        scalars.update(self.extra_scalars())
        measures = {k.split("/", 1)[1]: v for k, v in scalars.items()}
        fields = {"fired_step": self.fired_step, "measures": measures}
        table = [[name, value] for name, value in measures.items()]
        key = f"{self.prefix}/measures_table"
        return Result(scalars, fields, (key, ["measure", "value"], table))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "fired_step": self.fired_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        super().load_state_dict(state_dict)
        self.fired_step = state_dict.get("fired_step")
