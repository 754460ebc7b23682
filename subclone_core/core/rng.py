"""torch's process-wide random generator, shared safely by threads (app sessions training at once).

Dropout and weight initialization draw from one generator per process. Code that swaps or seeds it holds
GLOBAL_RNG_LOCK for as long as its own stream is in place, so no other thread draws from that stream.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

GLOBAL_RNG_LOCK = threading.RLock()


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw from a private CPU stream seeded with ``seed``; afterwards the process-wide state is as it was."""
    with GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
