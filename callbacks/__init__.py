"""Lightning callbacks of grokedge: thin adapters from trainer hooks to grokedge.edge,
grokedge.experiments and grokedge.analysis.

Installed as the package ``grokedge.callbacks``; configs in ``conf/callbacks/``.

The names below are imported on first use (PEP 562), so that a run that instantiates
``grokedge.callbacks.gram.GramCallback`` from its ``_target_`` loads only the modules it
needs, not every analysis (``from grokedge.callbacks import GramCallback`` works as
before).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from grokedge.callbacks.ablation import AblationCallback
    from grokedge.callbacks.decoupling import EdgeDecouplingCallback
    from grokedge.callbacks.edge_readouts import EdgeAlignmentCallback
    from grokedge.callbacks.gap_flow import GapFlowCallback
    from grokedge.callbacks.gram import GramCallback, find_gram_callback
    from grokedge.callbacks.indicators import IndicatorCallback
    from grokedge.callbacks.init_from import InitFromCheckpoint
    from grokedge.callbacks.perturbation import PerturbationCallback
    from grokedge.callbacks.probe import ProbeCallback
    from grokedge.callbacks.run_files import RunFiles
    from grokedge.callbacks.universality import ClassCallback
    from grokedge.callbacks.wd_removal import WDRemovalCallback

_MODULE_OF = {
    "AblationCallback": "ablation",
    "ClassCallback": "universality",
    "EdgeAlignmentCallback": "edge_readouts",
    "EdgeDecouplingCallback": "decoupling",
    "GapFlowCallback": "gap_flow",
    "GramCallback": "gram",
    "IndicatorCallback": "indicators",
    "InitFromCheckpoint": "init_from",
    "PerturbationCallback": "perturbation",
    "ProbeCallback": "probe",
    "RunFiles": "run_files",
    "WDRemovalCallback": "wd_removal",
    "find_gram_callback": "gram",
}

__all__ = [
    "AblationCallback",
    "ClassCallback",
    "EdgeAlignmentCallback",
    "EdgeDecouplingCallback",
    "GapFlowCallback",
    "GramCallback",
    "IndicatorCallback",
    "InitFromCheckpoint",
    "PerturbationCallback",
    "ProbeCallback",
    "RunFiles",
    "WDRemovalCallback",
    "find_gram_callback",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
