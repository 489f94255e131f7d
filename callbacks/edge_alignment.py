"""EdgeAlignmentCallback: who moves the edge (gradient or weight decay), how it turns.

Reads each new ``EdgeState`` published by the :class:`GramCallback` (never recomputes
it) and turns it into the paper's read-outs (PAPER.md §1, experiment 1) through
``grokedge.spectral``:

- per edge direction v_k: gradient and weight-decay energy shares and the alignment
  mean_i (δ_grad,i·v_k)(δ_wd,i·v_k), over the window and for the newest delta alone;
- motion: rotation of v_1..v_3 between consecutive windows, principal angles between
  the planes span(v_1, v_2), a Davis–Kahan bound on v_1's rotation, stability α_j
  between the halves of the window;
- events: the first window where v_1's gradient share falls below 1/2
  (``edge/flip_step``) and where the alignment on v_1 is positive (``edge/align_step``),
  to compare with ``grok/step``; the g_23 compression once the grok step is known;
- every window's phase (pre / at / post / late) relative to the run's own grok step
  (:class:`grokedge.analysis_log.Phases`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from grokedge.analysis_log import AnalysisLog, Phases, log_table, read_analyses
from grokedge.callbacks.gram import (
    GramCallback,
    find_gram_callback,
    log_scalars,
    spectrum_row,
)
from grokedge.spectral import (
    EdgeState,
    energy_fractions,
    latest_energy_fractions,
    principal_angles_finish,
    rotation_finish,
    stability_from_gram,
    stacked_gram,
    window_shift_dk_bound,
)

EDGE_KEY = "callbacks.edge_alignment"

ROTATED = 3
"""Rotation is reported for v_1..v_3 (the edge and the first bulk direction)."""

PLANE = 2
"""Principal angles between the edge planes span(v_1, v_2) of consecutive windows."""

DEFAULT_AT_INTERVALS = 1
DEFAULT_POST_INTERVALS = 10

SPECTRUM, DIRECTIONS, SUMMARY = "gram_spectrum", "edge_directions", "edge_summary"
ANALYSES = (SPECTRUM, DIRECTIONS, SUMMARY)
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


def measure(
    state: EdgeState,
    previous: EdgeState | None,
    evicted_dot: float | None,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Any]:
    """Every read-out of one window (glue over ``grokedge.spectral``; CPU lists out).

    Args:
        state: the newest window's edge, k = ``state.top_k`` directions.
        previous: the window before (``None``: no motion read-outs).
        evicted_dot: ``GramCallback.evicted_dot``, relating ``previous`` and ``state``.
        reduce: when the vectors are this rank's slices, the sum over ranks of a partial
            Gram (``GramCallback.reduce``; collective: every rank calls ``measure``).
            Everything else here is W×W algebra on matrices already summed.

    Returns:
        ``grad_frac``, ``wd_frac``, ``align`` and their ``*_latest`` forms ([k] lists;
        fractions dimensionless, alignment in squared parameter units), ``stability``
        ([⌊W'/2⌋]), ``rotation_deg`` ([min(3, k)] degrees, NaN without ``previous``),
        ``principal_angles_deg`` ([2] degrees), ``dk_bound`` (bound on sin of v_1's
        rotation) and ``dk_bound_deg`` (its arcsin, 90 when the bound is >= 1).
    """
    k = state.top_k
    grad_frac, wd_frac, align = energy_fractions(state.grad_proj, state.wd_proj)
    grad_latest, wd_latest, align_latest = latest_energy_fractions(state.grad_proj, state.wd_proj)
    n_rot = min(ROTATED, k)
    rotation = [math.nan] * n_rot
    angles = [math.nan] * PLANE
    dk = math.nan
    if previous is not None:
        n = n_rot  # >= PLANE whenever k >= PLANE
        # One [2n, 2n] Gram of (v_prev; v_curr) on the device: rotation and plane angles
        # (sharded: of the slices, summed over ranks in one all-reduce).
        gram = stacked_gram(previous.vectors[:n], state.vectors[:n])
        gram = (gram if reduce is None else reduce(gram)).to("cpu")
        rotation = rotation_finish(gram).tolist()
        if k >= PLANE:
            plane = torch.tensor([0, 1, n, n + 1])
            angles = principal_angles_finish(gram[plane][:, plane], PLANE).tolist()
        dk = window_shift_dk_bound(previous.gram, state.gram, evicted_dot)
    if math.isnan(dk):
        dk_deg = math.nan
    else:  # a bound >= 1 (or +inf: no positive gap) bounds nothing: 90 degrees
        dk_deg = math.degrees(math.asin(min(1.0, dk)))
    return {
        "grad_frac": grad_frac.tolist(),
        "wd_frac": wd_frac.tolist(),
        "align": align.tolist(),
        "grad_frac_latest": grad_latest.tolist(),
        "wd_frac_latest": wd_latest.tolist(),
        "align_latest": align_latest.tolist(),
        "stability": stability_from_gram(state.gram).tolist(),
        "rotation_deg": rotation,
        "principal_angles_deg": angles,
        "dk_bound": dk,
        "dk_bound_deg": dk_deg,
    }


def edge_scalars(m: dict[str, Any]) -> dict[str, float]:
    """The ``edge/*`` scalars of one window from :func:`measure`'s output."""
    values: dict[str, float] = {}
    for i in range(len(m["grad_frac"])):
        k = i + 1
        values[f"edge/grad_frac_v{k}"] = m["grad_frac"][i]
        values[f"edge/wd_frac_v{k}"] = m["wd_frac"][i]
        values[f"edge/align_v{k}"] = m["align"][i]
        values[f"edge/grad_frac_latest_v{k}"] = m["grad_frac_latest"][i]
        values[f"edge/align_latest_v{k}"] = m["align_latest"][i]
    for i, a in enumerate(m["stability"]):
        values[f"edge/stability_v{i + 1}"] = a
    for i, r in enumerate(m["rotation_deg"]):
        values[f"edge/rotation_v{i + 1}_deg"] = r
    if m["rotation_deg"]:
        values["edge/rotation_deg"] = m["rotation_deg"][0]
    for i, a in enumerate(m["principal_angles_deg"]):
        values[f"edge/principal_angle_{i + 1}_deg"] = a
    values["edge/dk_bound"] = m["dk_bound"]
    values["edge/dk_bound_deg"] = m["dk_bound_deg"]
    return values


def _check_steps(key: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key}={value!r} is not allowed: null or an integer >= 0 (steps)")
    return value


class EdgeAlignmentCallback(Callback):
    """Gradient/weight-decay energy, alignment, rotation and phases of the spectral edge.

    Needs a :class:`GramCallback` in the same trainer (``callbacks=gram`` has both); runs
    on each new ``EdgeState`` it publishes, i.e. every ``interval`` optimizer steps.

    Args:
        phase_at: half-width in optimizer steps of the ``at`` phase around the grok step g
            (``at``: |step − g| <= phase_at); ``None``: one Gram interval.
        phase_post: ``post`` ends at g + phase_post (>= phase_at), ``late`` after it;
            ``None``: ten Gram intervals (Dyck: 1,000 steps; the paper's post and late
            Dyck checkpoints are g + 800 and g + 3,300).
        tables: log W&B tables when a ``WandbLogger`` is attached (no-op otherwise).
        config_key: config path named in error messages.

    Logs at every window (``global_step``; k = 1..top_k unless noted):
        ``edge/grad_frac_v{k}``, ``edge/wd_frac_v{k}`` (window-mean energy shares, sum 1),
        ``edge/align_v{k}`` (squared parameter units), ``edge/grad_frac_latest_v{k}``,
        ``edge/align_latest_v{k}`` (newest delta only), ``edge/rotation_deg`` (v_1) and
        ``edge/rotation_v{k}_deg`` (k <= 3) between consecutive windows,
        ``edge/principal_angle_{1,2}_deg``, ``edge/dk_bound`` (Davis–Kahan bound on
        sin of v_1's rotation; ``edge/dk_bound_deg`` its arcsin), ``edge/stability_v{j}``
        (j <= W'/2); once each: ``edge/flip_step``, ``edge/align_step``,
        ``gram/g23_compression`` (max g_23 up to the grok step over g_23 at the last
        window at or before it).

    Writes rows ``gram_spectrum``, ``edge_directions`` (one per window) and
    ``edge_summary`` (at the end of training) to ``analyses.jsonl``; see
    ``grokedge.analysis_log`` for the phase labels and their relabelling.

    Example:
        >>> callbacks = [GramCallback(interval=100), EdgeAlignmentCallback(phase_at=100)]
        >>> L.Trainer(callbacks=callbacks).fit(module, datamodule)  # doctest: +SKIP
    """

    def __init__(
        self,
        phase_at: int | None = None,
        phase_post: int | None = None,
        tables: bool = True,
        config_key: str = EDGE_KEY,
    ) -> None:
        super().__init__()
        self.config_key = config_key
        self.phase_at = _check_steps(f"{config_key}.phase_at", phase_at)
        self.phase_post = _check_steps(f"{config_key}.phase_post", phase_post)
        if self.phase_at is not None and self.phase_post is not None:
            self._phases_or_raise(self.phase_at, self.phase_post)
        self.tables = bool(tables)

        self.flip_step: int | None = None
        self.align_step: int | None = None
        self.g23_compression: float | None = None
        self.windows = 0
        self._g23_history: list[list[float]] = []  # [step, g23] up to the grok step

        self.gram: GramCallback | None = None
        self.phases: Phases | None = None
        self.analysis_log: AnalysisLog | None = None
        self._relabelled_for: int | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(config_key=self.config_key)

    def _phases_or_raise(self, at: int, post: int) -> Phases:
        if post < at:
            raise ValueError(
                f"{self.config_key}.phase_post={post} is not allowed: an integer >= phase_at ({at})"
            )
        return Phases(at=at, post=post)

    # ----------------------------------------------------------------- Lightning hooks

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        try:
            self.gram = find_gram_callback(trainer)
        except ValueError as e:
            raise ValueError(f"{self.config_key}: {e}") from e
        self.gram.add_listener(self.on_edge)
        interval = self.gram.interval
        at = DEFAULT_AT_INTERVALS * interval if self.phase_at is None else self.phase_at
        post = DEFAULT_POST_INTERVALS * interval if self.phase_post is None else self.phase_post
        self.phases = self._phases_or_raise(at, max(post, at) if self.phase_post is None else post)
        self.analysis_log = AnalysisLog(trainer.default_root_dir, enabled=trainer.is_global_zero)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Grok detection runs in the module's on_validation_epoch_end, before this hook.
        self._relabel(getattr(pl_module, "grok_step", None))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        grok = getattr(pl_module, "grok_step", None)
        self._relabel(grok)
        step = trainer.global_step
        late: dict[str, float] = {}
        if self._finish_compression(grok, None):
            late["gram/g23_compression"] = self.g23_compression
        # Lightning forbids self.log in on_train_end: straight to the loggers.
        finite = {k: v for k, v in late.items() if v is not None and math.isfinite(v)}
        if finite:
            for logger in trainer.loggers:
                logger.log_metrics(finite, step=step)
        assert self.analysis_log is not None and self.phases is not None
        self.analysis_log.write(
            SUMMARY,
            step,
            self.phases.label(step, grok),
            grok,
            flip_step=self.flip_step,
            align_step=self.align_step,
            g23_compression=self.g23_compression,
            windows=self.windows,
            phase_at=self.phases.at,
            phase_post=self.phases.post,
        )
        if self.tables:
            self._final_table(trainer, step)

    # ------------------------------------------------------------------- per window

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
        self.windows += 1

        values = edge_scalars(m)
        if self.flip_step is None and m["grad_frac"] and m["grad_frac"][0] < 0.5:
            self.flip_step = step
            values["edge/flip_step"] = float(step)
        if self.align_step is None and m["align"] and m["align"][0] > 0:
            self.align_step = step
            values["edge/align_step"] = float(step)
        if self.g23_compression is None:
            if (grok is None or step <= grok) and math.isfinite(spec["g23"]):
                self._g23_history.append([float(step), float(spec["g23"])])
            if self._finish_compression(grok, step):
                values["gram/g23_compression"] = self.g23_compression
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
        )
        directions = self._directions(state, m)
        self.analysis_log.write(DIRECTIONS, step, phase, grok, directions=directions)
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

    # -------------------------------------------------------------------- bookkeeping

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
        peak = max(v for _, v in upto)
        self.g23_compression = peak / at_grok if at_grok > 0 else math.inf
        return True

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
        """Primitives only (``torch.load(weights_only=True)`` safe)."""
        return {
            "flip_step": self.flip_step,
            "align_step": self.align_step,
            "g23_compression": self.g23_compression,
            "g23_history": [list(r) for r in self._g23_history],
            "windows": self.windows,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self.flip_step = state_dict["flip_step"]
        self.align_step = state_dict["align_step"]
        self.g23_compression = state_dict["g23_compression"]
        self._g23_history = [list(r) for r in state_dict["g23_history"]]
        self.windows = int(state_dict["windows"])
