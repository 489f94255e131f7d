"""Events of the spectral edge, window by window: no Lightning, Hydra or W&B.

An *event* is an optimizer step where the edge does something the paper compares with the
grok step (docs/theory.md §1, experiment 1):

- ``flip``: the first window where v_1's window-mean gradient energy share falls below
  :data:`FLIP_BELOW` (the weight-decay part owns the rest); ``flip_latest``: the same for
  the newest delta alone; ``align``: the first window where the alignment
  mean_i (δ_grad,i·v_1)(δ_wd,i·v_1) is positive — each under every edge definition
  (:mod:`grokedge.edge.definitions`), and ``flip``/``align`` also on the edge the
  analyses use (``flip_step``, ``align_step``);
- ``g23_peak``: the step of the largest g_23 = σ_2² − σ_3² up to the grok step, and the g_23
  compression (that peak over g_23 at the last window at or before the grok step,
  dimensionless), once the grok step is known;
- ``rotation_spike``: the window with the largest rotation of v_1 (degrees) from the window
  before.

Each event is checked against the dominant-delta changes of the raw (``paper``) window
(:class:`grokedge.edge.provenance.DominanceTracker`): one within a tolerance of
``coincidence_windows`` Gram intervals of a change is a *window artifact*.

:class:`DefinitionEvents` keeps the per-definition part (first flip, flip_latest and
align step per definition, the first window that exists under each definition, the raw
window's dominance tracker) for any window, given only its spectra and provenance:
:class:`EdgeEvents` uses one for the base window, and the derived windows of other
intervals N = k·N0 (:mod:`grokedge.edge.derived_windows`) one each.
"""

from __future__ import annotations

import math
from typing import Any

from grokedge.edge.definitions import EDGE_DEFINITIONS, PAPER
from grokedge.edge.provenance import DominanceTracker, DominantChange, WindowProvenance, coinciding
from grokedge.edge.readouts import definition_readouts
from grokedge.edge.spectrum import WindowSpectrum

FLIP_BELOW = 0.5
"""A flip: v_1's gradient share falls below this (the weight-decay part owns the rest)."""

FLIP, FLIP_LATEST, ALIGN = "flip", "flip_latest", "align"
G23_PEAK, ROTATION_SPIKE = "g23_peak", "rotation_spike"
DEFINITION_EVENTS = (FLIP, FLIP_LATEST, ALIGN)
"""Events found under every edge definition; ``g23_peak`` and ``rotation_spike`` are
found on the edge the analyses use."""


def _first_below(values: list[float], threshold: float) -> bool:
    return bool(values) and math.isfinite(values[0]) and values[0] < threshold


def event_rows(
    found: list[tuple[str, str, int]], changes: list[DominantChange], tolerance: int
) -> list[dict[str, Any]]:
    """Each (event, definition, step) with the dominant-delta changes within ``tolerance``
    steps of it: ``event``, ``definition``, ``step``, ``coinciding`` (step, kind, begin,
    end, share of each) and ``window_artifact`` (True when there is one)."""
    out = []
    for event, name, step in found:
        hits = coinciding(step, changes, tolerance)
        out.append(
            {
                "event": event,
                "definition": name,
                "step": step,
                "coinciding": [vars(c) for c in hits],
                "window_artifact": bool(hits),
            }
        )
    return out


