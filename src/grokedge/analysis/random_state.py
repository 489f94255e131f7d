"""The process' global random streams, left as an analysis found them."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def preserved_random_state(device: torch.device | None = None) -> Iterator[None]:
    """Restore the global random streams (torch CPU, the device's CUDA generator, numpy,
    Python's ``random``) on exit, whatever ran inside.

    The analyses draw their own random numbers from seeded generators, but some library
    code draws from the global streams behind one's back (every DataLoader iteration takes
    a base seed from torch's global generator); training that uses them (dropout) would
    then take other numbers than without the analysis.
    """
    torch_state = torch.get_rng_state()
    cuda = device is not None and device.type == "cuda" and torch.cuda.is_available()
    cuda_state = torch.cuda.get_rng_state(device) if cuda else None
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)
        np.random.set_state(np_state)
        random.setstate(py_state)
