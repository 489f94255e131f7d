"""EdgeAlignmentCallback: who moves the edge (gradient or weight decay), how it turns.

Reads each new ``EdgeState`` published by the :class:`GramCallback` (never recomputes
it) and turns it into the paper's read-outs (docs/theory.md §1, experiment 1) through
``grokedge.edge``:

- per edge direction v_k: gradient and weight-decay energy shares and the alignment
  mean_i (δ_grad,i·v_k)(δ_wd,i·v_k), over the window and for the newest delta alone;
- motion: rotation of v_1..v_3 between consecutive windows, principal angles between
  the planes span(v_1, v_2), a Davis–Kahan bound on v_1's rotation, stability α_j
  between the halves of the window;
- events: the first window where v_1's gradient share falls below 1/2
  (``edge/flip_step``) and where the alignment on v_1 is positive (``edge/align_step``),
  to compare with ``grok/step``, under every edge definition
  (:mod:`grokedge.edge.definitions`); the g_23 compression once the grok step is
  known; the g_23 peak and the largest rotation of v_1 (kept, with the provenance below,
  by :class:`grokedge.edge.events.EdgeEvents`; this callback logs and writes them);
- provenance: when a dominant delta (one that owns most of σ_1² of the raw window) enters
  or leaves the window, and which events coincide with it — those are flagged as window
  artifacts (``edge_summary`` row, ``edge/*_window_artifact``);
- every window's phase (pre / at / post / late) relative to the run's own grok step
  (:class:`grokedge.analysis_log.Phases`);
- every Gram interval N = k·N0 from the same run (``callbacks.gram.interval_multiples``):
  at each derived window the per-definition shares and events of that interval (one
  :class:`grokedge.edge.events.DefinitionEvents` per N), summarised per N in the
  ``edge_summary`` row's ``intervals``.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from grokedge.analysis_log import AnalysisLog, Phases, log_scalars, log_table, read_analyses
from grokedge.callbacks.gram import GramCallback, find_gram_callback
from grokedge.checks import check_float, check_int
from grokedge.config_checks import built_from_config, message_label, names_python_arguments
from grokedge.edge.definitions import EDGE_DEFINITIONS
from grokedge.edge.events import DefinitionEvents, EdgeEvents
from grokedge.edge.readouts import edge_scalars, measure, spectrum_row
from grokedge.edge.spectrum import EdgeState

EDGE_KEY = "callbacks.edge_alignment"

SPECTRUM, DIRECTIONS, SUMMARY = "gram_spectrum", "edge_directions", "edge_summary"
DERIVED = "derived_window"
ANALYSES = (SPECTRUM, DIRECTIONS, SUMMARY, DERIVED)
"""Names of this callback's rows in ``analyses.jsonl``."""

DIRECTION_COLUMNS = (
    "k",
    "sigma",
    "grad_frac",
    "wd_frac",
    "align",
    "grad_frac_latest",
    "wd_frac_latest",
    "align_latest",
    "rotation_deg",
)


