"""Experiment trackers (TensorBoard, Weights & Biases, MLflow) fed by the training engine's events.

A TrackerCallback is one more engine callback: it receives exactly the events that go to metrics.jsonl
and logs their numbers through accelerate's tracker classes. Every "step" field becomes ``train/<key>``
(loss, lr, grad_norm, throughput, seen; ce and kl when distilling), every "eval" field ``val/<key>``
(loss, perplexity or accuracy, seen), at the event's step. ``val/speedup`` is the speedup so far: random
init's steps to its best value so far over the candidate's, as compare's table defines it (a lower bound
is logged as its bound), logged once both have been evaluated at a step and there is a number.

TensorBoard and W&B get one run per candidate, so their curves overlay (RUN/tensorboard/<candidate>/ for
TensorBoard). MLflow's logging API holds a single active run per process, so MLflow gets one run whose
keys are prefixed with the candidate (``subclone/val/loss``).

The engine calls callbacks on the main process only; create the callback there (the CLI does).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker, MLflowTracker, TensorBoardTracker, WandBTracker
from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

from subclone_core.core.errors import SubcloneError
from subclone_core.training.events import CandidatePlan, EvalEvent, Event, StartEvent, StepEvent
from subclone_core.training.speedup import speedup

TENSORBOARD_DIR = "tensorboard"
_SKIPPED = {"event", "candidate", "time", "step"}  # bookkeeping, not curves


def _open_tensorboard(run_dir: Path, project: str, name: str, config: dict[str, Any]) -> GeneralTracker:
    tracker = TensorBoardTracker(name, run_dir / TENSORBOARD_DIR)
    tracker.start()
    # As text: add_hparams (store_init_configuration) would add a timestamped run beside each candidate's.
    tracker.log({"config": json.dumps(config, indent=1)}, step=0)
    return tracker


def _open_wandb(run_dir: Path | None, project: str, name: str, config: dict[str, Any]) -> GeneralTracker:
    # reinit="create_new" keeps one W&B run per candidate open at once (wandb >= 0.19.10).
    tracker = WandBTracker(project, name=name, group=project, config=config, reinit="create_new",
                           dir=str(run_dir) if run_dir is not None else None)
    tracker.start()
    return tracker


def _open_mlflow(run_dir: Path | None, project: str, name: str, config: dict[str, Any]) -> GeneralTracker:
    tracker = MLflowTracker(experiment_name=project, run_name=name)
    tracker.start()
    tracker.store_init_configuration(config)
    return tracker


@dataclass(frozen=True)
class _Kind:
    """One tracker kind: what to install, whether it is there, how its runs are laid out and opened."""

    package: str
    available: Callable[[], bool]
    per_candidate: bool  # one run per candidate; False: one run, keys prefixed by candidate
    needs_dir: bool  # writes under the run folder
    open: Callable[[Path | None, str, str, dict[str, Any]], GeneralTracker]  # (run_dir, project, name, config)


_KINDS = {
    "tensorboard": _Kind("tensorboard", is_tensorboard_available, True,
                         TensorBoardTracker.requires_logging_directory, _open_tensorboard),
    "wandb": _Kind("wandb", is_wandb_available, True, WandBTracker.requires_logging_directory, _open_wandb),
    "mlflow": _Kind("mlflow", is_mlflow_available, False, MLflowTracker.requires_logging_directory, _open_mlflow),
}
REPORT_TO = tuple(_KINDS)


def parse_report_to(text: str | None, run_dir: str | Path | None) -> tuple[str, ...]:
    """The tracker names of ``--report-to``, checked: known, installed, and a run folder where one is needed.

    Args:
        text: comma-separated names (e.g. "tensorboard" or "tensorboard,wandb"), or None for none.
        run_dir: the run folder (--out), or None when nothing is saved.

    Returns:
        The names in the order given, without repeats; () for None.

    Raises:
        SubcloneError: an unknown name (with the valid ones), a package that is not installed (named, with
            the pip command), or a tracker that writes files but no run folder.
    """
    names = tuple(dict.fromkeys(n.strip() for n in (text or "").split(",") if n.strip()))
    for name in names:
        kind = _KINDS.get(name)
        if kind is None:
            raise SubcloneError(f"--report-to: unknown tracker {name!r}; choose from {', '.join(REPORT_TO)}")
        if not kind.available():
            raise SubcloneError(f"--report-to {name} needs the {kind.package!r} package, which is not installed "
                                f"(pip install {kind.package})")
        if kind.needs_dir and run_dir is None:
            raise SubcloneError(f"--report-to {name} writes its logs under the run folder: give --out RUN")
    return names


def _flat_config(event: StartEvent, candidate: CandidatePlan | None) -> dict[str, Any]:
    """Hyperparameters as flat scalars (what trackers' config tables take)."""
    flat = {f"config/{k}": v for k, v in event.config.items() if isinstance(v, (int, float, str, bool))}
    flat.update(world_size=event.world_size, device=event.device, unit=event.unit, metric=event.metric)
    if candidate is not None:
        flat.update({k: v for k, v in asdict(candidate).items() if k != "name"}, candidate=candidate.name)
    return flat


class TrackerCallback:
    """An engine callback that logs every step and evaluation to experiment trackers (see module docstring).

    Args:
        report_to: tracker names, as checked by parse_report_to.
        run_dir: the run folder (TensorBoard writes ``run_dir/tensorboard/<candidate>``).
        project: the project or experiment name (W&B project, MLflow experiment, the shared run's name).
        baseline: the random-init candidate the speedup so far is measured against.
    """

    def __init__(self, report_to: Sequence[str], run_dir: str | Path | None, project: str,
                 baseline: str = "random") -> None:
        self.report_to, self.project, self.baseline = tuple(report_to), project, baseline
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.runs: dict[str, list[GeneralTracker]] = {}  # candidate -> its own runs
        self.shared: list[GeneralTracker] = []  # one run for all, keys prefixed by candidate
        self.curves: dict[str, list[tuple[int, float | None]]] = {}  # candidate -> (step, metric) evaluations
        self.speedups_logged: set[tuple[str, int]] = set()
        self.metric, self.higher_is_better = "loss", False
        self.closed = False

    def __call__(self, event: Event) -> None:
        """Take one engine event (start, step and eval are logged; the others carry no curve)."""
        handler = {StartEvent: self._start, StepEvent: self._step, EvalEvent: self._eval}.get(type(event))
        if handler is not None and not self.closed:
            handler(event)

    def _start(self, event: StartEvent) -> None:
        self.metric, self.higher_is_better = event.metric, event.higher_is_better
        for kind in self.report_to:
            if not _KINDS[kind].per_candidate:
                self.shared.append(_KINDS[kind].open(self.run_dir, self.project, self.project,
                                                     _flat_config(event, None)))
                continue
            for cand in event.candidates:
                self.runs.setdefault(cand.name, []).append(
                    _KINDS[kind].open(self.run_dir, self.project, cand.name, _flat_config(event, cand)))

    def _log(self, candidate: str, values: dict[str, float], step: int) -> None:
        if not values:
            return
        for tracker in self.runs.get(candidate, []):
            tracker.log(values, step=step)
        for tracker in self.shared:
            tracker.log({f"{candidate}/{key}": value for key, value in values.items()}, step=step)

    def _step(self, event: StepEvent) -> None:
        self._log(event.candidate, _numbers(event, "train"), event.step)

    def _eval(self, event: EvalEvent) -> None:
        self._log(event.candidate, _numbers(event, "val"), event.step)
        self.curves.setdefault(event.candidate, []).append((event.step, event.value(self.metric)))
        self._speedups(event.step)

    def _speedups(self, step: int) -> None:
        """Log the speedup so far of every candidate evaluated at ``step`` once the baseline is too.

        Candidates are evaluated one after another, the baseline anywhere in that order, so this runs
        after every evaluation and logs each candidate's step once, when both points exist.
        """
        base = self.curves.get(self.baseline)
        if not base or base[-1][0] != step:
            return
        for name, curve in self.curves.items():
            if name == self.baseline or curve[-1][0] != step or (name, step) in self.speedups_logged:
                continue
            self.speedups_logged.add((name, step))
            result = speedup(base, curve, higher_is_better=self.higher_is_better)
            if result.ratio is not None:
                self._log(name, {"val/speedup": result.ratio}, step)

    def close(self) -> None:
        """Finish every run (idempotent): flushes and closes TensorBoard's files, ends W&B and MLflow runs."""
        if self.closed:
            return
        self.closed = True
        for tracker in [t for runs in self.runs.values() for t in runs] + self.shared:
            tracker.finish()


def _numbers(event: Event, prefix: str) -> dict[str, float]:
    """The event's finite numbers as ``prefix/key`` (non-finite values arrive as None and are skipped)."""
    return {f"{prefix}/{key}": value for key, value in event.to_json().items()
            if key not in _SKIPPED and isinstance(value, (int, float)) and not isinstance(value, bool)}
