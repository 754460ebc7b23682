"""Training events as JSON Lines: one object per line, flushed as it happens, readable while written.

The events and their kinds are subclone_core.training.events, whose ``read_events`` reads such a file.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import TextIO

from subclone_core.core.manifest import json_safe
from subclone_core.training.events import Event


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

    def write(self, event: Event) -> None:
        """Append one event as one line and flush it (non-finite values are written as null)."""
        line = json.dumps(json_safe(event.to_json()), default=str, allow_nan=False)
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
