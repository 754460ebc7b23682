"""The benchmarks' training harness: data splits, training settings, candidates, one engine call with progress
lines, each candidate's chosen run by the library's sweep rule, the one JSON schema of a trained run (run_json)
and of an arm swept over learning rates (arm_json) that every benchmark's results use, the size a script's flags
name and its output folder. Every run goes through the library's own training (`training.train_candidates`,
`training.sweep.choose_runs`)."""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from bench._report import DOCS, log
from subclone_core.sources import Parent, make_data
from subclone_core.training import Candidate, RunResult, TrainConfig, default_hparams, train_candidates
from subclone_core.training.events import ErrorEvent, EvalEvent, Event, StartEvent
from subclone_core.training.speedup import HIGHER_IS_BETTER, best_value
from subclone_core.training.sweep import choose_runs, grid_edge, run_name, runs_from_results

# Stand-ins for the two child shapes of the default parent (bench/_report.SHAPES) on the tiny smoke parents.
SMOKE_SHAPES = {"paper-like": {"layers": 3, "hidden": 24, "heads": 3, "kv_heads": 1, "ffn": 32},
                "aggressive": {"layers": 2, "hidden": 16, "heads": 2, "kv_heads": 1, "ffn": 16}}


@dataclass(frozen=True)
class Arm:
    """One way to initialize and train the child: candidate name (letters, digits, ._+-), report label,
    make_child strategy and options, its lrs to sweep (None: trained at the subcloned child's best lr), its
    weight decay (None: the strategy's default) and whether the parent teaches it (distillation)."""

    name: str
    label: str
    strategy: str
    options: dict = field(default_factory=dict)
    lrs: tuple[float, ...] | None = None
    weight_decay: float | None = None
    distill: bool = False

    @property
    def hparam_key(self) -> str:
        """The key of its default hyperparameters (weight decay)."""
        return "subclone+distill" if self.distill else self.strategy

    def candidates(self, model: torch.nn.Module, lrs: Iterable[float], teacher: torch.nn.Module | None = None
                   ) -> list[Candidate]:
        """A fresh copy of ``model`` per learning rate, named as a sweep's runs ("subclone@lr=1e-3")."""
        return [candidate(run_name(self.name, lr), model, lr, self.hparam_key, weight_decay=self.weight_decay,
                          teacher=teacher if self.distill else None) for lr in lrs]


@dataclass(frozen=True)
class Budget:
    """Training settings shared by every candidate of one experiment (short budgets, a fixed validation set)."""

    steps: int
    eval_every: int
    batch_size: int
    seq_len: int = 128  # text
    val_tokens: int = 4096  # text: the fixed validation set
    val_images: int = 1000  # images: the fixed validation set
    eval_batch_size: int | None = None

    def units(self, task: str) -> str:
        """Training data per step in words, e.g. "8 x 128 tokens"."""
        return f"{self.batch_size} x {self.seq_len} tokens" if task == "causal-lm" else f"{self.batch_size} images"

    def splits(self, parent: Parent, data_id: str) -> tuple[Any, Any]:
        """One pass of training data for the budget (repeats if the split is smaller) and the validation set."""
        train = make_data(parent, data_id, "train", seq_len=self.seq_len,
                          max_tokens=self.steps * self.batch_size * self.seq_len,
                          max_images=self.steps * self.batch_size)
        val = make_data(parent, data_id, "validation", seq_len=self.seq_len, max_tokens=self.val_tokens,
                        max_images=self.val_images)
        return train, val

    def config(self, val_len: int, **extra: Any) -> TrainConfig:
        """Its TrainConfig: the whole validation set in batches rounded up, evaluations every eval_every."""
        return train_config(self.steps, self.batch_size, val_len, eval_batch=self.eval_batch_size or self.batch_size,
                            eval_every=self.eval_every, **extra)


