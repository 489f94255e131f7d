"""A DeltaRecorder's checkpoint: what it saves, and how a saved state is restored.

The checkpoint half of :class:`grokedge.edge.recorder.DeltaRecorder` (whose
``state_dict`` / ``load_state_dict`` call these): tensors and primitives only, whole vectors
even when sharded, so that a state resumes on any number of ranks (docs/design.md, Scale).
These functions read and write the recorder's buffers, as its own methods would.
"""

from __future__ import annotations

from typing import Any

import torch

from grokedge.edge.sharding import gather_whole, gather_window_state, slice_window_state
from grokedge.edge.window import MIN_WINDOW

STATE_VERSION = 1
"""Layout version of an unsharded state (whole vectors, as one process holds them)."""

SHARDED_STATE_VERSION = 2
"""A state written by a sharded recorder: whole vectors gathered from every rank (so it
can be resumed on any number of ranks) plus each rank's partial W×W matrices."""


class RecorderCheckpoint:
    """The checkpoint half of :class:`~grokedge.edge.recorder.DeltaRecorder` (its base):
    ``state_dict`` / ``load_state_dict`` over the recorder's buffers and knobs, which the
    recorder sets up (``attach``); nothing here allocates."""

    def state_dict(self) -> dict[str, Any]:
        """Tensors and primitives only (``torch.load(weights_only=True)`` safe): θ at the
        last capture, the window's buffers and matrices, the WD accumulator, the
        ``interval_multiples`` and the derived windows (``derived``: ``None`` without
        any). Collective when sharded (every rank must call it; the vectors come back
        whole, on the CPU)."""
        if self.window is None or self.tracker is None or self._theta_prev is None:
            return dict(self._pending_state or {})
        if self.shard is not None and self.shard.sharded:
            return self._sharded_state()
        return {
            "version": STATE_VERSION,
            "select": self.select,
            "interval": self.interval,
            "p": self.window.p,
            "last_capture_step": self.last_capture_step,
            "skipped_deltas": self.skipped_deltas,
            "edge_step": self.edge_step(),
            "theta_prev": self._theta_prev,
            "window": self.window.state_dict(),
            "tracker": self.tracker.state_dict(),
            "interval_multiples": list(self.interval_multiples),
            "derived": None if self.derived is None else self.derived.state_dict(),
        }

    @torch.no_grad()
    def _sharded_state(self) -> dict[str, Any]:
        """Every p-sized buffer gathered whole, so that the state resumes on any number of
        ranks, the windows' matrices summed (what one process would hold), and each
        rank's own partial matrices, restored bit for bit on the same number of ranks
        (``sharding.gather_window_state``, for the base and the derived windows alike)."""
        assert self.window is not None and self.tracker is not None and self.shard is not None
        assert self._theta_prev is not None
        shard = self.shard
        window, rank_matrices = gather_window_state(self.window, shard)
        theta_prev = gather_whole(shard, self._theta_prev)
        tracker = dict(self.tracker.state_dict())
        tracker["accumulated"] = gather_whole(shard, tracker["accumulated"])
        tracker["start"], tracker["stop"] = 0, shard.p
        return {
            "version": SHARDED_STATE_VERSION,
            "select": self.select,
            "interval": self.interval,
            "p": shard.p,
            "last_capture_step": self.last_capture_step,
            "skipped_deltas": self.skipped_deltas,
            "edge_step": self.edge_step(),
            "theta_prev": theta_prev,
            "window": window,
            "tracker": tracker,
            "world_size": shard.world_size,
            "rank_matrices": rank_matrices,
            "interval_multiples": list(self.interval_multiples),
            "derived": None if self.derived is None else self.derived.state_dict(),
        }

    def _slice_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """A whole-vector state cut down to this rank's slice (any world size wrote it);
        the derived windows are cut by :meth:`DerivedWindows.load_state_dict`."""
        assert self.shard is not None and self.window is not None
        shard = self.shard
        same_layout = int(state.get("world_size", 1)) == shard.world_size
        # Another layout wrote it: this slice's partial matrices from its deltas.
        ranks = state.get("rank_matrices") if same_layout else None
        window = slice_window_state(state["window"], shard, ranks)
        tracker = dict(state["tracker"])
        tracker["accumulated"] = shard.take(tracker["accumulated"]).contiguous()
        tracker["start"], tracker["stop"] = shard.start, shard.stop
        return {
            **state,
            "p": shard.p,
            "theta_prev": shard.take(state["theta_prev"]),
            "window": window,
            "tracker": tracker,
        }

    @torch.no_grad()
    def _load(self, state: dict[str, Any]) -> None:
        assert self.window is not None and self.tracker is not None
        assert self._theta_prev is not None and self.shard is not None
        key = self.key
        if int(state["p"]) != self.shard.p:
            raise ValueError(
                f"{key}.select={self.select!r} selects p={self.shard.p} elements; the "
                f"checkpoint's window has p={state['p']}"
            )
        # Absent in checkpoints written before the derived windows: those resume with
        # the derived windows starting empty.
        saved_multiples = state.get("interval_multiples")
        if saved_multiples is not None and (
            tuple(int(k) for k in saved_multiples) != self.interval_multiples
        ):
            raise ValueError(
                f"{key}.interval_multiples={list(self.interval_multiples)} differs from the "
                f"checkpoint's {list(saved_multiples)}; resume with the same "
                "interval_multiples"
            )
        if self.shard.sharded:
            state = self._slice_state(state)
        # Unsharded, a sharded run's state loads as it is: its whole vectors and summed
        # matrices are what one process holds.
        if int(state["interval"]) != self.interval:
            raise ValueError(
                f"{key}.interval={self.interval} differs from the checkpoint's "
                f"{state['interval']}; resume with the same interval"
            )
        if int(state["window"]["size"]) != self.window.size:
            raise ValueError(
                f"{key}.window={self.window.size} differs from the checkpoint's "
                f"{state['window']['size']}; resume with the same window"
            )
        self._theta_prev.copy_(state["theta_prev"])
        self.window.load_state_dict(state["window"])
        self.tracker.load_state_dict(state["tracker"])
        self.last_capture_step = int(state["last_capture_step"])
        self.skipped_deltas = int(state["skipped_deltas"])
        # The newest edge is a deterministic function of the restored window: recompute
        # it (same buffers, same W×W matrices, same numbers) rather than storing [k, p].
        edge_step = state.get("edge_step")
        self.edge = None
        self.spectra, self.provenance = {}, None
        if edge_step is not None and self.window.count >= MIN_WINDOW:
            # Collective when sharded: every rank loads the same state.
            self._publish(int(edge_step))
        self.previous = None
        self.evicted_dot = None
        if self.derived is not None:
            derived = state.get("derived")
            if derived is None:
                self.derived.reset()  # an older checkpoint: the derived windows start empty
            else:
                self.derived.load_state_dict(derived)  # collective when sharded

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore; before :meth:`attach` the state waits and ``attach`` loads it. The
        newest edge is recomputed from the restored window (``previous`` stays ``None``
        until the next push)."""
        if not state_dict:
            return
        if self.window is None:
            self._pending_state = dict(state_dict)
        else:
            self._load(state_dict)
