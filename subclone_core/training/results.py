"""What a training run hands back per candidate."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class EvalPoint:
    """One validation result.

    Attributes:
        step: optimizer steps done before this evaluation (0 = the initialization).
        seen: tokens (text) or images (vision) trained on so far, over all processes.
        loss: mean validation loss per target token (text) or image.
        perplexity: exp(loss), text only.
        accuracy: fraction of correct top-1 labels, images only.
    """

    step: int
    seen: int
    loss: float
    perplexity: float | None = None
    accuracy: float | None = None

    def value(self, metric: str) -> float | None:
        """The value of "loss", "perplexity" or "accuracy"."""
        return getattr(self, metric)


@dataclass
class RunResult:
    """The outcome of one candidate.

    Attributes:
        name: the candidate's name.
        strategy: the strategy its default hyperparameters came from (or its name).
        lr: peak learning rate used.
        weight_decay: weight decay used.
        status: "done", "stopped" (non-finite loss or gradient; see message) or "cancelled".
        message: why it stopped or was cancelled, else None.
        steps_done: optimizer steps completed.
        seen: tokens or images trained on, over all processes.
        evals: validation results, step 0 first.
        train_loss: (step, mean training loss over the step's micro-batches and processes).
        throughput: tokens (or images) per second of training steps, evaluation excluded.
        unit: the throughput unit of the model's task (subclone_core.tasks).
        metric: the validation value the speedup compares: "loss" (lower is better) or "accuracy".
        saved_to: the saved model folder, or None when nothing was saved.
        model: the trained model (unwrapped, on the training device, in eval mode).
    """

    name: str
    strategy: str
    lr: float
    weight_decay: float
    status: str = "running"
    message: str | None = None
    steps_done: int = 0
    seen: int = 0
    evals: list[EvalPoint] = field(default_factory=list)
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    throughput: float = 0.0
    unit: str = ""
    metric: str = "loss"
    saved_to: Path | None = None
    model: Any = field(default=None, repr=False)

    def curve(self, metric: str = "loss") -> list[tuple[int, float]]:
        """Validation (step, value) points of "loss", "perplexity" or "accuracy"."""
        return [(p.step, p.value(metric)) for p in self.evals if p.value(metric) is not None]

    def summary(self) -> dict[str, Any]:
        """A JSON-ready digest (no model, no training curve)."""
        first = self.evals[0] if self.evals else None
        last = self.evals[-1] if self.evals else None
        return {
            "name": self.name,
            "strategy": self.strategy,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "status": self.status,
            "message": self.message,
            "steps_done": self.steps_done,
            "seen": self.seen,
            "first_eval": first.__dict__ if first else None,
            "final_eval": last.__dict__ if last else None,
            "throughput": round(self.throughput, 2),
            "unit": self.unit,
            "saved_to": str(self.saved_to) if self.saved_to else None,
        }


def _same_name(run: str) -> str:
    return run


def _every_run(results: Mapping[str, RunResult]) -> Collection[str]:
    return set(results)


@dataclass(frozen=True)
class SavePlan:
    """Which finished runs a training call saves, and under which folder names.

    Attributes:
        folder: run name -> its folder name under the save folder.
        choose: the settled results (every run's) -> the names of the runs to save; of those, only the
            finished ones ("done") are saved. Decided on every process alike (validation is all-reduced).
    """

    folder: Callable[[str], str] = _same_name
    choose: Callable[[Mapping[str, RunResult]], Collection[str]] = _every_run
