"""Pure torch math of the spectral edge: no Lightning, Hydra or W&B.

Every p-sized computation works on a slice of the selected parameter vector and yields
W×W (or smaller) partial matrices that sum over slices (DESIGN.md, Scale); the finishing
step runs on those summed matrices in float64 on the CPU.
"""

from grokedge.spectral.decomposition import (
    energy_fractions,
    latest_energy_fractions,
    trapezoid_wd,
)
from grokedge.spectral.edge import (
    DeltaSource,
    EdgeState,
    compute_edge,
    edge_from_window,
    spectrum,
)
from grokedge.spectral.geometry import (
    davis_kahan_bound,
    davis_kahan_gap,
    g23,
    gaps,
    kstar_ratio,
    kstar_weighted,
    partial_inner,
    principal_angles_deg,
    principal_angles_finish,
    principal_angles_partial,
    rotation_deg,
    rotation_finish,
    rotation_partial,
    spectral_ratio,
    split_halves,
    stability,
    stability_finish,
    stability_from_gram,
    stacked_gram,
    window_shift_dk_bound,
    window_shift_grams,
)
from grokedge.spectral.selection import (
    ParameterSelector,
    Segment,
    slice_bounds,
    slice_segments,
)
from grokedge.spectral.weight_decay import DecoupledWeightDecayTracker
from grokedge.spectral.window import UpdateWindow

__all__ = [
    "DecoupledWeightDecayTracker",
    "DeltaSource",
    "EdgeState",
    "ParameterSelector",
    "Segment",
    "UpdateWindow",
    "compute_edge",
    "davis_kahan_bound",
    "davis_kahan_gap",
    "edge_from_window",
    "energy_fractions",
    "g23",
    "gaps",
    "kstar_ratio",
    "kstar_weighted",
    "latest_energy_fractions",
    "partial_inner",
    "principal_angles_deg",
    "principal_angles_finish",
    "principal_angles_partial",
    "rotation_deg",
    "rotation_finish",
    "rotation_partial",
    "slice_bounds",
    "slice_segments",
    "spectral_ratio",
    "spectrum",
    "split_halves",
    "stability",
    "stability_finish",
    "stability_from_gram",
    "stacked_gram",
    "trapezoid_wd",
    "window_shift_dk_bound",
    "window_shift_grams",
]
