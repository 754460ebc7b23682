"""What the sessions of one server share: their long steps and the results those steps produced.

Every long step (calibration, the inspector, the block ablation, the shape explorer, Generate, the ViT's
pretraining) runs as a BackgroundJob in the server's one queue (the training jobs' limiter), so a class
of visitors calibrating at once take turns instead of slowing each other down, and each one sees its
place in line. Identical requests (same parent, placement, data and settings) share one job: a session
asking for what another has already queued joins it and gets the same result. Each session holds a
``StepHandle`` to the job; its Cancel lets go of the job, which stops only when no session wants it.
Finished results are kept in a ``ResultStore`` bounded by the bytes of their tensors. No Streamlit here.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import torch
from torch import nn

from subclone_core.app.inputs import duration_text
from subclone_core.app.jobs import BackgroundJob, JobLimiter, Work
from subclone_core.training.events import Event


class StepHandle:
    """One session's hold on a (possibly shared) step job: the job's progress and result, with a Cancel of
    its own that stops the job only when no other session waits for it."""

    def __init__(self, job: BackgroundJob, steps: SharedSteps, key: Hashable | None) -> None:
        self.job, self.steps, self.key = job, steps, key
        self.left = False  # this session cancelled its hold

    @property
    def name(self) -> str:
        return self.job.name

    @property
    def status(self) -> str:
        return "cancelled" if self.left else self.job.status

    @property
    def done(self) -> bool:
        """Finished, or let go of while other sessions keep the job; a job this session's Cancel stops
        is done only once it has stopped (until then the page says "Cancelling...")."""
        return self.job.done or (self.left and not self.job.cancel_event.is_set())

    @property
    def cancelling(self) -> bool:
        return self.left and self.job.cancelling

    @property
    def result(self) -> Any:
        return None if self.left else self.job.result

    @property
    def error(self) -> str | None:
        return self.job.error

    @property
    def orphaned(self) -> bool:
        return self.job.orphaned

    @property
    def position(self) -> int | None:
        return None if self.left else self.job.position

    def events(self, since: int = 0) -> list[Event]:
        return self.job.events(since)

    def heartbeat(self) -> None:
        self.job.heartbeat()

    def wait(self, timeout: float | None = None) -> bool:
        return self.done or self.job.wait(timeout)

    def stop(self) -> None:
        """This session no longer wants the result; the job stops when nobody else does either."""
        if not self.left:
            self.left = True
            self.steps.leave(self)


class SharedSteps:
    """The server's step jobs by request key: a second identical request joins the job already queued or
    running instead of computing the same result again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[Hashable, tuple[BackgroundJob, set[int]]] = {}

    def start(self, key: Hashable | None, name: str, work: Work, limiter: JobLimiter, *,
              orphan_after: float | None = None, estimate: float | None = None) -> StepHandle:
        """A hold on the job computing ``key`` (queued now unless an unfinished one exists); a None key is
        never shared.

        Raises:
            ServerBusy: a new job was needed and the server's queue is full.
        """
        with self._lock:
            self._jobs = {k: v for k, v in self._jobs.items() if not v[0].done}
            job, holders = self._jobs.get(key, (None, set())) if key is not None else (None, set())
            if job is None or job.cancel_event.is_set():
                job = BackgroundJob(work, name=name, limiter=limiter, orphan_after=orphan_after,
                                    estimate=estimate).start()
                holders = set()
                if key is not None:
                    self._jobs[key] = (job, holders)
            handle = StepHandle(job, self, key)
            holders.add(id(handle))
        return handle

    def leave(self, handle: StepHandle) -> None:
        """Drop a session's hold; stop the job when it was the last one."""
        with self._lock:
            job, holders = self._jobs.get(handle.key, (handle.job, {id(handle)}))
            if job is not handle.job:
                return
            holders.discard(id(handle))
            if not holders:
                self._jobs.pop(handle.key, None)
                job.stop()

    def holders(self, key: Hashable) -> int:
        """How many sessions wait for the job computing ``key`` (0: none running)."""
        with self._lock:
            entry = self._jobs.get(key)
            return len(entry[1]) if entry and not entry[0].done else 0


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, ..., 11th, 12th, 13th, 21st."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def waiting_text(position: int, wait: float | None) -> str:
    """What a waiting step shows: its place in the server's queue and, when known, the wait."""
    text = f"Waiting: {ordinal(position)} in line on this server"
    return text + (f", {duration_text(wait)} until it starts" if wait is not None else "")


def step_text(handle: Any, label: str) -> str:
    """The progress bar's text of a step before its first progress report: its place in line while it waits
    for the server, then "starting"."""
    position = handle.position
    if position is not None:
        job = getattr(handle, "job", handle)
        return waiting_text(position, job.wait_seconds())
    return f"{label.capitalize()}: starting"


# --- finished results, bounded by bytes -----------------------------------------------------------------


def approx_bytes(value: Any, seen: set[int] | None = None) -> int:
    """Bytes a result holds in tensors (models, importance scores, arrays inside dataclasses, dicts and
    sequences), plus a little per object; what dominates a kept result."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, nn.Module):
        return sum(approx_bytes(t, seen) for t in [*value.parameters(), *value.buffers()])
    if isinstance(value, dict):
        return 64 + sum(approx_bytes(k, seen) + approx_bytes(v, seen) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return 64 + sum(approx_bytes(v, seen) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return 64 + sum(approx_bytes(getattr(value, f.name), seen) for f in dataclasses.fields(value))
    if isinstance(value, (str, bytes)):
        return 64 + len(value)
    return 64


class ResultStore:
    """Results kept for every session, least recently used dropped first once their bytes pass
    ``max_bytes`` (a result larger than the whole budget is not kept). Thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0

    def get(self, key: Hashable) -> Any:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key][0]

    def put(self, key: Hashable, value: Any) -> Any:
        """Keep ``value`` under ``key``; returns it."""
        size = approx_bytes(value)
        with self._lock:
            if key in self._items:
                self.bytes -= self._items.pop(key)[1]
            if size <= self.max_bytes:
                self._items[key] = (value, size)
                self.bytes += size
            while self.bytes > self.max_bytes:
                self.bytes -= self._items.popitem(last=False)[1][1]
        return value

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
