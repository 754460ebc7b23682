"""Training events as JSON Lines: one object per line, flushed as it happens, readable while written.

Event kinds written by the training engine (every event has "event", "time" in seconds since the run
started and, except "start", "candidate"):

- start: {"candidates": [...], "config": {...}, "world_size": N, "device": "cpu", "unit": UNIT (the task's throughput
  unit), "metric": the validation value candidates are compared on, "higher_is_better": its direction}
- step: {"step", "loss", "lr", "grad_norm", "throughput", "unit", "seen"}
- eval: {"step", "loss", "seen"} and "perplexity" (text) or "accuracy" (images)
- done: {"step", "status": "done", "final": {...}, "saved_to": path or null}
- error: {"step", "message"}: that candidate stopped (e.g. a non-finite loss); the others go on
- cancelled: {"step", "message"}: the run was cancelled; metrics so far are kept, nothing is saved
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any, TextIO


def json_safe(value: Any) -> Any:
    """Replace non-finite floats (not valid JSON) with None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


class MetricsLog:
    """Append-only JSONL writer; each line is flushed so a reader (the app, ``tail -f``) sees it at once.

    Use as a context manager or call close(). Thread-safe: the app's job thread writes while the page
    thread may read the file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO | None = self.path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, event: dict[str, Any]) -> None:
        """Append one event as one line and flush it."""
        line = json.dumps(json_safe(event), default=str)
        with self._lock:
            if self._file is None:
                raise ValueError(f"metrics log {self.path} is closed")
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        """Close the file (idempotent)."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> MetricsLog:  # noqa: PYI034 (Self needs Python 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All complete events of a metrics file; a last line still being written is skipped.

    Args:
        path: a JSONL file written by MetricsLog.

    Returns:
        The events in order; an empty list when the file does not exist yet.
    """
    path = Path(path)
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a concurrent write or a crash
    return events


def curves(events: list[dict[str, Any]], *, kind: str = "eval", key: str = "loss") -> dict[str, list[tuple]]:
    """Per-candidate (step, value) points of one kind of event, for plotting.

    Args:
        events: events as from read_metrics or a callback.
        kind: "eval" for validation points, "step" for training points.
        key: the value to take, e.g. "loss", "accuracy", "lr", "throughput".

    Returns:
        {candidate: [(step, value), ...]} in step order; events without the key are skipped.
    """
    out: dict[str, list[tuple]] = {}
    for event in events:
        if event.get("event") == kind and event.get(key) is not None:
            out.setdefault(event["candidate"], []).append((event["step"], event[key]))
    return out
