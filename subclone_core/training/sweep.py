"""Learning-rate sweeps: each candidate trained at several peak learning rates in one run, its best run kept.

A candidate compared at one learning rate can mislead: a pretrained start and random init rarely share
their best rate. A sweep trains every (candidate, lr) pair as its own run, named ``subclone@lr=1e-3``,
side by side on the identical batches (the engine's usual guarantee). Afterwards each candidate is
represented by its *chosen* run: the one with the best validation value within the budget trained (lowest
loss, or highest accuracy: the task registry gives the direction), among the runs that were not stopped
by a non-finite loss; ties go to the lower learning rate. When the chosen rate is the lowest or highest
swept, the grid's optimum may lie beyond it, and the report says so.

The same functions serve the command line (finished RunResults) and the app (live engine events).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from subclone_core.core.errors import SubcloneError
from subclone_core.core.strategies import STRATEGY_SPECS
from subclone_core.training.config import default_hparams
from subclone_core.training.events import DoneEvent, ErrorEvent, EvalEvent, Event, StartEvent, curves, of_kind
from subclone_core.training.results import RunResult, SavePlan
from subclone_core.training.speedup import best_value

LrGrid = Mapping[str, tuple[float, ...]]  # candidate name -> the peak learning rates it is trained at

MARK = "@lr="  # run name = candidate + MARK + lr_text(lr)
DEFAULT_FACTORS = (0.5, 1.0, 2.0)  # the app's default grid: each strategy's default lr halved and doubled
SYNTAX = "NAME=LR,LR,...,NAME=LR,... (e.g. random=1e-3,2e-3,subclone=5e-4,1e-3)"


def lr_text(lr: float) -> str:
    """A learning rate in short scientific form: 0.001 -> "1e-3", 0.00025 -> "2.5e-4"."""
    mantissa, exponent = f"{lr:.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def run_name(candidate: str, lr: float) -> str:
    """The name of one run of a sweep, e.g. "subclone@lr=1e-3"."""
    return f"{candidate}{MARK}{lr_text(lr)}"


def candidate_of(run: str) -> str:
    """The candidate a run belongs to ("subclone@lr=1e-3" -> "subclone"; a run not swept is its candidate)."""
    return run.split(MARK, 1)[0]


def is_swept(run: str) -> bool:
    """Whether a run is one learning rate of a sweep."""
    return MARK in run


def _lr(text: str, name: str, flag: str) -> float:
    """One learning rate of the spec: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise SubcloneError(f"{flag}: {text.strip()!r} (for {name!r}) is not a number; write {SYNTAX}") from None
    if not (math.isfinite(value) and value > 0):
        raise SubcloneError(f"{flag}: learning rate {text.strip()!r} of {name!r} must be a finite number > 0")
    return value


def _groups(text: str, flag: str) -> list[tuple[str, list[str]]]:
    """The spec split into (name, [lr texts]): a part NAME=LR starts a candidate, a bare LR adds to it."""
    groups: list[tuple[str, list[str]]] = []
    for part in (p.strip() for p in text.split(",")):
        name, sep, value = part.partition("=")
        if not part or (sep and not name.strip()) or (not sep and not groups):
            raise SubcloneError(f"{flag}: {text!r} is malformed at {part!r}; write {SYNTAX}")
        if sep:
            groups.append((name.strip(), []))
        groups[-1][1].append(value if sep else part)
    return groups


def parse_lr_sweep(text: str, names: Sequence[str], flag: str = "--lr-sweep") -> dict[str, tuple[float, ...]]:
    """Read a sweep spec such as "random=1e-3,2e-3,3e-3,subclone=1e-3,2e-3".

    Args:
        text: the spec; candidates not named keep their single learning rate.
        names: the candidates of the run (a named one must be among them).
        flag: how the user gave the spec, for the messages ("--lr-sweep", or the app's label).

    Returns:
        {candidate: learning rates in the order given}, checked by check_lr_sweep.

    Raises:
        SubcloneError: malformed text, a number that is not one, or check_lr_sweep's errors.
    """
    if not text.strip():
        raise SubcloneError(f"{flag}: the spec is empty; write {SYNTAX}")
    grid: dict[str, tuple[float, ...]] = {}
    for name, values in _groups(text, flag):
        if name in grid:
            raise SubcloneError(f"{flag}: {name!r} is named twice; give all its learning rates after one {name}=")
        grid[name] = tuple(_lr(v, name, flag) for v in values)
    check_lr_sweep(grid, names, flag)
    return grid


