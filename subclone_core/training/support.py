"""Small helpers of the engine: event fan-out and per-candidate random streams."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from time import perf_counter

import torch

from subclone_core.core.manifest import json_safe
from subclone_core.core.rng import GLOBAL_RNG_LOCK
from subclone_core.training.events import Event, parse_event
from subclone_core.training.metrics_log import MetricsLog

Callback = Callable[[Event], None]


class Emitter:
    """Send events to the callbacks and the metrics file, on the main process only."""

    def __init__(self, callbacks: Iterable[Callback], log: MetricsLog | None, enabled: bool) -> None:
        self.callbacks, self.log, self.enabled = list(callbacks), log, enabled
        self.t0 = perf_counter()

    def __call__(self, event: Event) -> None:
        """Stamp the event with the run's clock and send it, as the file holds it (non-finite values None)."""
        if not self.enabled:
            return
        event = parse_event(json_safe({**event.to_json(), "time": round(perf_counter() - self.t0, 3)}))
        if self.log is not None:
            self.log.write(event)
        for callback in self.callbacks:
            callback(event)


class RngSlot:
    """A candidate's private torch RNG stream, swapped in around its steps (dropout draws).

    Holding it also holds GLOBAL_RNG_LOCK, so runs in concurrent threads take turns step by step and
    each keeps exactly the dropout draws it would have had alone.
    """

    def __init__(self, seed: int, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.cpu_state = torch.Generator().manual_seed(seed).get_state()
        self.cuda_state = torch.Generator(device=device).manual_seed(seed).get_state() if self.cuda else None

    def __enter__(self) -> None:
        GLOBAL_RNG_LOCK.acquire()
        try:
            self.saved = (torch.get_rng_state(), torch.cuda.get_rng_state() if self.cuda else None)
            torch.set_rng_state(self.cpu_state)
            if self.cuda:
                torch.cuda.set_rng_state(self.cuda_state)
        except BaseException:
            GLOBAL_RNG_LOCK.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            self.cpu_state = torch.get_rng_state()
            torch.set_rng_state(self.saved[0])
            if self.cuda:
                self.cuda_state = torch.cuda.get_rng_state()
                torch.cuda.set_rng_state(self.saved[1])
        finally:
            GLOBAL_RNG_LOCK.release()
