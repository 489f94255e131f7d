"""An analysis that cannot fire before ``max_steps`` says so once, at fit start.

Real short Trainer runs: callbacks built in Python name their class and argument
(``AblationCallback(every=1000)``); callbacks from the Hydra config name their key
(``callbacks.ablation.every=2000``). The WD removal's "no trigger" is reported only for a
callback built in Python (callbacks=full ships it off on purpose).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from grokedge.callbacks import AblationCallback, GramCallback, WDRemovalCallback
from grokedge.models import CausalTransformer
from grokedge.module import GrokModule
from grokedge.tasks.dyck import DyckDataModule

MAX_STEPS = 4
CLI_STEPS = 20
TIMEOUT_S = 600


def _fit(tmp_path: Path, callbacks: list) -> list[str]:
    """Train MAX_STEPS steps; the messages of the warnings raised."""
    torch.set_num_threads(1)
    L.seed_everything(0)
    dm = DyckDataModule(ood_sequences=0, n_sequences=1050)
    net = CausalTransformer(vocab_size=3, num_classes=13, max_len=24)
    module = GrokModule(
        net, functools.partial(torch.optim.AdamW, lr=1e-3), eval_names=dm.eval_names
    )
    trainer = L.Trainer(
        max_steps=MAX_STEPS,
        callbacks=[GramCallback(interval=2), *callbacks],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=dm)
    return [str(w.message) for w in caught]


def test_python_callbacks_that_cannot_fire_warn_once_naming_class_and_argument(
    tmp_path: Path,
) -> None:
    ablation = AblationCallback(
        every=1000, at_grok=False, n_random=2, n_sequences=20, background=False
    )
    fires = AblationCallback(
        every=2, at_grok=False, n_random=2, n_sequences=20, background=False, config_key="a2"
    )
    off = WDRemovalCallback(config_key="wd_off")
    late = WDRemovalCallback(at_step=MAX_STEPS, config_key="wd_late")
    messages = _fit(tmp_path, [ablation, fires, off, late])
    expected = [
        f"AblationCallback(every=1000) cannot fire before max_steps={MAX_STEPS}; it never runs "
        "(lower every, or set at_end=True)",
        "WDRemovalCallback() has no trigger: it does nothing (set at_step=... or after_grok=...)",
        f"WDRemovalCallback(at_step={MAX_STEPS}) cannot fire before max_steps={MAX_STEPS}; "
        "WDRemovalCallback never intervenes (lower at_step)",
    ]
    for text in expected:
        assert messages.count(text) == 1, (text, messages)
    idle = [m for m in messages if "cannot fire" in m or "no trigger" in m]
    assert len(idle) == len(expected), idle  # the callback that fires says nothing
    assert fires.calls > 0 and ablation.calls == 0


def test_at_grok_without_grok_step_cannot_fire(tmp_path: Path) -> None:
    ablation = AblationCallback(every=1000, n_random=2, n_sequences=20, background=False)
    assert ablation.idle_reason(MAX_STEPS, 0, can_grok=True) is None
    assert ablation.idle_reason(MAX_STEPS, 0, can_grok=False) == (
        f"AblationCallback(every=1000) cannot fire before max_steps={MAX_STEPS}, and at_grok "
        "needs a module that reports grok_step; it never runs (lower every, or set at_end=True)"
    )
    # Boundary: a cadence equal to max_steps fires at the last step; after a resume past
    # the last multiple it does not.
    at_limit = AblationCallback(every=MAX_STEPS, at_grok=False, background=False)
    assert at_limit.idle_reason(MAX_STEPS, 0, can_grok=False) is None
    assert at_limit.idle_reason(MAX_STEPS, MAX_STEPS, can_grok=False) is not None
    after = WDRemovalCallback(after_grok=1)
    assert "the module reports no grok_step" in after.idle_reason(MAX_STEPS, 0, can_grok=False)
    assert after.idle_reason(MAX_STEPS, 0, can_grok=True) is None


@pytest.mark.slow
def test_config_callbacks_name_their_hydra_keys(tmp_path: Path) -> None:
    run = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "grokedge.train",
            "task=dyck",
            f"trainer.max_steps={CLI_STEPS}",
            "callbacks=full",
            "callbacks.ablation.at_grok=false",
            "callbacks.probe.at_end=false",
            "callbacks.classes.at_end=false",
            "torch_threads=1",
            "progress_bar.refresh_rate=0",
            "logger=none",
            f"hydra.run.dir={run}",
        ],
        env={**os.environ, "WANDB_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout + done.stderr
    want = (
        f"callbacks.ablation.every=2000 cannot fire before max_steps={CLI_STEPS}; "
        "it never runs (lower every, or set at_end=True)"
    )
    assert text.count(want) == 1, text[-3000:]
    assert "AblationCallback(" not in text
    assert "WDRemovalCallback() has no trigger" not in text  # shipped off in callbacks=full
