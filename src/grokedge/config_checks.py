"""Checks of a composed config that must pass before anything is built or trained.

Each failure is one :class:`ConfigError` naming the key, the value and what is allowed.
Unknown config-group options (``task=foo``, ``callbacks=foo``, ``logger=foo``) never get
here: Hydra rejects them while composing, listing the available options.
"""

from __future__ import annotations

import functools
import numbers
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from omegaconf import DictConfig, OmegaConf

from grokedge.checks import ConfigError, not_allowed

TASKS = ("dyck", "modular", "scan")

P = ParamSpec("P")
R = TypeVar("R")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _require(cfg: DictConfig, key: str, ok: Any, allowed: str) -> None:
    value = OmegaConf.select(cfg, key, throw_on_missing=False)
    if not ok(value):
        raise not_allowed(key, value, allowed)


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` on the first value grokedge cannot run with."""
    _require(cfg, "task.name", lambda v: v in TASKS, f"one of {', '.join(TASKS)}")
    _require(cfg, "optimizer.lr", lambda v: _is_number(v) and v > 0, "a number > 0")
    _require(cfg, "optimizer.weight_decay", lambda v: _is_number(v) and v >= 0, "a number >= 0")
    _require(
        cfg,
        "trainer.max_steps",
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "an integer >= 1",
    )
    _require(cfg, "task.eval_every", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
    _require(
        cfg, "task.grok.threshold", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"
    )
    _require(cfg, "task.grok.patience", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
    grok_alternatives(cfg)
    _require(
        cfg,
        "task.stop_after_grok",
        lambda v: v is None or (isinstance(v, int) and v >= 0),
        "null or an integer >= 0",
    )
    _require(cfg, "task.gram_interval", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
    _check_burn_in(cfg)
    _require(cfg, "warmup_steps", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
    _require(cfg, "seed", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
    torch_threads(cfg)
    _check_module(cfg)
    for key in ("resume", "init_from"):
        _require_file(cfg, key)


TORCH_THREADS_KEY = "torch_threads"


def torch_threads(cfg: DictConfig) -> int | None:
    """``torch_threads`` as ``torch.set_num_threads`` takes it: ``None`` (torch's own
    default, left alone) or an integer >= 1.

    Its default comes from the environment (``GROKEDGE_TORCH_THREADS``, which the local
    launcher sets to "1" for each job), so a string of decimal digits counts as its number.
    Anything else (0, -1, ``abc``, 1.5, true, an empty string) is a ConfigError.
    """
    value = OmegaConf.select(cfg, TORCH_THREADS_KEY, throw_on_missing=False)
    if value is None:
        return None
    number = int(value) if isinstance(value, str) and re.fullmatch(r"[0-9]+", value) else value
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise not_allowed(
            TORCH_THREADS_KEY,
            value,
            "null (torch's default) or an "
            "integer >= 1 (also from the environment variable GROKEDGE_TORCH_THREADS)",
        )
    return number


GROK_ALTERNATIVES_KEY = "task.grok.alternatives"


def grok_alternatives(cfg: DictConfig) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """``task.grok.alternatives``: the thresholds and patiences of ``summary.json``'s
    ``grok_steps`` (every threshold × patience over the grok metric's evaluations).

    Thresholds: a non-empty list of distinct numbers in (0, 1] with at most two decimals
    (each is named by its key ``f"{t:.2f}"``, which must say exactly which threshold it is);
    patiences: a non-empty list of distinct integers >= 1.
    """
    key_t, key_p = f"{GROK_ALTERNATIVES_KEY}.thresholds", f"{GROK_ALTERNATIVES_KEY}.patiences"
    thresholds = OmegaConf.select(cfg, key_t, throw_on_missing=False)
    patiences = OmegaConf.select(cfg, key_p, throw_on_missing=False)
    allowed_t = (
        "a non-empty list of distinct numbers in (0, 1] with at most two decimals "
        "(named by them in summary.json's grok_steps, e.g. [0.90, 0.95, 0.99])"
    )
    allowed_p = "a non-empty list of distinct integers >= 1 (e.g. [1, 3])"
    items_t = _as_list(thresholds)
    if (
        not items_t
        or any(not (_is_number(t) and 0 < t <= 1 and float(f"{t:.2f}") == t) for t in items_t)
        or len(set(items_t)) != len(items_t)
    ):
        raise not_allowed(key_t, _plain(thresholds), allowed_t)
    items_p = _as_list(patiences)
    if (
        not items_p
        or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in items_p)
        or len(set(items_p)) != len(items_p)
    ):
        raise not_allowed(key_p, _plain(patiences), allowed_p)
    return tuple(float(t) for t in items_t), tuple(items_p)


def _as_list(value: Any) -> list[Any]:
    """The items of a list (plain or OmegaConf); ``[]`` for anything else."""
    if OmegaConf.is_list(value):
        return list(OmegaConf.to_container(value, resolve=True))
    return list(value) if isinstance(value, list | tuple) else []


def _plain(value: Any) -> Any:
    """A value as the user wrote it (an OmegaConf list as a plain list), for messages."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


# GrokModule's knobs (conf/module/) that a run cannot go on with, as (key, ok, allowed).
MODULE_CHECKS: tuple[tuple[str, Any, str], ...] = (
    ("grok_threshold", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    ("grok_patience", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    (
        "stop_after_grok",
        lambda v: v is None or (isinstance(v, int) and v >= 0),
        "null or an integer >= 0",
    ),
    ("warmup_steps", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
)


def _check_module(cfg: DictConfig) -> None:
    """The ``module`` node interpolates ``task.grok.*``, ``warmup_steps``, ...: those are
    checked above under their own names. A value set on the node itself
    (``module.grok_threshold=2``) is checked here, under the module's key."""
    node = cfg.get("module")
    if not isinstance(node, DictConfig):
        return
    for key, ok, allowed in MODULE_CHECKS:
        if not OmegaConf.is_interpolation(node, key):
            _require(cfg, f"module.{key}", ok, allowed)


def _check_burn_in(cfg: DictConfig) -> None:
    """An explicit ``callbacks.gram.start_step`` is a step the run reaches: a burn-in at or
    beyond ``trainer.max_steps`` would leave the ``burn_in`` edge empty for the whole run.
    (null, the default, is one Gram interval.)"""
    key = "callbacks.gram.start_step"
    value = OmegaConf.select(cfg, key, throw_on_missing=False, default=None)
    if value is None:
        return
    max_steps = OmegaConf.select(cfg, "trainer.max_steps")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < max_steps:
        raise not_allowed(
            key,
            value,
            f"null or an integer >= 0 and below trainer.max_steps={max_steps} (optimizer steps)",
        )


def _require_file(cfg: DictConfig, key: str) -> None:
    """``key`` is null or the path of an existing file (a checkpoint)."""
    value = OmegaConf.select(cfg, key, throw_on_missing=False, default=None)
    if value is None:
        return
    allowed = "null or the path of a checkpoint, e.g. <run_dir>/checkpoints/last.ckpt"
    if not isinstance(value, str) or not value:
        raise not_allowed(key, value, allowed)
    if not Path(value).is_file():
        raise not_allowed(key, value, f"no such file; {allowed}")


_BUILDING_FROM_CONFIG: ContextVar[bool] = ContextVar("grokedge_from_config", default=False)


@contextmanager
def building_from_config() -> Iterator[None]:
    """While open, callbacks are being instantiated from a config (``grokedge.train.build``):
    their messages name config keys. Outside it (a plain Python script, a test), they name
    their class and argument."""
    token = _BUILDING_FROM_CONFIG.set(True)
    try:
        yield
    finally:
        _BUILDING_FROM_CONFIG.reset(token)


def built_from_config() -> bool:
    """Whether the callback being built now comes from a config (inside
    :func:`building_from_config`); a callback records this when it is constructed."""
    return _BUILDING_FROM_CONFIG.get()


def message_label(owner: Any) -> str:
    """How messages name a callback: its ``config_key`` when it was built from a config,
    its class when it was built in Python."""
    return owner.config_key if owner.from_config else type(owner).__name__


def names_python_arguments(method: Callable[P, R]) -> Callable[P, R]:
    """Decorate a callback's ``__init__`` / ``setup`` / check method so that its messages
    name what a script's author wrote when the callback was built in Python: a
    :class:`ConfigError` about ``<config_key>.<argument>`` names ``Class(argument=value)``,
    and a ``ValueError`` worded ``"<config_key>: ..."`` names ``"Class: ..."``. Built from a
    config (``from_config``), messages keep the config keys. The callback sets
    ``config_key`` (and, once constructed, ``from_config``) before its checks run."""

    @functools.wraps(method)
    def named(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except ValueError as e:
            owner = args[0]
            from_config = getattr(owner, "from_config", None)
            if from_config is None:
                from_config = built_from_config()
            config_key = getattr(owner, "config_key", None)
            if from_config or config_key is None:
                raise
            renamed = _named_in_python(e, type(owner).__name__, config_key)
            if renamed is e:
                raise
            raise renamed from None  # one message: the argument the author wrote

    return named


def _named_in_python(error: ValueError, owner: str, config_key: str) -> ValueError:
    """``error`` naming ``owner`` instead of ``config_key`` (itself if it names neither)."""
    if isinstance(error, ConfigError) and error.key is not None:
        return error.for_argument(owner, config_key)
    message = str(error)
    if message.startswith(f"{config_key}: "):
        kind = ConfigError if isinstance(error, ConfigError) else ValueError
        return kind(f"{owner}: {message[len(config_key) + 2 :]}")
    return error
