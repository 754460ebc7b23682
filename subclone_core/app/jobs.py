"""Background jobs for the app: a job object that runs work in a thread, and a server-wide limiter.

A job never calls Streamlit: it keeps its own thread-safe list of events, a cancel flag, a status and
a result, and the page polls it (``@st.fragment(run_every=...)``). Its events are typed records: the
training engine's (subclone_core.training.events) and the job's own kinds below (progress, status, block,
failed; "cancelled" is the engine's CancelledEvent). Each browser session keeps its own
job in its session state, so sessions never see or stop each other's runs. The limiter is shared by
the whole server, for every long step and every training job: at most ``max_running`` jobs run at once,
the others wait in a FIFO queue whose positions (and, where the jobs ahead have estimates, the wait) the
pages show, and beyond ``max_queued`` waiting jobs a request is refused with a message.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from subclone_core.core.errors import SubcloneError
from subclone_core.training.events import CancelledEvent, Event
from subclone_core.training.interrupt import Interrupted, interruptible

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ProgressEvent(Event):
    """``done`` of ``total`` units of a long step; ``time`` is wall-clock seconds (time.time())."""

    event: ClassVar[str] = "progress"
    done: int
    total: int
    stage: str | None = None  # what the units belong to, when a job has several stages


@dataclass(frozen=True, kw_only=True)
class StatusEvent(Event):
    """What the job is doing before its first progress report."""

    event: ClassVar[str] = "status"
    message: str


@dataclass(frozen=True, kw_only=True)
class BlockEvent(Event):
    """The parent's validation loss without block ``index`` (block ablation)."""

    event: ClassVar[str] = "block"
    index: int
    loss: float


@dataclass(frozen=True, kw_only=True)
class NoteEvent(Event):
    """Something the page says once the job has ended (e.g. that an empty run folder was removed)."""

    event: ClassVar[str] = "note"
    message: str


@dataclass(frozen=True, kw_only=True)
class FailedEvent(Event):
    """The job failed; the message says what went wrong and what to do."""

    event: ClassVar[str] = "failed"
    message: str


Emit = Callable[[Event], None]
Work = Callable[[Emit, threading.Event], Any]
FINISHED = ("done", "cancelled", "failed")
ORPHAN_SECONDS = 60.0  # a job whose page has not polled for this long is cancelled (its tab was closed)


class JobCancelled(Interrupted):
    """Raised inside a job's work (e.g. from a progress callback) when the job was asked to stop; the
    module hooks of training.interrupt raise its base class between progress reports."""


def cancellable(cancel: threading.Event, emit: Emit) -> Callable[[int, int], None]:
    """A progress callback for library calls: records ``progress`` events and stops the work on cancel."""

    def progress(done: int, total: int) -> None:
        if cancel.is_set():
            raise JobCancelled
        emit(ProgressEvent(done=done, total=total, time=time.time()))

    return progress


class ServerBusy(SubcloneError):
    """Too many jobs are waiting; the message says how many and what to do."""


