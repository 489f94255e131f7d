"""InitFromCheckpoint: start a run from another run's weights, with everything else fresh.

The paper's weight-decay intervention (docs/theory.md §3, experiment 6) forks a grokked
checkpoint with a *fresh* optimizer. ``resume=<ckpt>`` would restore the optimizer, the
step counter and every callback's state; this callback loads the model weights only:
the run starts at step 0 with a fresh optimizer (built from the current config, e.g. a
new ω), fresh analyses and a fresh grok detection.

It loads in ``setup`` (before the optimizer is built and before any callback's
``on_fit_start``, so a GramCallback's first capture already sees the loaded weights).
A run resumed with ``resume=`` then restores its own checkpoint over these weights, so a
killed forked run continues where it stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from grokedge.checks import not_allowed
from grokedge.config_checks import built_from_config, names_python_arguments

INIT_FROM_KEY = "init_from"
"""The root config key holding the checkpoint path (``init_from=<path>``)."""


class InitFromCheckpoint(Callback):
    """Load a checkpoint's model weights (only) into the module when fitting starts.

    Args:
        path: a Lightning checkpoint (``<run_dir>/checkpoints/last.ckpt``: its
            ``state_dict`` is used) or a file holding a bare ``state_dict`` of the module.
            Loaded with ``torch.load(weights_only=True)``.
        strict: every parameter of the module must be in the checkpoint and vice versa.
        config_key: config key named in error messages.

    Example:
        >>> InitFromCheckpoint("outputs/dyck/run/checkpoints/last.ckpt")  # doctest: +SKIP
    """

    @names_python_arguments
    def __init__(self, path: str | None, strict: bool = True, config_key: str = INIT_FROM_KEY):
        super().__init__()
        self.config_key = config_key
        self.from_config = built_from_config()  # messages: config keys or arguments
        if not isinstance(path, str | Path) or not str(path):
            raise not_allowed(
                f"{config_key}",
                path,
                "the path of a checkpoint, e.g. outputs/dyck/<date>/<time>/checkpoints/last.ckpt",
            )
        self.path = Path(path)
        if not self.path.is_file():
            raise not_allowed(f"{config_key}", str(path), "no such file")
        if not isinstance(strict, bool):
            raise not_allowed(f"{config_key}.strict", strict, "true or false")
        self.strict = strict
        self.loaded_step: int | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(config_key=self.config_key)

    def read(self) -> tuple[dict[str, torch.Tensor], int | None]:
        """The module ``state_dict`` in the file and the step it was saved at (if known)."""
        try:
            blob: Any = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors of all kinds
            raise ValueError(
                f"{self.config_key}={str(self.path)!r}: cannot be read as a checkpoint "
                f"with torch.load(weights_only=True): {e}"
            ) from e
        if isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict):
            return blob["state_dict"], blob.get("global_step")
        if isinstance(blob, dict) and all(isinstance(v, torch.Tensor) for v in blob.values()):
            return blob, None
        raise ValueError(
            f"{self.config_key}={str(self.path)!r} holds no state_dict (a Lightning checkpoint "
            "or a bare module state_dict is allowed)"
        )

    @names_python_arguments
    def check_module(self, pl_module: torch.nn.Module) -> None:
        """Fail before training if the checkpoint does not fit the model."""
        state, _ = self.read()
        self._load(pl_module, state, dry_run=True)

    def _load(self, pl_module: torch.nn.Module, state: dict, dry_run: bool = False) -> None:
        own = pl_module.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if shapes or (self.strict and (missing or unexpected)):
            raise ValueError(
                f"{self.config_key}={str(self.path)!r} does not fit the model: missing "
                f"{missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {shapes[:5]} "
                f"(allowed: a checkpoint of the same task and model; {self.config_key}.strict"
                "=false ignores missing/unexpected keys)"
            )
        if not dry_run:
            pl_module.load_state_dict(state, strict=self.strict)

    @names_python_arguments
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        state, step = self.read()
        self._load(pl_module, state)
        self.loaded_step = None if step is None else int(step)

    def state_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "loaded_step": self.loaded_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self.loaded_step = state_dict.get("loaded_step")
