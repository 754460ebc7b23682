"""Training events as typed records, and the one reader that turns their JSON back into them.

The engine reports what happens as events: MetricsLog appends each one to metrics.jsonl as one JSON
object per line, and every callback (the command line's progress bar, the experiment trackers, the app's
live charts) receives the same event typed. Every event has "event" (its kind), "time" (seconds since the
run started) and "candidate" (None for an event of the whole run). The kinds:

- start: "candidates" (name, strategy, lr, weight_decay, distill), "config", "world_size", "parallel" ("ddp"
  or "fsdp"), "device", "unit" (the task's throughput unit), "metric" (the validation value candidates are
  compared on), "higher_is_better" (its direction)
- step: "step", "loss", "lr", "grad_norm", "throughput", "unit", "seen"; "ce" and "kl" when distilling
- eval: "step", "loss", "seen" and the task's headline: "perplexity" (text) or "accuracy" (images)
- done: "step", "status", "message", "final" (the last evaluation), "saved_to" (a path or null)
- error: "step", "message": that candidate stopped (e.g. a non-finite loss); the others go on. Without a
  candidate: the run itself failed.
- cancelled: "step", "message": the run was cancelled; metrics so far are kept, nothing is saved

``parse_event`` is the only code that reads an event's JSON: it refuses an unknown kind. ``read_events``
reads a metrics file and skips what it cannot parse (a last line still being written, a kind this
version does not know), so files of older and newer versions still read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from subclone_core.training.results import EvalPoint

logger = logging.getLogger(__name__)
OPTIONAL = {"optional": True}  # field metadata: left out of the JSON while None


def _known(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``data`` that name a field of the dataclass ``cls`` (newer keys are ignored)."""
    names = {f.name for f in fields(cls)}
    return {key: value for key, value in data.items() if key in names}


@dataclass(frozen=True, kw_only=True)
class Event:
    """What every event has: its kind (a class constant), the candidate it concerns and when it happened."""

    event: ClassVar[str] = ""
    candidate: str | None = None
    time: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The event as one metrics.jsonl object: "event" first, optional fields only when set."""
        optional = {f.name for f in fields(self) if f.metadata.get("optional")}
        values = asdict(self)
        return {"event": self.event, **{k: v for k, v in values.items() if v is not None or k not in optional}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Event:
        return cls(**_known(cls, data))

    def value(self, name: str) -> float | None:
        """A numeric field by name ("loss", "lr", or the task's metric), None where the event has none."""
        return getattr(self, name, None)


@dataclass(frozen=True)
class CandidatePlan:
    """One candidate as the start event announces it."""

    name: str
    strategy: str | None = None
    lr: float | None = None
    weight_decay: float | None = None
    distill: bool = False


@dataclass(frozen=True, kw_only=True)
class StartEvent(Event):
    """The run begins: its candidates, settings, and the validation value they are compared on."""

    event: ClassVar[str] = "start"
    candidates: list[CandidatePlan] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1
    parallel: str = "ddp"  # or "fsdp": each candidate sharded across the processes
    device: str | None = None
    unit: str | None = None
    metric: str = "loss"  # files written before the metric was recorded are text runs
    higher_is_better: bool = False

    def __post_init__(self) -> None:
        plans = [c if isinstance(c, CandidatePlan) else CandidatePlan(**_known(CandidatePlan, c))
                 for c in self.candidates]
        object.__setattr__(self, "candidates", plans)


@dataclass(frozen=True, kw_only=True)
class StepEvent(Event):
    """A logged training step of one candidate (the mean over its micro-batches and processes)."""

    event: ClassVar[str] = "step"
    step: int
    loss: float | None
    lr: float | None = None
    grad_norm: float | None = None
    throughput: float | None = None
    unit: str | None = None
    seen: int | None = None
    ce: float | None = field(default=None, metadata=OPTIONAL)  # distillation: the cross-entropy part
    kl: float | None = field(default=None, metadata=OPTIONAL)  # distillation: the KL to the teacher


@dataclass(frozen=True, kw_only=True)
class EvalEvent(Event):
    """A validation result of one candidate; ``value(task.metric)`` or ``value(task.headline)`` reads it."""

    event: ClassVar[str] = "eval"
    step: int
    seen: int | None = None
    loss: float | None
    perplexity: float | None = field(default=None, metadata=OPTIONAL)
    accuracy: float | None = field(default=None, metadata=OPTIONAL)

    @classmethod
    def of(cls, candidate: str, point: EvalPoint) -> EvalEvent:
        """The event of a candidate's evaluation point."""
        return cls(candidate=candidate, **asdict(point))


@dataclass(frozen=True, kw_only=True)
class DoneEvent(Event):
    """A candidate's final status, its last evaluation and where it was saved."""

    event: ClassVar[str] = "done"
    step: int
    status: str = "done"
    message: str | None = None
    final: EvalPoint | None = None
    saved_to: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.final, Mapping):
            object.__setattr__(self, "final", EvalPoint(**_known(EvalPoint, self.final)))


