"""What the app shows about training runs and files: live summaries of a run's events, memory checks
before a run, and a saved child as a zip. Pure functions; no Streamlit.

Analyses of models (generation, ranking consistency, block removal) live in ``subclone_core.analysis.probes``;
shape search and parameter counts in ``subclone_core.core.shape``.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from subclone_core.app.jobs import NoteEvent
from subclone_core.core.errors import SubcloneError
from subclone_core.core.shape import Shape
from subclone_core.training.events import (
    CancelledEvent,
    EvalEvent,
    Event,
    StartEvent,
    StepEvent,
    curves,
    of_kind,
)
from subclone_core.training.speedup import HIGHER_IS_BETTER, speedup
from subclone_core.training.sweep import (
    choose_runs,
    chosen_events,
    is_swept,
    lr_text,
    runs_from_events,
    sweep_report,
)

# --- training -----------------------------------------------------------------------------------------


def live_summary(events: list[Event], metric: str = "loss", baseline: str = "random") -> list[dict]:
    """One row per candidate from a run's events so far: step, losses, throughput, speedup so far.

    Args:
        events: the run's events.
        metric: the validation value compared, the task's (TaskSpec.metric).
        baseline: the candidate the speedup is measured against.
    """
    evals = curves(events, kind=EvalEvent, key=metric)
    last_step = {event.candidate: event for event in of_kind(events, StepEvent)}
    rows = []
    for name in dict.fromkeys([*evals, *last_step]):
        step, curve = last_step.get(name, StepEvent(step=0, loss=None)), evals.get(name, [])
        row = {"model": name, "step": step.step, "train loss": step.loss,
               f"val {metric}": curve[-1][1] if curve else None, step.unit or "throughput": step.throughput}
        if name == baseline:
            row["speedup vs random"] = "baseline"
        elif baseline in evals and curve:
            row["speedup vs random"] = speedup(evals[baseline], curve,
                                               higher_is_better=HIGHER_IS_BETTER[metric]).text()
        rows.append(row)
    return rows


@dataclass
class SweepView:
    """A run's events as the Train page shows them when candidates are swept over learning rates.

    Attributes:
        events: the chosen runs' events, named after their candidates (all events without a sweep).
        faint: the runs not chosen (drawn faintly in the loss chart).
        rows: one row per run (model, lr, best and last validation value, status, chosen); [] without a sweep.
        notes: a chosen learning rate at the edge of its grid, with the rate to add.
    """

    events: list[Event]
    faint: set[str] = field(default_factory=set)
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def sweep_view(events: list[Event], metric: str, higher_is_better: bool) -> SweepView:
    """Each candidate's chosen run so far (training.sweep's rule, as the command line's) and the sweep table.

    Args:
        events: the job's events so far.
        metric, higher_is_better: the task's validation value and its direction (from the task registry).
    """
    runs = runs_from_events(events, metric, higher_is_better=higher_is_better)
    if not any(is_swept(r.run) for r in runs):
        return SweepView(events)
    chosen = choose_runs(runs, higher_is_better=higher_is_better)
    report = sweep_report(runs, chosen)
    rows = [{"model": c["candidate"], "lr": lr_text(r["lr"]), f"best {metric}": r["best"],
             f"last {metric}": r["final"], "status": r["status"], "chosen": r["chosen"]}
            for c in report for r in c["runs"]]
    return SweepView(chosen_events(events, chosen), {r.run for r in runs} - set(chosen.values()), rows,
                     [c["note"] for c in report if c["note"]])


def run_progress(events: list[Event]) -> tuple[int, int]:
    """(last step reported by any candidate, the run's total steps; 0 before the run has started)."""
    total = next((e.config["steps"] for e in of_kind(events, StartEvent)), 0)
    done = max((e.step for e in of_kind(events, StepEvent)), default=0)
    return done, total


ROW_FIELDS = ("event", "candidate", "step", "time", "loss", "perplexity", "accuracy", "lr", "grad_norm",
              "throughput", "seen")  # the fields of step and eval events (None where an event has none)


def ending_notes(events: list[Event]) -> list[str]:
    """What a finished run says beyond its status: why it was cancelled, what happened to its folder."""
    return [e.message for e in events if isinstance(e, (CancelledEvent, NoteEvent)) and e.message]


def metrics_rows(events: list[Event]) -> list[dict]:
    """Step and evaluation events as flat rows (a table and its CSV)."""
    return [{k: getattr(e, k, None) for k in ROW_FIELDS} for e in events if isinstance(e, (StepEvent, EvalEvent))]


def training_bytes(models: Sequence[nn.Module], batch_size: int, seq_len: int) -> int:
    """A rough upper estimate of the memory a run needs: fp32 weights, gradients and AdamW state of every
    model (all stay alive), plus one model's activations and logits at a time (they train in turn)."""
    params = sum(p.numel() for m in models for p in m.parameters())
    widest = max(models, key=lambda m: sum(p.numel() for p in m.parameters()))
    shape = Shape.of(widest.config)
    width = getattr(widest.config, "vocab_size", None) or getattr(widest.config, "num_labels", 1)
    activations = batch_size * seq_len * (shape.layers * (12 * shape.hidden + 2 * shape.ffn) + 4 * width)
    return 16 * params + 4 * activations


def check_memory(need: int, free: int, headroom: float = 0.8) -> None:
    """Refuse a run that would not fit in ``headroom`` of the free memory.

    Raises:
        SubcloneError: with both numbers and what to lower.
    """
    if need > headroom * free:
        raise SubcloneError(
            f"this run needs about {need / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB is free; lower the "
            "batch size or sequence length, train fewer models, or wait for other jobs to finish"
        )


# --- files --------------------------------------------------------------------------------------------


def zip_folder(folder: str | Path) -> bytes:
    """The files of a folder as a zip archive in memory, under a top-level folder of the same name."""
    folder = Path(folder)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, f"{folder.name}/{path.relative_to(folder)}")
    return buffer.getvalue()
