"""A lock per model for models that several callers share (the app keeps one parent per server process for
every browser session): anything that attaches hooks to such a model or runs it holds its lock, so that
one caller's hooks never see another caller's forward pass."""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator

from torch import nn

_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def exclusive(model: nn.Module) -> Iterator[nn.Module]:
    """Hold the model's own lock (re-entrant: a caller that holds it may call code that takes it again)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(model, threading.RLock())
    with lock:
        yield model
