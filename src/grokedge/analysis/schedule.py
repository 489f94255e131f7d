"""When and on what a cadenced analysis runs (:class:`AnalysisSchedule`).

Lightning-free: the callbacks (``grokedge.callbacks.common.AnalysisCallback``) read it in
their hooks; the keys are those every ``conf/callbacks/<analysis>.yaml`` shares.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from grokedge.analysis.subsets import SAMPLE_UNITS, SEQUENCES
from grokedge.checks import (
    check_bool,
    check_choice,
    check_int,
    check_optional_int,
    not_allowed,
)


@dataclass(frozen=True)
class AnalysisSchedule:
    """When and on what an :class:`AnalysisCallback` runs: the config keys every analysis
    shares (``callbacks.<name>.every``, ``at_grok``, ...). Each subclass gives its own
    defaults (``schedule_defaults``) and takes these as keyword arguments (``**schedule``).

    ``every``: optimizer steps between calls (None: none on a cadence); ``at_grok`` /
    ``at_end``: once when the grok step is detected / on the final weights;
    ``n_sequences``, ``sample``, ``subset_seed``, ``eval_set``: the fixed evaluation subset
    (:func:`grokedge.analysis.subsets.fixed_subset`); ``tables``: W&B tables per call. The
    phases around the grok step are the run's, set once on the GramCallback
    (``callbacks.gram.phase_at`` / ``phase_post``), not per analysis.
    """

    every: int | None = None
    at_grok: bool = True
    at_end: bool = False
    n_sequences: int | None = 300
    sample: str = SEQUENCES
    subset_seed: int = 0
    eval_set: str = "test"
    tables: bool = True

    def checked(self, key: str) -> AnalysisSchedule:
        """Itself if every value is allowed; else ValueError naming ``key``.<field>."""
        check_optional_int(f"{key}.every", self.every, 1)
        check_bool(f"{key}.at_grok", self.at_grok)
        check_bool(f"{key}.at_end", self.at_end)
        check_optional_int(f"{key}.n_sequences", self.n_sequences, 1)
        check_int(f"{key}.subset_seed", self.subset_seed, 0)
        check_choice(f"{key}.sample", self.sample, SAMPLE_UNITS)
        eval_set = self.eval_set
        if not isinstance(eval_set, str) or not eval_set:
            raise not_allowed(f"{key}.eval_set", eval_set, "an evaluation set name")
        check_bool(f"{key}.tables", self.tables)
        return self

    def fires_before(self, max_steps: int, start_step: int = 0, can_grok: bool = True) -> bool:
        """Whether the analysis runs at least once in a run from ``start_step`` to
        ``max_steps`` (optimizer steps): at the end, at the grok step (when the module
        reports one: ``can_grok``), or at a multiple of ``every`` in between."""
        if self.at_end or (self.at_grok and can_grok):
            return True
        return self.every is not None and max_steps // self.every > start_step // self.every

    def idle_reason(
        self,
        max_steps: int,
        start_step: int,
        can_grok: bool,
        argument: Callable[[str, Any], str],
    ) -> str | None:
        """Why the analysis cannot fire in a run that ends at ``max_steps`` (from
        ``start_step``; ``can_grok``: the module reports a grok step), else None.
        ``argument(name, value)`` names a setting the way its author wrote it (a config key
        or a Python argument)."""
        if self.fires_before(max_steps, start_step, can_grok):
            return None
        if self.every is None:
            cadence = f"{argument('every', None)} has no cadence"
        else:
            cadence = f"{argument('every', self.every)} cannot fire before max_steps={max_steps}"
        if self.at_grok:
            return (
                f"{cadence}, and at_grok needs a module that reports grok_step; it never runs "
                f"(lower every, or set at_end=True)"
            )
        return f"{cadence}; it never runs (lower every, or set at_end=True)"


SCHEDULE_KEYS = tuple(f.name for f in fields(AnalysisSchedule))
