"""WDRemovalCallback: switch weight decay off (or to another ω) mid-run, then watch.

docs/theory.md §3, experiment 6: the paper forks a grokked checkpoint with a fresh optimizer
and trains on with ω ∈ {0, 0.5, 1, 2} (``experiment=wd_intervention`` does that); this
callback does the intervention *inside* one run: at a step (or a delay after the detected
grok step) it sets every parameter group's weight decay to ``weight_decay_after`` and,
optionally, clears the optimizer's state (Adam moments and step counts: the next step
starts them afresh, like a fresh optimizer), then measures the compression read-outs.

The GramCallback's weight-decay tracker reads ω from each parameter group at every step,
so its gradient/weight-decay split stays exact across the change (the WD part of every
delta after the removal is exactly zero for ω = 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import lightning as L

from grokedge.callbacks.intervention import InterventionCallback
from grokedge.checks import check_bool, check_float
from grokedge.config_checks import names_python_arguments

WD_REMOVAL_KEY = "callbacks.wd_removal"
WD_REMOVAL = "wd_removal"


class WDRemovalCallback(InterventionCallback):
    """Sets the optimizer's weight decay to ``weight_decay_after`` at a trigger; measures.

    Off unless a trigger is set (``at_step`` or ``after_grok``).

    Args:
        at_step: fire when ``global_step`` reaches this (before the optimizer step that
            leaves it: every step from this one on uses the new ω). None: not by step.
        after_grok: fire this many steps after the detected grok step (0: at the first
            training batch after detection). None: not after grok. At most one trigger.
        weight_decay_after: ω from the trigger on (>= 0; default 0: removal).
        reset_state: also clear the optimizer state (Adam moments, step counts).
        every: optimizer steps between measurements after the trigger (None: only at it).
        n_sequences, sample, subset_seed, eval_set: the fixed subset of the attention
            entropy and the probe (see ``AblationCallback``; default 300 sequences).
        block: hidden states probed (-1: last block, before the final norm).
        folds: K of the linear probe's grouped K-fold.
        seed: seed of the folds.
        tables, config_key: as ``AblationCallback``.

    Logs (``global_step``): at the trigger ``wd/removed_step``; at the trigger and then
    every ``every`` steps ``wd/theta_norm`` (‖θ‖, every parameter of the network),
    ``wd/theta_norm_selected`` (the Gram's selected parameters), ``wd/attn_entropy``
    (nats; uniform causal attention over 24 tokens: 2.28), ``wd/linear_r2`` (and ``_sd``:
    linear probe of the task's primary target, grouped K-fold), ``wd/test_acc`` (the
    module's latest ``test/acc``, i.e. of the last evaluation), ``wd/weight_decay``.
    Rows ``wd_removal`` in ``analyses.jsonl``; W&B table ``wd/measures_table``.

    Example:
        >>> wd = WDRemovalCallback(after_grok=200, weight_decay_after=0.0, every=100)
        >>> L.Trainer(callbacks=[GramCallback(), wd]).fit(module, dm)  # doctest: +SKIP
    """

    analysis = WD_REMOVAL
    prefix = "wd"

    schedule_defaults: ClassVar[Mapping[str, Any]] = {"every": 100}

    @names_python_arguments
    def __init__(
        self,
        weight_decay_after: float = 0.0,
        reset_state: bool = False,
        config_key: str = WD_REMOVAL_KEY,
        **options: Any,
    ) -> None:
        # options: the trigger (at_step, after_grok), block, folds, seed (as
        # InterventionCallback) and the AnalysisSchedule keys.
        super().__init__(config_key=config_key, **options)
        self.weight_decay_after = check_float(
            f"{config_key}.weight_decay_after", weight_decay_after, 0.0
        )
        self.reset_state = check_bool(f"{config_key}.reset_state", reset_state)

    def fire(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["weight_decay"] = self.weight_decay_after
            if self.reset_state:
                optimizer.state.clear()
        return {"wd/removed_step": float(trainer.global_step)}
