"""Stopping a long computation within moments of a request, wherever it is inside a model.

Progress callbacks run between batches or candidates, and one batch of a large parent on a few CPU cores
can take half a minute, so a Cancel checked only there is not felt for that long. Inside ``interruptible``
every module's forward (and, while gradients are recorded, every module's backward) first looks at the
cancel flags of the calling thread and raises ``Interrupted`` once one is set: the work stops at its next
module, a fraction of a second on any model. The hooks are process-wide (a shared parent serves several
sessions at once), but each thread sees only its own flags, so one session's Cancel never stops another's
forward. They are installed while at least one thread is inside ``interruptible``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn.modules import module as torch_module


class Interrupted(Exception):
    """Raised inside a computation whose cancel flag was set (from another thread)."""


_local = threading.local()  # .flags: this thread's cancel flags, innermost last
_lock = threading.Lock()
_users = 0
_handles: list[Any] = []


def _flags() -> tuple[threading.Event, ...]:
    return getattr(_local, "flags", ())


def check(flags: tuple[threading.Event, ...] | None = None) -> None:
    """Raise ``Interrupted`` when any of ``flags`` (default: the calling thread's) is set."""
    if any(flag.is_set() for flag in (_flags() if flags is None else flags)):
        raise Interrupted


def _before_forward(module: torch.nn.Module, args: Any) -> None:
    check()


def _after_forward(module: torch.nn.Module, args: Any, output: Any) -> None:
    """Check again when the backward pass reaches this module's output. The flags are captured here:
    the backward of a GPU model runs in autograd's own threads, which have none."""
    flags = _flags()
    first = output[0] if isinstance(output, (tuple, list)) and output else output
    if flags and isinstance(first, torch.Tensor) and first.requires_grad and torch.is_grad_enabled():
        first.register_hook(lambda grad: check(flags))


def _install() -> None:
    global _users
    with _lock:
        _users += 1
        if _users == 1:
            _handles.extend([torch_module.register_module_forward_pre_hook(_before_forward),
                             torch_module.register_module_forward_hook(_after_forward)])


def _uninstall() -> None:
    global _users
    with _lock:
        _users -= 1
        if _users == 0:  # no thread needs them: every module's forward takes torch's fast path again
            while _handles:
                _handles.pop().remove()


@contextlib.contextmanager
def interruptible(cancel: threading.Event | None) -> Iterator[None]:
    """Within the block, this thread's module forwards and backwards raise ``Interrupted`` once ``cancel``
    is set (None: no effect). Nested blocks add their flags to the outer ones."""
    if cancel is None:
        yield
        return
    outer = _flags()
    _local.flags = (*outer, cancel)
    _install()
    try:
        yield
    finally:
        _uninstall()
        _local.flags = outer
