"""Argument checks shared by every layer: configs, callbacks and the pure-math packages.

One check per kind of value; each failure is one :class:`ConfigError` (a ``ValueError``)
naming the key, the value and what is allowed, worded by :func:`not_allowed`::

    callbacks.gram.window=1 is not allowed: an integer >= 2

Dependency-free (the standard library only; torch is imported by :func:`check_device`
when it runs), so that ``grokedge.edge`` and ``grokedge.experiments`` use the same checks as
the Hydra config checks (``grokedge.config_checks``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


class ConfigError(ValueError):
    """A configuration value that grokedge cannot run with.

    Errors made by :func:`not_allowed` keep their parts (``key``, ``value``, ``allowed``),
    so that a callback built in Python can name itself instead of its config key
    (:meth:`for_argument`); other ConfigErrors have ``key=None``."""

    def __init__(
        self, message: str, *, key: str | None = None, value: Any = None, allowed: str = ""
    ) -> None:
        super().__init__(message)
        self.key, self.value, self.allowed = key, value, allowed

    def for_argument(self, owner: str, config_key: str) -> ConfigError:
        """The same error naming ``owner(argument=value)`` where its key is
        ``<config_key>.<argument>`` (e.g. ``callbacks.gram.window`` ->
        ``GramCallback(window=1)``); this error itself for any other key."""
        prefix = f"{config_key}."
        if self.key is None or not self.key.startswith(prefix):
            return self
        argument = self.key[len(prefix) :]
        return ConfigError(
            f"{owner}({argument}={self.value!r}) is not allowed: {self.allowed}",
            key=f"{owner}({argument})",
            value=self.value,
            allowed=self.allowed,
        )


def not_allowed(key: str, value: Any, allowed: str) -> ConfigError:
    """The error for ``key=value`` (shown as its repr) and what ``allowed`` says is allowed:
    ``"<key>=<value!r> is not allowed: <allowed>"``. Raise it: ``raise not_allowed(...)``."""
    return ConfigError(
        f"{key}={value!r} is not allowed: {allowed}", key=key, value=value, allowed=allowed
    )


def check_int(key: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    """``value`` if it is an int in [minimum, maximum]; else ValueError naming ``key``."""
    ok = not isinstance(value, bool) and isinstance(value, int) and value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        allowed = f"an integer >= {minimum}" + ("" if maximum is None else f" and <= {maximum}")
        raise not_allowed(key, value, allowed)
    return value


def check_optional_int(key: str, value: Any, minimum: int) -> int | None:
    """``None`` or an int >= minimum."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise not_allowed(key, value, f"null or an integer >= {minimum}")
    return value


def check_float(
    key: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    strict_minimum: bool = False,
) -> float:
    """A finite real number in the given range; else ValueError naming ``key``."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and math.isfinite(float(value))
    if ok and minimum is not None:
        ok = float(value) > minimum if strict_minimum else float(value) >= minimum
    if ok and maximum is not None:
        ok = float(value) <= maximum
    if not ok:
        parts = []
        if minimum is not None:
            parts.append(f"{'>' if strict_minimum else '>='} {minimum}")
        if maximum is not None:
            parts.append(f"<= {maximum}")
        allowed = "a finite number" + (" " + " and ".join(parts) if parts else "")
        raise not_allowed(key, value, allowed)
    return float(value)


def check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise not_allowed(key, value, "true or false")
    return value


def check_choice(key: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise not_allowed(key, value, f"one of {', '.join(choices)}")
    return value


AUTO = "auto"


def check_bool_or_auto(key: str, value: Any) -> bool | str:
    """``true``, ``false`` or ``"auto"`` (a setting resolved later from the machine)."""
    if isinstance(value, bool) or value == AUTO:
        return value
    raise not_allowed(key, value, "one of true, false, auto")


def check_choices(key: str, value: Any, choices: Sequence[str]) -> tuple[str, ...]:
    """A non-empty list of distinct entries of ``choices`` (Hydra ListConfig accepted)."""
    if isinstance(value, str):
        value = [value]
    try:
        items = tuple(value)
    except TypeError:
        items = ()
    if not items or any(v not in choices for v in items) or len(set(items)) != len(items):
        allowed = f"a non-empty list of distinct values from {', '.join(choices)}"
        raise not_allowed(key, value, allowed)
    return items


def check_device(key: str, value: Any) -> str | None:
    """``None`` (the parameters' device) or a string torch accepts as a device."""
    if value is None:
        return None
    import torch  # here, not at import: config checks run before torch is needed

    try:
        torch.device(value)
    except (RuntimeError, TypeError) as e:
        allowed = "null (the parameters' device) or a torch device such as cpu, cuda, cuda:1"
        raise not_allowed(key, value, allowed) from e
    return str(value)


def check_float_map(
    key: str,
    values: Mapping[str, Any],
    bounds: Mapping[str, tuple[float | None, float | None, bool, bool]],
) -> dict[str, float | None]:
    """Named numbers, each checked against ``bounds[name]`` = (minimum, maximum, minimum
    excluded, None allowed); a name not in ``bounds`` is a ConfigError naming
    ``key``.<name> and the allowed names."""
    out: dict[str, float | None] = {}
    for name, value in values.items():
        where = f"{key}.{name}"
        if name not in bounds:
            allowed = ", ".join(bounds)
            raise not_allowed(where, value, f"one of the names {allowed}")
        minimum, maximum, strict, optional = bounds[name]
        if value is None and optional:
            out[name] = None
        else:
            out[name] = check_float(where, value, minimum, maximum, strict_minimum=strict)
    return out