class DefinitionEvents:
    """Per edge definition: the first flip, flip_latest and align step, the first window,
    and the raw window's dominant-delta changes, of one sequence of windows.

    Feed it each new window's spectra in step order (:meth:`update`). Steps are optimizer
    steps. The state is primitives only (:meth:`state_dict`).

    Args:
        dominance_threshold: a delta whose share of the raw window's σ_1² is at least this
            is dominant (in (0, 1]).
        suffix: appended to every scalar name (``""`` for the base window, ``_n{N}`` for
            a derived window of interval N).
        latest_scalars: also log ``edge/grad_frac_latest_v1_{d}{suffix}``.

    Attributes:
        definition_steps: {event: {definition: first step or None}} for DEFINITION_EVENTS.
        first_windows: {definition: step of the first window whose spectrum exists under
            that definition, or None}. An event whose step equals it fired at the
            definition's first window (no transition was observed).
        dominance: the :class:`DominanceTracker` of the raw (``paper``) window.
        readouts: {definition: ``definition_readouts``} of the newest window (definitions
            without a window left out).
        windows: windows seen.

    Example:
        >>> ev = DefinitionEvents(0.5, suffix="_n200", latest_scalars=False)
        >>> fired = ev.update(step, spectra, provenance)  # doctest: +SKIP
        >>> # fired: {"edge/grad_frac_v1_paper_n200": 0.4, "edge/flip_step_paper_n200": 600.0}
    """

    def __init__(
        self, dominance_threshold: float = 0.5, suffix: str = "", latest_scalars: bool = True
    ) -> None:
        self.suffix = suffix
        self.latest_scalars = latest_scalars
        self.dominance = DominanceTracker(float(dominance_threshold))
        self.definition_steps: dict[str, dict[str, int | None]] = {
            e: dict.fromkeys(EDGE_DEFINITIONS) for e in DEFINITION_EVENTS
        }
        self.first_windows: dict[str, int | None] = dict.fromkeys(EDGE_DEFINITIONS)
        # True after loading a state written before first_windows was recorded, with
        # windows already seen: their first windows are unknown and stay None.
        self.first_windows_unknown = False
        self.readouts: dict[str, Any] = {}
        self.windows = 0

    def update(
        self,
        step: int,
        spectra: dict[str, WindowSpectrum | None],
        provenance: WindowProvenance | None,
        values: dict[str, float] | None = None,
    ) -> dict[str, float]:
        """Take one window.

        Args:
            step: the window's step.
            spectra: every definition's window (``paper``: the raw one; None: none yet).
            provenance: the raw window's provenance (None: unrecorded).
            values: a dict to add the scalars to (``None``: a new one).

        Returns: ``values`` with ``edge/grad_frac_v1_{d}{suffix}`` (and
        ``edge/grad_frac_latest_v1_{d}{suffix}`` with ``latest_scalars``) for every
        definition d with a window, and ``edge/{event}_step_{d}{suffix}`` the window an
        event fires.
        """
        values = {} if values is None else values
        self.windows += 1
        suffix = self.suffix
        out: dict[str, Any] = {}
        for name, spectrum in spectra.items():
            if spectrum is None:
                continue
            if self.first_windows.get(name) is None and not self.first_windows_unknown:
                self.first_windows[name] = step
            r = definition_readouts(spectrum)
            out[name] = r
            values[f"edge/grad_frac_v1_{name}{suffix}"] = r["grad_frac"][0]
            if self.latest_scalars:
                values[f"edge/grad_frac_latest_v1_{name}{suffix}"] = r["grad_frac_latest"][0]
            fired = {
                FLIP: _first_below(r["grad_frac"], FLIP_BELOW),
                FLIP_LATEST: _first_below(r["grad_frac_latest"], FLIP_BELOW),
                ALIGN: bool(r["align"]) and r["align"][0] > 0,
            }
            for event, now in fired.items():
                if now and self.definition_steps[event].get(name) is None:
                    self.definition_steps[event][name] = step
                    values[f"edge/{event}_step_{name}{suffix}"] = float(step)
        self.readouts = out
        paper = spectra.get(PAPER)
        if provenance is not None and paper is not None:
            self.dominance.update(step, provenance, paper.spans)
        return values

    def table(self) -> dict[str, dict[str, int | None]]:
        """{definition: {event: first step or None}} (the ``definitions`` field of the
        ``edge_summary`` row)."""
        return {
            name: {e: self.definition_steps[e][name] for e in DEFINITION_EVENTS}
            for name in EDGE_DEFINITIONS
        }

    def found(self) -> list[tuple[str, str, int]]:
        """(event, definition, step) of every event that fired, event by event."""
        return [
            (event, name, step)
            for event, steps in self.definition_steps.items()
            for name, step in steps.items()
            if step is not None
        ]

    def events(self, tolerance: int) -> list[dict[str, Any]]:
        """:func:`event_rows` of the definition events against this window's dominant
        changes (``tolerance`` in optimizer steps)."""
        return event_rows(self.found(), self.dominance.changes, tolerance)

    def state_dict(self) -> dict[str, Any]:
        """Primitives only (``torch.load(weights_only=True)`` safe)."""
        return {
            "definition_steps": {e: dict(d) for e, d in self.definition_steps.items()},
            "first_windows": dict(self.first_windows),
            "first_windows_unknown": self.first_windows_unknown,
            "dominance": self.dominance.state_dict(),
            "windows": self.windows,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore; keys absent in older states keep their empty defaults."""
        if not state_dict:
            return
        self.windows = int(state_dict.get("windows", 0))
        for event, steps in state_dict.get("definition_steps", {}).items():
            self.definition_steps[event].update(steps)
        if "first_windows" in state_dict:
            self.first_windows.update(state_dict["first_windows"])
            self.first_windows_unknown = bool(state_dict.get("first_windows_unknown", False))
        else:
            self.first_windows_unknown = self.windows > 0
        if "dominance" in state_dict:
            self.dominance.load_state_dict(state_dict["dominance"])


class EdgeEvents:
    """First flips and alignments per edge definition, the g_23 compression and peak, the
    rotation spike and the dominant-delta changes they may coincide with.

    Feed it each new window in step order (:meth:`update`), then :meth:`finish` at the end
    of training. Steps are optimizer steps; shares and g_23 are dimensionless; the
    rotation is in degrees. The state is primitives only (``state_dict``).

    Args:
        dominance_threshold: a delta whose share of the raw window's σ_1² is at least this
            is dominant (in (0, 1]).
        coincidence_windows: an event within this many Gram intervals of a dominant-delta
            change is a window artifact (>= 0).

    Attributes:
        flip_step, align_step: first flip/alignment of the analysed edge (None: not yet).
        definition_steps: {event: {definition: first step or None}} for DEFINITION_EVENTS.
        first_windows: {definition: step of the first window seen under it, or None}.
        per_definition: the :class:`DefinitionEvents` behind these, ``dominance`` and
            ``readouts``.
        g23_compression, g23_peak_step: None until the grok step is known (nan: no finite
            g_23 up to it).
        rotation_spike: [step, degrees] of v_1's largest rotation, or None.
        readouts: the per-definition read-outs of the newest window
            (:func:`grokedge.edge.readouts.definition_readouts`).
        windows: windows seen.

    Example:
        >>> ev = EdgeEvents(dominance_threshold=0.5, coincidence_windows=1)
        >>> fired = ev.update(step, grok, spectra, provenance, m, g23)  # doctest: +SKIP
        >>> # fired: {"edge/grad_frac_v1_paper": 0.4, ..., "edge/flip_step": 300.0}
        >>> late = ev.finish(grok)  # {"gram/g23_compression": 2.0} or {}  # doctest: +SKIP
        >>> rows = ev.events(interval=100, definition="paper")  # doctest: +SKIP
    """

    def __init__(self, dominance_threshold: float = 0.5, coincidence_windows: int = 1) -> None:
        self.coincidence_windows = coincidence_windows
        # The per-definition bookkeeping, shared with the derived windows' events.
        self.per_definition = DefinitionEvents(float(dominance_threshold))
        self.flip_step: int | None = None
        self.align_step: int | None = None
        self.g23_compression: float | None = None
        self.g23_peak_step: int | None = None
        self.rotation_spike: list[float] | None = None
        self._g23_history: list[list[float]] = []  # [step, g23] up to the grok step

    @property
    def dominance(self) -> DominanceTracker:
        """The raw window's dominant-delta tracker."""
        return self.per_definition.dominance

    @property
    def definition_steps(self) -> dict[str, dict[str, int | None]]:
        """{event: {definition: first step or None}} for DEFINITION_EVENTS."""
        return self.per_definition.definition_steps

    @property
    def first_windows(self) -> dict[str, int | None]:
        """{definition: step of the first window that exists under it, or None}."""
        return self.per_definition.first_windows

    @property
    def readouts(self) -> dict[str, Any]:
        """The per-definition read-outs of the newest window."""
        return self.per_definition.readouts

    @property
    def windows(self) -> int:
        """Windows seen."""
        return self.per_definition.windows

    def update(
        self,
        step: int,
        grok_step: int | None,
        spectra: dict[str, WindowSpectrum | None],
        provenance: WindowProvenance | None,
        measured: dict[str, Any],
        g23: float,
    ) -> dict[str, float]:
        """Take one window.

        Args:
            step: the window's step.
            grok_step: the run's grok step so far (None: not yet).
            spectra: every definition's window (``paper``: the raw one; None: none yet).
            provenance: the raw window's provenance (None: unrecorded).
            measured: :func:`grokedge.edge.readouts.measure` of the analysed edge
                (``grad_frac``, ``align``, ``rotation_deg`` are read).
            g23: g_23 = σ_2² − σ_3² of the analysed edge at this window.

        Returns: scalars to log now: ``edge/grad_frac_v1_{d}``,
        ``edge/grad_frac_latest_v1_{d}`` for every definition d, and, the window they
        fire, ``edge/flip_step``, ``edge/align_step``, ``edge/{event}_step_{d}`` and
        ``gram/g23_compression``.
        """
        values: dict[str, float] = {}
        if self.flip_step is None and _first_below(measured["grad_frac"], FLIP_BELOW):
            self.flip_step = step
            values["edge/flip_step"] = float(step)
        if self.align_step is None and measured["align"] and measured["align"][0] > 0:
            self.align_step = step
            values["edge/align_step"] = float(step)
        rotation = measured["rotation_deg"][0] if measured["rotation_deg"] else math.nan
        if math.isfinite(rotation) and (
            self.rotation_spike is None or rotation > self.rotation_spike[1]
        ):
            self.rotation_spike = [float(step), float(rotation)]
        self.per_definition.update(step, spectra, provenance, values)
        if self.g23_compression is None:
            if (grok_step is None or step <= grok_step) and math.isfinite(g23):
                self._g23_history.append([float(step), float(g23)])
            if self._finish_compression(grok_step, step):
                values["gram/g23_compression"] = self.g23_compression
        return values

    def finish(self, grok_step: int | None) -> dict[str, float]:
        """End of training: the g_23 compression if it is computed now
        (``{"gram/g23_compression": value}``), else ``{}``."""
        if self._finish_compression(grok_step, None):
            return {"gram/g23_compression": self.g23_compression}
        return {}

    def events(self, interval: int, definition: str = PAPER) -> list[dict[str, Any]]:
        """Every event found so far with the dominant-delta changes it coincides with.

        Args:
            interval: optimizer steps between windows (the tolerance is
                ``coincidence_windows * interval`` steps).
            definition: the analysed edge's definition (named by ``g23_peak`` and
                ``rotation_spike``).

        Each: ``event``, ``definition``, ``step``, ``coinciding`` (the changes within the
        tolerance: step, kind, begin, end, share) and ``window_artifact`` (True when there
        is one)."""
        tolerance = self.coincidence_windows * interval
        found = self.per_definition.found()
        if self.g23_peak_step is not None:
            found.append((G23_PEAK, definition, self.g23_peak_step))
        if self.rotation_spike is not None:
            found.append((ROTATION_SPIKE, definition, int(self.rotation_spike[0])))
        return event_rows(found, self.dominance.changes, tolerance)

    def _finish_compression(self, grok: int | None, newest_step: int | None) -> bool:
        """Compute the g_23 compression once the grok step is known and a window past it
        exists (``newest_step`` > grok) or training ends (``newest_step=None``); True when
        it was computed now."""
        if self.g23_compression is not None or grok is None:
            return False
        if newest_step is not None and newest_step <= grok:
            return False
        upto = [(s, v) for s, v in self._g23_history if s <= grok and math.isfinite(v)]
        self._g23_history = []
        if not upto:
            self.g23_compression = math.nan
            return False
        at_grok = upto[-1][1]
        peak_step, peak = max(upto, key=lambda r: r[1])
        self.g23_peak_step = int(peak_step)
        self.g23_compression = peak / at_grok if at_grok > 0 else math.inf
        return True

    def state_dict(self) -> dict[str, Any]:
        """Primitives only (``torch.load(weights_only=True)`` safe)."""
        return {
            "flip_step": self.flip_step,
            "align_step": self.align_step,
            "g23_compression": self.g23_compression,
            "g23_history": [list(r) for r in self._g23_history],
            "g23_peak_step": self.g23_peak_step,
            "rotation_spike": self.rotation_spike,
            # definition_steps, first_windows, dominance, windows
            **self.per_definition.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self.flip_step = state_dict["flip_step"]
        self.align_step = state_dict["align_step"]
        self.g23_compression = state_dict["g23_compression"]
        self._g23_history = [list(r) for r in state_dict["g23_history"]]
        # Absent in checkpoints written before provenance: start those empty.
        self.g23_peak_step = state_dict.get("g23_peak_step")
        self.rotation_spike = state_dict.get("rotation_spike")
        self.per_definition.load_state_dict(state_dict)
