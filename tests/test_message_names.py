"""Messages name what their reader wrote: a config key for a run composed by Hydra, the
class and argument for a callback built in Python, and one name per switch."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from grokedge.callbacks import AblationCallback, GramCallback, ProbeCallback, find_gram_callback
from grokedge.checks import ConfigError
from grokedge.train import build, compose

BAD_WINDOW = 1  # the Gram window needs at least two deltas


def test_a_python_built_callback_names_its_class_and_argument() -> None:
    with pytest.raises(ConfigError) as info:
        GramCallback(window=BAD_WINDOW)
    assert str(info.value) == "GramCallback(window=1) is not allowed: an integer >= 2"
    with pytest.raises(ConfigError, match=r"^AblationCallback\(every=0\) is not allowed"):
        AblationCallback(every=0)
    with pytest.raises(ConfigError, match=r"^ProbeCallback\(kinds=\['cubic'\]\) is not allowed"):
        ProbeCallback(kinds=["cubic"])


def test_a_config_built_callback_names_its_key_and_python_after_it(tmp_path: Path) -> None:
    overrides = ["task=dyck", "callbacks=gram", "logger=none", "trainer.max_steps=2"]
    cfg = compose([*overrides, f"callbacks.gram.window={BAD_WINDOW}"], tmp_path / "run")
    with pytest.raises(ConfigError, match=r"callbacks\.gram\.window=1 is not allowed"):
        build(cfg, tmp_path / "run")
    # The composed config stays active in this process (compose sets Hydra's config for the
    # loggers); a callback built in Python afterwards still names its class.
    with pytest.raises(ConfigError, match=r"^GramCallback\(window=1\)"):
        GramCallback(window=BAD_WINDOW)


def test_the_missing_gram_callback_is_named_in_each_readers_terms() -> None:
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError) as python:
        find_gram_callback(trainer, from_config=False)
    assert "L.Trainer(callbacks=[GramCallback(), ...])" in str(python.value)
    assert "callbacks=gram" not in str(python.value)
    with pytest.raises(ValueError, match=r"use callbacks=gram, or add gram_spectrum"):
        find_gram_callback(trainer, from_config=True)


def test_inexact_split_has_one_name_in_python() -> None:
    model = torch.nn.Linear(3, 2)
    l2 = torch.optim.Adam(model.parameters(), lr=0.1, weight_decay=0.1)
    with pytest.raises(ConfigError) as python:
        GramCallback(select="all").check_module(model, l2)
    message = str(python.value)
    assert message.startswith("GramCallback(allow_inexact_split=False) is not allowed: Adam")
    assert "allow_inexact_split set to true" in message and "allow_inexact=" not in message