def train_config(steps: int, batch_size: int, val_len: int, *, eval_batch: int | None = None, round_down: bool = False,
                 eval_every: int | None = None, eval_at: Iterable[int] = (), seed: int = 0,
                 precision: str = "auto") -> TrainConfig:
    """The benchmarks' TrainConfig: AdamW with 5% warmup then cosine to 0, every validation on the whole fixed set
    (``val_len`` items in batches of ``eval_batch``, default the training batch; the last partial batch counted
    unless ``round_down``: bench_budget's choice), on the best device."""
    size = eval_batch or batch_size
    batches = val_len // size if round_down else math.ceil(val_len / size)
    return TrainConfig(steps=steps, batch_size=batch_size, eval_every=eval_every or steps, eval_at=tuple(eval_at),
                       eval_batches=max(1, batches), eval_batch_size=eval_batch, warmup=0.05, seed=seed,
                       device="auto", mixed_precision=precision)


def candidate(name: str, model: torch.nn.Module, lr: float, strategy: str, *, weight_decay: float | None = None,
              teacher: torch.nn.Module | None = None) -> Candidate:
    """A fresh copy of ``model`` at ``lr``, with the strategy's default weight decay unless one is given."""
    decay = default_hparams(strategy)["weight_decay"] if weight_decay is None else weight_decay
    return Candidate(name, copy.deepcopy(model), lr=lr, weight_decay=decay, strategy=strategy, teacher=teacher)


def train(cands: list[Candidate], train_data: Any, val: Any, config: TrainConfig, tag: str,
          metrics: Path) -> dict[str, RunResult]:
    """Train candidates side by side on the identical batches (progress on stderr, metrics to ``metrics``);
    the curves are kept, the weights freed."""
    log(f"[{tag}] {', '.join(c.name for c in cands)}: {config.steps} steps, batch {config.batch_size}")
    results = train_candidates(cands, train_data, val, config, callbacks=[progress_printer(tag, config.steps)],
                               metrics_path=metrics)
    for result in results.values():
        result.model = None
    return results


def progress_printer(tag: str, steps: int) -> Callable[[Event], None]:
    """An engine callback that prints each validation result (the task's metric, named by the start event)
    to stderr."""
    metric = {"name": "loss"}

    def show(event: Event) -> None:
        if isinstance(event, StartEvent):
            metric["name"] = event.metric
        elif isinstance(event, EvalEvent):
            value = event.value(metric["name"])
            log(f"[{tag}] step {event.step}/{steps} {event.candidate}: "
                f"{'?' if value is None else f'{value:.4f}'} ({event.time:.0f} s)")
        elif isinstance(event, ErrorEvent):
            log(f"[{tag}] {event.candidate}: {event.message}")
    return show


def best_runs(runs: dict[str, RunResult], metric: str, *, always: bool = False) -> dict[str, RunResult]:
    """Each candidate's chosen run by the library's rule (training.sweep.choose_runs: the best validation value
    among the runs not stopped by a non-finite loss); a candidate whose every lr diverged has none, unless
    ``always`` (bench_budget: then its lowest lr's run)."""
    higher = HIGHER_IS_BETTER[metric]
    swept = runs_from_results(runs, metric, higher_is_better=higher)
    eligible = {r.run for r in swept if always or (r.status != "stopped" and r.best is not None)}
    return {name: runs[pick] for name, pick in choose_runs(swept, higher_is_better=higher).items() if pick in eligible}