def check_lr_sweep(grid: LrGrid, names: Sequence[str], flag: str = "lr sweep") -> None:
    """Refuse an unknown candidate, an empty grid, a learning rate that is not finite and > 0, or a repeat.

    Two rates that print alike (6 significant digits) count as a repeat: they would name the same run.
    """
    for name, lrs in grid.items():
        if name not in names:
            raise SubcloneError(f"{flag}: {name!r} is not a candidate; candidates: {', '.join(names)}")
        if not lrs:
            raise SubcloneError(f"{flag}: {name!r} has no learning rates; write {SYNTAX}")
        for lr in lrs:
            if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
                raise SubcloneError(f"{flag}: learning rate {lr!r} of {name!r} must be a finite number > 0")
        texts = [lr_text(lr) for lr in lrs]
        repeated = next((t for t in texts if texts.count(t) > 1), None)
        if repeated is not None:
            raise SubcloneError(f"{flag}: {name!r} lists learning rate {repeated} twice; each rate once")


def sweep_runs(name: str, grid: LrGrid, lr: float | None) -> list[tuple[str, float | None]]:
    """The (run name, peak lr) pairs of one candidate: one per swept rate, or its own name and ``lr``."""
    if name not in grid:
        return [(name, lr)]
    return [(run_name(name, value), value) for value in grid[name]]


