"""Lightning callbacks of grokedge: thin adapters from trainer hooks to grokedge.spectral.

Installed as the package ``grokedge.callbacks``; configs in ``conf/callbacks/``.
"""

from grokedge.callbacks.edge_alignment import EdgeAlignmentCallback
from grokedge.callbacks.gram import GramCallback, find_gram_callback

__all__ = ["EdgeAlignmentCallback", "GramCallback", "find_gram_callback"]