def sweep_then_rest(arms: Iterable[Arm], train_stage: Callable[[list[Arm], dict[str, tuple[float, ...]], str],
                                                           dict[str, RunResult]],
                    metric: str, rest: str) -> tuple[dict[str, RunResult], dict[str, RunResult], float]:
    """The swept arms at every lr of their grids (stage "sweep"), then the others (stage ``rest``) at the subcloned
    child's best lr (its lowest swept lr if every one diverged). ``train_stage(arms, lr_of, stage)`` trains one
    stage. Returns every run, each arm's chosen run and that lr."""
    arms = list(arms)
    runs = train_stage([a for a in arms if a.lrs], {a.name: a.lrs for a in arms if a.lrs}, "sweep")
    chosen = best_runs(runs, metric)
    child = chosen.get("subclone")
    lr = child.lr if child is not None else min(next(a.lrs for a in arms if a.name == "subclone"))
    if others := [a for a in arms if not a.lrs]:
        done = train_stage(others, {a.name: (lr,) for a in others}, rest)
        runs, chosen = {**runs, **done}, {**chosen, **best_runs(done, metric)}
    return runs, chosen, lr


# --- the one JSON schema of a trained run and of a swept arm -------------------------------------------------


def run_json(run: RunResult, metric: str = "loss", /, *, curve: bool = True, **extra: Any) -> dict[str, Any]:
    """One trained run as every benchmark's JSON holds it: lr, weight decay, status and message, the validation
    ``metric`` at step 0, its best and its final value, training throughput and its unit, and (``curve``) the
    validation curve as steps, training tokens (images for a ViT) seen so far and values, step 0 first; then
    ``extra`` (e.g. seconds, arm, seed)."""
    points = [p for p in run.evals if p.value(metric) is not None]  # run.curve(metric)'s points
    steps, values = [p.step for p in points], [p.value(metric) for p in points]
    row = {"lr": run.lr, "weight_decay": run.weight_decay, "status": run.status, "message": run.message,
           "metric": metric, "start": values[0] if values else None,
           "best": best_value(list(zip(steps, values)), higher_is_better=HIGHER_IS_BETTER[metric]),
           "final": values[-1] if values else None, "throughput": run.throughput, "unit": run.unit}
    if curve:
        row.update(steps=steps, tokens=[p.seen for p in points], values=values)
    return {**row, **extra}


def arm_json(runs: dict[float, RunResult], grid: Iterable[float], metric: str = "loss",
             rows: dict[float, dict[str, Any]] | None = None) -> dict[str, Any]:
    """One arm swept over ``grid`` as every benchmark's JSON holds it: the grid, its runs (run_json, or the
    ``rows`` given per lr) in lr order, the lr the library's rule chose (None: every run diverged) and whether it
    sits at the "low" or "high" edge of the grid."""
    grid = sorted(grid)
    best = next(iter(best_runs({run_name("arm", lr): r for lr, r in runs.items()}, metric).values()), None)
    rows = rows or {lr: run_json(r, metric) for lr, r in runs.items()}
    return {"lrs": grid, "runs": [rows[lr] for lr in sorted(rows)], "chosen_lr": best.lr if best else None,
            "edge": edge_of(best.lr, grid) if best else None}


def chosen_run(arm: dict[str, Any]) -> dict[str, Any] | None:
    """An arm's chosen run (arm_json), None when every run diverged."""
    return next((r for r in arm["runs"] if r["lr"] == arm["chosen_lr"]), None)


def edge_of(lr: float, lrs: Iterable[float]) -> str | None:
    """"low" or "high" when the chosen lr is the lowest or highest of a grid of several, else None."""
    return {"lowest": "low", "highest": "high"}.get(grid_edge(lr, list(lrs)))


# --- command line and outputs ---------------------------------------------------------------------------


def start(args: argparse.Namespace) -> None:
    """What every benchmark does first: its torch CPU threads (--threads), our own progress lines only."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()


def size_name(args: argparse.Namespace) -> str:
    return "smoke" if args.smoke else "gpu" if getattr(args, "gpu", False) else "cpu"


def folder(size: str, out: Path | None, prefix: str) -> Path:
    """Where a size writes: the given folder, else a temporary one for the smoke size, else docs/."""
    return out or (Path(tempfile.mkdtemp(prefix=prefix)) if size == "smoke" else DOCS)