class EdgeAlignmentCallback(Callback):
    """Gradient/weight-decay energy, alignment, rotation and phases of the spectral edge.

    Needs a :class:`GramCallback` in the same trainer (``callbacks=gram`` has both); runs
    on each new ``EdgeState`` it publishes, i.e. every ``interval`` optimizer steps.

    Phases are the run's (the GramCallback's ``phases``: ``callbacks.gram.phase_at`` /
    ``phase_post``; by default ``post`` ends ten Gram intervals after the grok step, on
    Dyck 1,000 steps, where the paper's post and late Dyck checkpoints are g + 800 and
    g + 3,300).

    Args:
        tables: log W&B tables when a ``WandbLogger`` is attached (no-op otherwise).
        dominance_threshold: a delta whose share of the raw window's σ_1² is at least this
            is *dominant*; its entering or leaving the window is recorded (in (0, 1]).
        coincidence_windows: an event within this many Gram intervals of a dominant delta
            entering or leaving is flagged as a window artifact (>= 0).
        config_key: config path named in error messages.

    Logs at every window (``global_step``; k = 1..top_k unless noted):
        ``edge/grad_frac_v{k}``, ``edge/wd_frac_v{k}`` (window-mean energy shares, sum 1),
        ``edge/align_v{k}`` (squared parameter units), ``edge/grad_frac_latest_v{k}``,
        ``edge/grad_frac_v1_{d}``, ``edge/grad_frac_latest_v1_{d}`` (d: every edge
        definition),
        ``edge/align_latest_v{k}`` (newest delta only), ``edge/rotation_deg`` (v_1) and
        ``edge/rotation_v{k}_deg`` (k <= 3) between consecutive windows,
        ``edge/principal_angle_{1,2}_deg``, ``edge/dk_bound`` (Davis–Kahan bound on
        sin of v_1's rotation; ``edge/dk_bound_deg`` its arcsin), ``edge/stability_v{j}``
        (j <= W'/2); once each: ``edge/flip_step``, ``edge/align_step`` (the analysed
        edge) and ``edge/{flip,flip_latest,align}_step_{d}`` per definition,
        ``gram/g23_compression`` (max g_23 up to the grok step over g_23 at the last
        window at or before it); at the end, ``edge/{event}_window_artifact`` (1: the
        event coincides with a dominant delta entering or leaving the window).

    Logs at every derived window (interval N = k·N0, k >= 2 of
    ``callbacks.gram.interval_multiples``): ``edge/grad_frac_v1_{d}_n{N}`` (every
    definition d with a window) and, once each, ``edge/{flip,flip_latest,align}_step_{d}_n{N}``.

    Writes rows ``gram_spectrum`` (with the raw window's ``provenance``),
    ``edge_directions`` (with every definition's read-outs under ``definitions``; one
    each per window) and ``edge_summary`` (at the end of training: events, their steps
    under each definition, the dominant-delta changes and which events coincide with
    them; ``first_windows`` per definition; ``interval_multiples``; and ``intervals``:
    per N = k·N0 as str(N), k = 1 included, ``interval``, ``start_step``, ``definitions``,
    ``first_windows``, ``dominant_changes``, ``events``) and one ``derived_window`` row
    per derived window (``interval``, ``definitions``: every definition's read-outs or
    None) to ``analyses.jsonl``; see ``grokedge.analysis_log`` for the phase labels and
    their relabelling.

    Example:
        >>> callbacks = [GramCallback(interval=100), EdgeAlignmentCallback()]
        >>> L.Trainer(callbacks=callbacks).fit(module, datamodule)  # doctest: +SKIP
    """

    @names_python_arguments
    def __init__(
        self,
        tables: bool = True,
        dominance_threshold: float = 0.5,
        coincidence_windows: int = 1,
        config_key: str = EDGE_KEY,
    ) -> None:
        super().__init__()
        self.config_key = config_key
        self.from_config = built_from_config()  # messages: config keys or arguments
        dominance_threshold = check_float(
            f"{config_key}.dominance_threshold", dominance_threshold, 0, 1, strict_minimum=True
        )
        check_int(f"{config_key}.coincidence_windows", coincidence_windows, 0)
        # Lightning-free bookkeeping of the events (grokedge.edge.events).
        self.edge_events = EdgeEvents(float(dominance_threshold), coincidence_windows)
        self.dominance_threshold = float(dominance_threshold)
        # {N: the events of the derived window of interval N}, made at its first window
        # (or from a checkpoint).
        self.interval_events: dict[int, DefinitionEvents] = {}
        self.tables = bool(tables)

        self.gram: GramCallback | None = None
        self.phases: Phases | None = None
        self.analysis_log: AnalysisLog | None = None
        self._relabelled_for: int | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(config_key=self.config_key)

    # ----------------------------------------------------------------- Lightning hooks

    @names_python_arguments
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.gram = find_gram_callback(
            trainer, from_config=self.from_config, reader=message_label(self)
        )
        self.gram.add_listener(self.on_edge)
        self.gram.add_derived_listener(self.on_derived_window)
        self.phases = self.gram.phases
        self.analysis_log = AnalysisLog(trainer.default_root_dir, enabled=trainer.is_global_zero)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Grok detection runs in the module's on_validation_epoch_end, before this hook.
        self._relabel(getattr(pl_module, "grok_step", None))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        grok = getattr(pl_module, "grok_step", None)
        self._relabel(grok)
        step = trainer.global_step
        ev = self.edge_events
        late = ev.finish(grok)
        # Lightning forbids self.log in on_train_end: straight to the loggers (below).
        assert self.analysis_log is not None and self.phases is not None
        assert self.gram is not None
        main = self.gram.edge_definition
        interval = self.gram.interval
        events = ev.events(interval, main)
        for e in events:
            if e["definition"] == main:
                late[f"edge/{e['event']}_window_artifact"] = float(e["window_artifact"])
        log_scalars(trainer, pl_module, late, direct=True)
        self.analysis_log.write(
            SUMMARY,
            step,
            self.phases.label(step, grok),
            grok,
            flip_step=ev.flip_step,
            align_step=ev.align_step,
            g23_compression=ev.g23_compression,
            g23_peak_step=ev.g23_peak_step,
            rotation_spike_step=None if ev.rotation_spike is None else ev.rotation_spike[0],
            rotation_spike_deg=None if ev.rotation_spike is None else ev.rotation_spike[1],
            windows=ev.windows,
            phase_at=self.phases.at,
            phase_post=self.phases.post,
            edge_definition=main,
            interval=self.gram.interval,
            window=self.gram.window_size,
            start_step=self.gram.start_step,
            dominance_threshold=ev.dominance.threshold,
            coincidence_windows=ev.coincidence_windows,
            definitions=ev.per_definition.table(),
            dominant_changes=[vars(c) for c in ev.dominance.changes],
            events=events,
            first_windows=dict(ev.first_windows),
            interval_multiples=list(self.gram.interval_multiples),
            intervals=self.intervals_summary(events),
        )
        if self.tables:
            self._final_table(trainer, step)

    def intervals_summary(self, base_events: list[dict[str, Any]]) -> dict[str, Any]:
        """The ``intervals`` field of the ``edge_summary`` row: for every N = k·N0 (as
        str(N), ascending, k = 1 included) its ``interval``, ``start_step``,
        ``definitions`` ({definition: {event: step | None}}), ``first_windows``,
        ``dominant_changes`` and ``events`` (tolerance ``coincidence_windows``·N). The
        base interval's entry repeats the base fields (``base_events``: its events, g_23
        peak and rotation spike included); a derived interval without any window has
        every step None and no changes or events."""
        assert self.gram is not None
        base = self.gram.interval
        out: dict[str, Any] = {}
        for k in self.gram.interval_multiples:
            n = k * base
            if k == 1:
                ev, events = self.edge_events.per_definition, base_events
            else:
                ev = self._events_of(n)
                events = ev.events(self.edge_events.coincidence_windows * n)
            out[str(n)] = {
                "interval": n,
                "start_step": self.gram.start_step_of(n),
                "definitions": ev.table(),
                "first_windows": dict(ev.first_windows),
                "dominant_changes": [vars(c) for c in ev.dominance.changes],
                "events": events,
            }
        return out

    def _events_of(self, interval: int) -> DefinitionEvents:
        """The events of the derived window of ``interval`` (made on first use)."""
        if interval not in self.interval_events:
            self.interval_events[interval] = DefinitionEvents(
                self.dominance_threshold, suffix=f"_n{interval}", latest_scalars=False
            )
        return self.interval_events[interval]

    # ------------------------------------------------------------------- per window

    def on_derived_window(
        self, trainer: L.Trainer, pl_module: L.LightningModule, interval: int, step: int
    ) -> None:
        """Record one new derived window of ``interval`` N (called by the GramCallback):
        log its ``edge/grad_frac_v1_{d}_n{N}`` and the events that fire, write its
        ``derived_window`` row."""
        assert self.gram is not None and self.phases is not None
        assert self.analysis_log is not None
        grok = getattr(pl_module, "grok_step", None)
        self._relabel(grok)
        spectra = self.gram.derived_spectra[interval]
        ev = self._events_of(interval)
        values = ev.update(step, spectra, self.gram.derived_provenance[interval])
        log_scalars(trainer, pl_module, values)
        self.analysis_log.write(
            DERIVED,
            step,
            self.phases.label(step, grok),
            grok,
            interval=interval,
            definitions={d: ev.readouts.get(d) for d in EDGE_DEFINITIONS},
        )

    def on_edge(self, trainer: L.Trainer, pl_module: L.LightningModule, state: EdgeState) -> None:
        """Measure, log and record one new window (called by the GramCallback)."""
        assert self.gram is not None and self.phases is not None
        assert self.analysis_log is not None
        grok = getattr(pl_module, "grok_step", None)
        self._relabel(grok)
        step = state.step
        phase = self.phases.label(step, grok)
        sharded = self.gram.shard is not None and self.gram.shard.sharded
        reduce = self.gram.reduce if sharded else None
        m = measure(state, self.gram.previous, self.gram.evicted_dot, reduce)
        spec = spectrum_row(state)
        provenance = self.gram.provenance
        values = edge_scalars(m)
        values.update(
            self.edge_events.update(step, grok, self.gram.spectra, provenance, m, spec["g23"])
        )
        definitions = self.edge_events.readouts
        log_scalars(trainer, pl_module, values)

        self.analysis_log.write(
            SPECTRUM,
            step,
            phase,
            grok,
            **spec,
            stability=m["stability"],
            principal_angles_deg=m["principal_angles_deg"],
            dk_bound=m["dk_bound"],
            dk_bound_deg=m["dk_bound_deg"],
            skipped_deltas=self.gram.skipped_deltas,
            edge_definition=state.definition,
            spans=[list(s) for s in state.spans],
            provenance=None if provenance is None else provenance.row(),
        )
        directions = self._directions(state, m)
        self.analysis_log.write(
            DIRECTIONS, step, phase, grok, directions=directions, definitions=definitions
        )
        if self.tables:
            log_table(
                trainer,
                "gram/spectrum_table",
                ["step", "phase", "j", "sigma"],
                [[step, phase, j + 1, s] for j, s in enumerate(spec["sigma"])],
                trainer.global_step,
            )
            log_table(
                trainer,
                "edge/directions_table",
                ["step", "phase", *DIRECTION_COLUMNS],
                [[step, phase, *(d[c] for c in DIRECTION_COLUMNS)] for d in directions],
                trainer.global_step,
            )

    @staticmethod
    def _directions(state: EdgeState, m: dict[str, Any]) -> list[dict[str, Any]]:
        sigma = state.sigma.tolist()
        out = []
        for i in range(state.top_k):
            out.append(
                {
                    "k": i + 1,
                    "sigma": sigma[i] if i < len(sigma) else 0.0,
                    **{
                        c: m[c][i]
                        for c in DIRECTION_COLUMNS[2:-1]  # the energy columns
                    },
                    "rotation_deg": m["rotation_deg"][i]
                    if i < len(m["rotation_deg"])
                    else math.nan,
                }
            )
        return out

    def _relabel(self, grok: int | None) -> None:
        if grok is None or self._relabelled_for == grok or self.analysis_log is None:
            return
        assert self.phases is not None
        self.analysis_log.relabel(ANALYSES, grok, self.phases.label)
        self._relabelled_for = grok

    def _final_table(self, trainer: L.Trainer, step: int) -> None:
        """All windows of this run directory with their final phases, as one W&B table."""
        rows = []
        for row in read_analyses(trainer.default_root_dir, [DIRECTIONS]):
            for d in row["directions"]:
                rows.append([row["step"], row["phase"], *(d[c] for c in DIRECTION_COLUMNS)])
        if rows:
            log_table(
                trainer, "edge/windows_table", ["step", "phase", *DIRECTION_COLUMNS], rows, step
            )

    # -------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Primitives only (``torch.load(weights_only=True)`` safe): the base events
        (:meth:`EdgeEvents.state_dict`) and ``derived``: {str(N): the derived window's
        :meth:`DefinitionEvents.state_dict`}."""
        derived = {str(n): ev.state_dict() for n, ev in sorted(self.interval_events.items())}
        return {**self.edge_events.state_dict(), "derived": derived}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore; a state written before the derived windows starts them empty."""
        self.edge_events.load_state_dict(state_dict)
        self.interval_events = {}
        for n, state in (state_dict.get("derived") or {}).items():
            self._events_of(int(n)).load_state_dict(state)