def default_lr_grid(names: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """A small grid around each strategy's default learning rate (config.HPARAMS x DEFAULT_FACTORS)."""
    return {name: tuple(default_hparams(name)["lr"] * f for f in DEFAULT_FACTORS)
            for name in names if name in STRATEGY_SPECS}


def format_lr_sweep(grid: LrGrid) -> str:
    """The spec text of a grid (parse_lr_sweep reads it back)."""
    return ",".join(f"{name}=" + ",".join(lr_text(lr) for lr in lrs) for name, lrs in grid.items())


# --- choosing each candidate's run -----------------------------------------------------------------------


@dataclass(frozen=True)
class SweptRun:
    """What the choice needs to know about one run.

    Attributes:
        run: its name (``subclone@lr=1e-3``, or the candidate's own name when not swept).
        lr: its peak learning rate.
        status: "done", "running", "stopped" (non-finite loss: never chosen) or "cancelled".
        best: its best validation value so far (None: none yet, or none finite).
        final: its last validation value.
    """

    run: str
    lr: float
    status: str
    best: float | None
    final: float | None

    @property
    def candidate(self) -> str:
        return candidate_of(self.run)


def runs_from_results(results: Mapping[str, RunResult], metric: str, *,
                      higher_is_better: bool) -> list[SweptRun]:
    """One SweptRun per training result, in the engine's order."""
    out = []
    for name, result in results.items():
        curve = result.curve(metric)
        out.append(SweptRun(name, result.lr, result.status, best_value(curve, higher_is_better=higher_is_better),
                            curve[-1][1] if curve else None))
    return out


def runs_from_events(events: Sequence[Event], metric: str, *, higher_is_better: bool) -> list[SweptRun]:
    """One SweptRun per run of a run's events so far (the app's live view); [] before the start event."""
    start = next(iter(of_kind(events, StartEvent)), None)
    if start is None:
        return []
    evals = curves(events, kind=EvalEvent, key=metric)
    status = {e.candidate: "stopped" for e in of_kind(events, ErrorEvent) if e.candidate}
    status.update({e.candidate: e.status for e in of_kind(events, DoneEvent)})
    out = []
    for cand in start.candidates:
        curve = evals.get(cand.name, [])
        out.append(SweptRun(cand.name, cand.lr, status.get(cand.name, "running"),
                            best_value(curve, higher_is_better=higher_is_better), curve[-1][1] if curve else None))
    return out


def _rank(run: SweptRun, higher_is_better: bool) -> tuple[int, float, float]:
    """Sort key, best first: eligible runs with a value, by value (better first), then by learning rate."""
    if run.status == "stopped" or run.best is None:
        return (1, 0.0, run.lr)
    return (0, -run.best if higher_is_better else run.best, run.lr)


def choose_runs(runs: Sequence[SweptRun], *, higher_is_better: bool) -> dict[str, str]:
    """Each candidate's chosen run: the best validation value among its runs not stopped by a non-finite
    loss; ties, and a candidate with no such run, go to the lowest learning rate.

    Returns:
        {candidate: run name}, candidates in the order of their first run.
    """
    by_candidate: dict[str, list[SweptRun]] = {}
    for run in runs:
        by_candidate.setdefault(run.candidate, []).append(run)
    return {name: min(group, key=lambda r: _rank(r, higher_is_better)).run for name, group in by_candidate.items()}


def edge_of(runs: Sequence[SweptRun], chosen: str) -> str | None:
    """Where the chosen run's rate sits in its candidate's grid: "lowest" or "highest" at an end of a grid
    of two or more rates, else None."""
    lrs = [r.lr for r in runs if r.candidate == candidate_of(chosen)]
    return grid_edge(next(r.lr for r in runs if r.run == chosen), lrs)


def grid_edge(lr: float, lrs: Sequence[float]) -> str | None:
    """"lowest" or "highest" when ``lr`` is at an end of a grid of two or more rates, else None."""
    if len(lrs) < 2:
        return None
    return "lowest" if lr == min(lrs) else "highest" if lr == max(lrs) else None


def edge_note(candidate: str, lr: float, edge: str | None) -> str | None:
    """The warning for a chosen rate at the edge of its grid, with the rate to add; None inside it."""
    if edge is None:
        return None
    beyond, way = (lr / 2, "down") if edge == "lowest" else (lr * 2, "up")
    return (f"{candidate}: its best learning rate {lr_text(lr)} is the {edge} swept; the optimum may lie beyond "
            f"it: extend the grid {way} (e.g. {lr_text(beyond)})")


def sweep_report(runs: Sequence[SweptRun], chosen: Mapping[str, str]) -> list[dict[str, Any]]:
    """JSON-ready: per candidate, its chosen run and rate, the edge note, and every run of it."""
    report = []
    for name, pick in chosen.items():
        mine = [r for r in runs if r.candidate == name]
        lr = next(r.lr for r in mine if r.run == pick)
        edge = edge_of(runs, pick)
        report.append({"candidate": name, "chosen": pick, "lr": lr, "edge": edge, "note": edge_note(name, lr, edge),
                       "runs": [{"run": r.run, "lr": r.lr, "status": r.status, "best": r.best, "final": r.final,
                                 "chosen": r.run == pick} for r in mine]})
    return report


def chosen_results(results: Mapping[str, RunResult], chosen: Mapping[str, str]) -> dict[str, RunResult]:
    """{candidate: its chosen run's result}: what the speedup table and the iso-loss rows compare."""
    return {name: results[run] for name, run in chosen.items()}


def chosen_events(events: Sequence[Event], chosen: Mapping[str, str]) -> list[Event]:
    """The events of the chosen runs, each renamed after its candidate, plus the run-wide ones; the live
    charts and tables then read them as an ordinary run."""
    candidate = {run: name for name, run in chosen.items()}
    out = []
    for event in events:
        if event.candidate is None:
            out.append(event)
        elif event.candidate in candidate:
            out.append(replace(event, candidate=candidate[event.candidate]))
    return out


def save_plan(metric: str, *, higher_is_better: bool) -> SavePlan:
    """Save each candidate's chosen run, in a folder named after the candidate (e.g. RUN/subclone).

    Without a sweep every run is its own candidate, so every finished run is saved under its own name.
    """

    def choose(results: Mapping[str, RunResult]) -> Collection[str]:
        runs = runs_from_results(results, metric, higher_is_better=higher_is_better)
        return set(choose_runs(runs, higher_is_better=higher_is_better).values())

    return SavePlan(folder=candidate_of, choose=choose)

