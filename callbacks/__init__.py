"""Lightning callbacks of grokedge: thin adapters from trainer hooks to grokedge.spectral.

Installed as the package ``grokedge.callbacks``; configs in ``conf/callbacks/``.
"""

from grokedge.callbacks.ablation import AblationCallback
from grokedge.callbacks.classes import ClassCallback
from grokedge.callbacks.decoupling import EdgeDecouplingCallback
from grokedge.callbacks.edge_alignment import EdgeAlignmentCallback
from grokedge.callbacks.gap_flow import GapFlowCallback
from grokedge.callbacks.gram import GramCallback, find_gram_callback
from grokedge.callbacks.init_from import InitFromCheckpoint
from grokedge.callbacks.perturbation import PerturbationCallback
from grokedge.callbacks.probe import ProbeCallback
from grokedge.callbacks.wd_removal import WDRemovalCallback

__all__ = [
    "AblationCallback",
    "ClassCallback",
    "EdgeAlignmentCallback",
    "EdgeDecouplingCallback",
    "GapFlowCallback",
    "GramCallback",
    "InitFromCheckpoint",
    "PerturbationCallback",
    "ProbeCallback",
    "WDRemovalCallback",
    "find_gram_callback",
]