class JobLimiter:
    """At most ``max_running`` jobs run at once; the rest wait first-in first-out.

    Thread-safe. Jobs call ``wait_turn`` from their own thread and ``release`` when finished.
    """

    def __init__(self, max_running: int = 1, max_queued: int = 4) -> None:
        if max_running < 1 or max_queued < 0:
            raise SubcloneError(f"max_running={max_running} must be >= 1 and max_queued={max_queued} >= 0")
        self.max_running, self.max_queued = max_running, max_queued
        self._cond = threading.Condition()
        self._queue: deque[str] = deque()
        self._running: set[str] = set()
        self._since: dict[str, float] = {}  # when each running job got its slot (shown to those waiting)

    def submit(self, job_id: str) -> None:
        """Put a job at the end of the queue.

        Raises:
            ServerBusy: the queue is full.
        """
        with self._cond:
            # count every admitted job, running or not yet picked up by its thread: requests that arrive
            # together are all still "queued" when the next one is admitted
            if len(self._queue) + len(self._running) >= self.max_running + self.max_queued:
                raise ServerBusy(
                    f"the server is busy: {len(self._running)} job(s) running and "
                    f"{len(self._queue)} waiting (at most {self.max_queued}); try again when one has finished"
                )
            if not self._queue and len(self._running) < self.max_running:
                # a free slot and nobody waiting: the job holds the slot from now, so a page drawn right
                # after Start counts it as running (it read "0 running, 1 waiting" until its thread woke)
                self._running.add(job_id)
            else:
                self._queue.append(job_id)
            self._cond.notify_all()

    def wait_turn(self, job_id: str, cancel: threading.Event, poll: float = 0.1) -> bool:
        """Block until the job is first in line and a slot is free; False if cancelled while waiting."""
        with self._cond:
            if job_id in self._running:  # admitted by ``submit``; the caller reads its cancel flag next
                return True
            while not (self._queue and self._queue[0] == job_id and len(self._running) < self.max_running):
                if cancel.is_set() or job_id not in self._queue:
                    self._discard(job_id)
                    return False
                self._cond.wait(poll)
            self._queue.popleft()
            self._running.add(job_id)
            self._cond.notify_all()
            return True

    def release(self, job_id: str) -> None:
        """Free the job's slot (or its place in the queue); safe to call twice."""
        with self._cond:
            self._running.discard(job_id)
            self._since.pop(job_id, None)
            self._discard(job_id)
            self._cond.notify_all()

    def ahead(self, job_id: str) -> list[str]:
        """The ids of the jobs a waiting job waits for: those running, then those before it in the queue."""
        with self._cond:
            if job_id not in self._queue:
                return []
            return [*self._running, *list(self._queue)[: self._queue.index(job_id)]]

    def wake(self) -> None:
        """Let waiting jobs look at their cancel flags now rather than at their next poll."""
        with self._cond:
            self._cond.notify_all()

    def position(self, job_id: str) -> int | None:
        """1-based place in the waiting queue, or None when the job is not waiting."""
        with self._cond:
            return self._queue.index(job_id) + 1 if job_id in self._queue else None

    def snapshot(self) -> dict[str, int]:
        """Running and waiting counts, and the bounds, for display."""
        with self._cond:
            return {"running": len(self._running), "queued": len(self._queue),
                    "max_running": self.max_running, "max_queued": self.max_queued}

    def note_started(self, job_id: str) -> None:
        """Record when a job got its slot (called by the job once ``wait_turn`` let it in)."""
        with self._cond:
            self._since[job_id] = time.time()

    def running_seconds(self) -> list[float]:
        """How long each running job has run, longest first (a waiting visitor sees what is ahead)."""
        with self._cond:
            now = time.time()
            return sorted((now - t for t in self._since.values()), reverse=True)

    def _discard(self, job_id: str) -> None:
        if job_id in self._queue:
            self._queue.remove(job_id)


_STARTED: weakref.WeakValueDictionary[str, BackgroundJob] = weakref.WeakValueDictionary()


def started_job(job_id: str) -> BackgroundJob | None:
    """A started job by its id (the limiter knows only ids), while anything still holds it."""
    return _STARTED.get(job_id)