@dataclass(frozen=True, kw_only=True)
class ErrorEvent(Event):
    """A candidate stopped (the others go on), or, without a candidate, the run failed."""

    event: ClassVar[str] = "error"
    step: int | None = field(default=None, metadata=OPTIONAL)
    message: str = ""


@dataclass(frozen=True, kw_only=True)
class CancelledEvent(Event):
    """The run was cancelled: metrics so far are kept, nothing is saved."""

    event: ClassVar[str] = "cancelled"
    step: int | None = field(default=None, metadata=OPTIONAL)
    message: str = ""


EVENT_KINDS: dict[str, type[Event]] = {
    cls.event: cls for cls in (StartEvent, StepEvent, EvalEvent, DoneEvent, ErrorEvent, CancelledEvent)
}


def parse_event(data: Mapping[str, Any]) -> Event:
    """The typed event of one JSON object (a metrics.jsonl line, old or new).

    Raises:
        TypeError: not a JSON object.
        ValueError: an unknown kind (the known ones are named), or a required field missing.
    """
    if not isinstance(data, Mapping):
        raise TypeError(f"an event is a JSON object, not {type(data).__name__}")
    kind = data.get("event")
    cls = EVENT_KINDS.get(kind)
    if cls is None:
        raise ValueError(f"unknown event kind {kind!r}; known: {', '.join(EVENT_KINDS)}")
    try:
        return cls.from_json(data)
    except TypeError as err:  # a required field is missing
        raise ValueError(f"malformed {kind} event ({err})") from None


def read_events(path: str | Path) -> list[Event]:
    """The events of a metrics file, in order; [] when it does not exist yet.

    A line cut short (still being written, or a crash) and a kind this version does not know are skipped.
    """
    path = Path(path)
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(parse_event(json.loads(line)))
        except (TypeError, ValueError) as err:  # json.JSONDecodeError is a ValueError too
            logger.debug("%s: skipped a line (%s)", path, err)
    return events


def of_kind(events: Iterable[Event], kind: type[Event]) -> list:
    """The events of one kind, in order."""
    return [event for event in events if isinstance(event, kind)]


def curves(events: Sequence[Event], *, kind: type[Event] = EvalEvent, key: str = "loss") -> dict[str, list[tuple]]:
    """Per-candidate (step, value) points of one kind of event, for plotting.

    Args:
        events: events as from read_events or a callback (other kinds are passed over).
        kind: EvalEvent for validation points, StepEvent for training points.
        key: the value to take, e.g. "loss", the task's metric, "lr", "throughput".

    Returns:
        {candidate: [(step, value), ...]} in event order; events without the value are skipped.
    """
    out: dict[str, list[tuple]] = {}
    for event in of_kind(events, kind):
        if event.value(key) is not None:
            out.setdefault(event.candidate, []).append((event.step, event.value(key)))
    return out