class BackgroundJob:
    """Run ``work(emit, cancel)`` in a daemon thread once the limiter gives it a slot.

    Attributes:
        id: a unique id (also the limiter key).
        name: a label for display.
        status: "new", "queued", "running", then "done", "cancelled" or "failed".
        result: what ``work`` returned (after "done" or "cancelled").
        error: a message saying what went wrong and what to do (after "failed").
        orphan_after: seconds without a ``heartbeat`` after which the job cancels itself (None: never).
        orphaned: whether it was cancelled that way.
        estimate: seconds the work should take once running (None: unknown); the queue's wait is summed
            from the estimates of the jobs ahead.
    """

    def __init__(self, work: Work, *, name: str = "job", limiter: JobLimiter | None = None,
                 orphan_after: float | None = None, estimate: float | None = None) -> None:
        self.id = uuid.uuid4().hex
        self.name, self.work = name, work
        self.limiter = limiter or JobLimiter(max_running=1, max_queued=0)
        self.cancel_event = threading.Event()
        self.status = "new"
        self.result: Any = None
        self.error: str | None = None
        self.created, self.started, self.finished = time.time(), None, None
        self.orphan_after, self.orphaned, self.last_seen = orphan_after, False, time.time()
        self.estimate = estimate
        self._events: list[Event] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # --- control ------------------------------------------------------------------------------------

    def start(self) -> BackgroundJob:
        """Queue the job and start its thread.

        Raises:
            ServerBusy: the server's queue is full (the job stays "new" and can be dropped).
        """
        if self.status != "new":
            raise SubcloneError(f"job {self.name!r} was already started (status {self.status})")
        self.limiter.submit(self.id)
        self.status = "queued"
        _STARTED[self.id] = self
        name = f"subclone-{self.name}-{self.id[:6]}"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        if self.orphan_after is not None:
            threading.Thread(target=self._watch, name=f"{name}-watch", daemon=True).start()
        return self

    def stop(self) -> None:
        """Ask the job to stop: a waiting job leaves the queue, a running one at its next module's forward or
        backward or its next progress report (training.interrupt), well within 2 s.

        Only the job's own thread frees its place: a job that ``wait_turn`` has just let in still reads
        "queued" for a moment, and freeing its slot from here would let a second job run beside it.
        """
        self.cancel_event.set()
        self.limiter.wake()

    def heartbeat(self) -> None:
        """The page that owns the job is still open (it calls this whenever it polls)."""
        self.last_seen = time.time()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end; whether it has."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.done

    # --- what the page reads ----------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.status in FINISHED

    @property
    def cancelling(self) -> bool:
        """Stop was asked and the work has not stopped yet (the page says "Cancelling...")."""
        return self.cancel_event.is_set() and not self.done

    @property
    def position(self) -> int | None:
        """1-based place in the server's queue while waiting, else None."""
        return self.limiter.position(self.id) if self.status == "queued" else None

    def emit(self, event: Event) -> None:
        """Record one event (called from the job's thread; any thread may read)."""
        with self._lock:
            self._events.append(event)

    def events(self, since: int = 0) -> list[Event]:
        """A copy of the events recorded so far, from index ``since``."""
        with self._lock:
            return list(self._events[since:])

    def elapsed(self) -> float:
        """Seconds since the job started running (0 while waiting)."""
        if self.started is None:
            return 0.0
        return (self.finished or time.time()) - self.started

    def remaining(self) -> float | None:
        """Seconds until the job should end: from its progress so far while running, else its estimate;
        None when neither is known."""
        if self.done:
            return 0.0
        ticks = [e for e in self.events() if isinstance(e, ProgressEvent) and e.total]
        if self.status == "running" and ticks and ticks[-1].done:
            last = ticks[-1]
            began = next(e.time for e in ticks if e.stage == last.stage)
            return (time.time() - began) * (last.total - last.done) / last.done
        if self.estimate is None:
            return None
        return max(0.0, self.estimate - self.elapsed())

    def wait_seconds(self) -> float | None:
        """Seconds until a waiting job should get its slot (the jobs ahead's ``remaining``, spread over the
        server's slots); None when any job ahead has no estimate."""
        ahead = [started_job(job_id) for job_id in self.limiter.ahead(self.id)]
        left = [job.remaining() if job is not None else None for job in ahead]
        if not left or None in left:
            return None
        return sum(left) / self.limiter.max_running

    # --- the thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if not self.limiter.wait_turn(self.id, self.cancel_event):
                self.status = "cancelled"
                self.emit(CancelledEvent(message="stopped while waiting in the queue"))
                return
            if self.cancel_event.is_set():  # stopped in the moment between getting the slot and starting
                self.status = "cancelled"
                return
            self.status, self.started = "running", time.time()
            self.limiter.note_started(self.id)
            with interruptible(self.cancel_event):  # Cancel is felt at the work's next module, not its next report
                self.result = self.work(self.emit, self.cancel_event)
            self.status = "cancelled" if self.cancel_event.is_set() else "done"
        except Interrupted:
            self.status = "cancelled"
        except Exception as err:  # noqa: BLE001 - every failure of the work ends as a message on its page
            self._failed(err)
        finally:
            self.finished = time.time()
            self.limiter.release(self.id)

    def _failed(self, err: Exception) -> None:
        """Say what went wrong and what to do. An error met after Cancel is the cancel's: a library call cut
        short at a module may wrap what it met in its own error."""
        if self.cancel_event.is_set():
            self.status = "cancelled"
        elif isinstance(err, SubcloneError):
            self._fail(str(err))
        elif isinstance(err, (MemoryError, torch.OutOfMemoryError)):
            self._fail("out of memory: lower the batch size, the sequence length or the number of models, "
                       "or wait until other jobs on this server have finished")
        else:
            logger.exception("job %s failed", self.name, exc_info=err)
            self._fail(f"{type(err).__name__}: {err} (an unexpected error; the server log has the traceback)")

    def _watch(self) -> None:
        """Cancel the job once its page has stopped polling: a closed tab must not hold a slot forever."""
        while not self.done:
            time.sleep(min(5.0, self.orphan_after / 4))
            if not self.done and time.time() - self.last_seen > self.orphan_after:
                self.orphaned = True
                self.emit(CancelledEvent(message=f"no page polled the job for {self.orphan_after:.0f} s "
                                         "(its tab was closed); cancelled, metrics kept"))
                self.stop()
                return

    def _fail(self, message: str) -> None:
        self.error = message
        self.status = "failed"
        self.emit(FailedEvent(message=message))
