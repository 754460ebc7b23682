"""What `subclone train` and `subclone compare` share: training flags, data, progress, the result table.

Both commands run unchanged under ``torchrun --nproc_per_node N``: every process runs the same code, the
training engine splits each batch between them, and only the main process writes files and prints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm import tqdm

from subclone_core.cli.commands._options import print_json, require_finite
from subclone_core.core.errors import SubcloneError
from subclone_core.core.manifest import Manifest, json_safe
from subclone_core.core.shape import Shape
from subclone_core.core.strategies import Child, subclone_model
from subclone_core.io.atomic import fault_point, staged_folder
from subclone_core.sources import Parent, load_parent
from subclone_core.sources.folders import _load_preprocessor, first_line
from subclone_core.sources.parents import _folder_origin
from subclone_core.tasks import task_of_config, task_spec
from subclone_core.training import Candidate, RunResult, TrainConfig, train_candidates
from subclone_core.training.events import ErrorEvent, EvalEvent, Event, StartEvent, StepEvent
from subclone_core.training.materialize import FolderWeights, RandomWeights, WeightSource, meta_init
from subclone_core.training.parallel import check_launch
from subclone_core.training.speedup import (
    HIGHER_IS_BETTER,
    format_iso_loss,
    iso_loss_summary,
    result_track,
    speedup_table,
)
from subclone_core.training.sweep import (
    choose_runs,
    chosen_results,
    is_swept,
    lr_text,
    runs_from_results,
    save_plan,
    sweep_report,
)
from subclone_core.training.trackers import REPORT_TO, TrackerCallback, parse_report_to
from subclone_core.workflow.jobs import BASELINE

EVAL_TOKENS = 4096
EVAL_IMAGES = 1000
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def add_training_args(parser: argparse.ArgumentParser, *, out_required: bool, seed: bool = True) -> None:
    """Training, evaluation and output flags (the data flags come from _options.add_data_args).

    Args:
        parser: the subcommand's parser.
        out_required: whether --out must be given.
        seed: add --seed here (a command that already has one, from add_child_args, passes False).
    """
    parser.add_argument("--out", metavar="RUN", required=out_required,
                        help=f"run folder: {METRICS_FILE}, {SUMMARY_FILE} and one trained model folder per "
                             "candidate (must not exist or be empty)")
    parser.add_argument("--overwrite", action="store_true", help="reuse a non-empty run folder")
    parser.add_argument("--steps", type=int, default=200, metavar="N", help="optimizer steps (default 200)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="B",
                        help="sequences or images per step, over all processes (default 8)")
    parser.add_argument("--seq-len", type=int, default=128, metavar="T", help="tokens per sequence (default 128)")
    parser.add_argument("--grad-accum", type=int, default=1, metavar="K", help="micro-batches per step (default 1)")
    parser.add_argument("--lr", metavar="X", help="peak learning rate: one value for all candidates or "
                        "NAME=X,NAME=X,... (default: each strategy's measured default)")
    parser.add_argument("--wd", metavar="X", help="AdamW weight decay, like --lr (default: per strategy)")
    parser.add_argument("--warmup", type=float, default=0.05,
                        help="linear warmup: a fraction of the steps, or a number of steps (default 0.05)")
    parser.add_argument("--eval-every", type=int, metavar="K",
                        help="validate every K steps, and at step 0 and the end (default: steps / 20)")
    parser.add_argument("--eval-images", type=int, default=EVAL_IMAGES, metavar="N",
                        help=f"validation images for image models (default {EVAL_IMAGES})")
    parser.add_argument("--target", type=float, metavar="V",
                        help="validation loss (accuracy for images) to reach (default: random init's best)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: CUDA (bf16 autocast) when available (default auto)")
    parser.add_argument("--fsdp", action="store_true",
                        help="under torchrun, shard each candidate's weights, gradients and AdamW state across "
                             "the processes (FSDP2) instead of a full copy in each; the saved child is gathered "
                             "into one plain folder")
    if seed:
        parser.add_argument("--seed", type=int, default=0, help="seed of the data order and random init (default 0)")
    parser.add_argument("--report-to", metavar="TRACKER", help=f"also log the curves to {', '.join(REPORT_TO)} "
                        "(comma-separated; one run per candidate, TensorBoard's under RUN/tensorboard)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def is_main_process() -> bool:
    """Rank 0 under torchrun, or a plain single process (decided before any process group exists)."""
    return os.environ.get("RANK", "0") == "0"


def world_size() -> int:
    """The number of processes torchrun started (1 for a plain command), known before any process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def training_config(args: argparse.Namespace) -> TrainConfig:
    """The engine's settings from the flags, validated now so that bad input fails before any loading.

    ``eval_batches`` is a placeholder until the validation data is known (see ``load_data``).
    """
    require_finite("--warmup", args.warmup, minimum=0)
    require_finite("--target", args.target)
    eval_every = args.eval_every if args.eval_every is not None else max(1, args.steps // 20)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                         warmup=args.warmup, eval_every=eval_every, seed=args.seed, device=args.device,
                         fsdp=args.fsdp)
    config.validate(world_size())
    check_launch(config.fsdp)
    if args.seq_len < 2:
        raise SubcloneError(f"--seq-len={args.seq_len} must be at least 2")
    if args.eval_images < 1:
        raise SubcloneError(f"--eval-images={args.eval_images} must be a positive integer")
    parse_report_to(args.report_to, args.out)
    return config


def load_training_child(model_id: str, *, fsdp: bool) -> tuple[Parent, WeightSource | None]:
    """The model to train, with float32 master weights (bf16 comes from autocast on GPUs), and the source of
    its values when it has none yet.

    Under --fsdp a model folder with safetensors weights is built on the meta device from its config alone: the
    engine shards it there and each process reads only its own shards from the files (FolderWeights), so no
    process ever holds the whole child. Anything else (no --fsdp, a GGUF file, a Hub id, pickle weights) is
    loaded whole in every process, as before.

    Raises:
        SubcloneError: not a loadable model folder (as load_parent says it).
    """
    folder = Path(model_id)
    if not (fsdp and folder.is_dir() and any(folder.glob("*.safetensors"))):
        return load_parent(model_id, dtype="float32"), None
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except Exception as err:  # noqa: BLE001 - a malformed config fails in many ways
        raise SubcloneError(f"{folder}/config.json is not a usable model config: {first_line(err)}") from None
    task = task_of_config(config)
    with meta_init():
        model = task.auto_model().from_config(config, dtype=torch.float32)
    label, licence = _folder_origin(folder)
    parent = Parent(id=model_id, model=model.eval(), preprocessor=_load_preprocessor(folder, task, False),
                    task=task.name, source=folder, label=label, licence=licence)
    return parent, FolderWeights(folder)


def random_twin(child_model: Any, seed: int, *, meta: bool) -> tuple[Child, WeightSource | None]:
    """The random-init twin of a child's shape (strategy "random"), and the source of its values when it has
    none yet: beside a child built on the meta device (--fsdp) the twin is built there too, and each process
    draws only its own shards (RandomWeights: seeded, the same for any number of processes)."""
    shape = Shape.of(child_model.config)
    if not meta:
        return subclone_model(child_model, shape, strategy="random", seed=seed), None
    with meta_init():
        twin = subclone_model(child_model, shape, strategy="random", seed=seed)
    return twin, RandomWeights(seed)


@contextlib.contextmanager
def prepare_output(out: str | None, overwrite: bool) -> Iterator[Path | None]:
    """Claim the run folder before any work and yield where this run writes: a fresh folder of the same name
    in a hidden sibling, swapped in whole once the run has succeeded. --overwrite thus never loses the
    previous run to one that fails on bad input, is interrupted (Ctrl-C, a crashed process, a full disk) or
    killed, and an old run's candidate folders never linger beside the new summary. A run that fails after
    training began still keeps its metrics: in the run folder when it was empty, else beside it in
    ``<RUN>.interrupted-<time>``. Other torchrun processes, which write nothing, get the final path."""
    if out is None or not is_main_process():
        yield None if out is None else Path(out)
        return
    with staged_folder(out, overwrite=overwrite, keep_partial=_has_metrics) as work:
        yield work


def _has_metrics(work: Path) -> bool:
    metrics = work / METRICS_FILE
    return metrics.is_file() and metrics.stat().st_size > 0


def check_seq_len(model: Any, seq_len: int) -> None:
    """Refuse a --seq-len beyond the model's position table (GPT-2's learned positions end there)."""
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise SubcloneError(f"--seq-len={seq_len} is longer than the model's {limit} positions; use at most {limit}")


def relocate_paths(metrics: Path, work: Path, final: Path) -> None:
    """Point the metrics' saved_to paths at the run folder's final place instead of the staged one."""
    if work != final and metrics.is_file():
        old, new = json.dumps(str(work))[1:-1], json.dumps(str(final))[1:-1]
        metrics.write_text(metrics.read_text(encoding="utf-8").replace(old, new), encoding="utf-8")


def parse_per_candidate(text: str | None, flag: str, names: list[str]) -> dict[str, float]:
    """``"1e-3"`` gives every candidate 1e-3; ``"subclone=3e-4,random=1e-3"`` names them one by one.

    Raises:
        SubcloneError: a value that is not a number, or a name that is not a candidate.
    """
    if text is None:
        return {}
    if "=" not in text:
        return dict.fromkeys(names, _number(text, flag))
    values = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name.strip() not in names:
            raise SubcloneError(f"{flag}: {name.strip()!r} is not a candidate; candidates: {', '.join(names)}")
        values[name.strip()] = _number(value, flag)
    return values


def _number(text: str, flag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SubcloneError(f"{flag}: {text!r} is not a number (e.g. 1e-3, or NAME=1e-3,NAME=3e-4)") from None
    require_finite(flag, value, minimum=0)
    return value


def hparam_overrides(args: argparse.Namespace, names: list[str]) -> dict[str, dict[str, float]]:
    """The --lr / --wd overrides per candidate name (CandidateSettings' lr and weight_decay)."""
    return {"lr": parse_per_candidate(args.lr, "--lr", names),
            "weight_decay": parse_per_candidate(args.wd, "--wd", names)}


class TrainingProgress:
    """A tqdm bar on stderr fed by the engine's events: one tick per candidate step, the last validation
    value of each (the task's metric, which the start event names) shown."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, desc="training", unit="step", file=sys.stderr, disable=not enabled,
                        dynamic_ncols=True, mininterval=0.5)
        self.last: dict[str, str] = {}
        self.metric = "loss"

    def __call__(self, event: Event) -> None:
        if isinstance(event, StartEvent):
            self.metric = event.metric
        elif isinstance(event, StepEvent):
            self.bar.update(1)
        elif isinstance(event, EvalEvent):
            value = event.value(self.metric)
            self.last[event.candidate] = f"{value:.3f}" if value is not None else "?"
            self.bar.set_postfix_str(" ".join(f"{n} {v}" for n, v in self.last.items()), refresh=False)
        elif isinstance(event, ErrorEvent) and not self.bar.disable:
            tqdm.write(f"{event.candidate or 'run'}: {event.message}", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def train_and_report(candidates: list[Candidate], train: Any, val: Any, config: TrainConfig, *,
                     args: argparse.Namespace, out: Path | None, preprocessor: Any,
                     manifests: dict[str, Manifest], context: dict[str, Any]) -> int:
    """Train every candidate on the same data order, then print (main process only) the result table.

    Args:
        candidates: named models with their hyperparameters (several runs of one candidate when it is
            swept over learning rates: only its chosen run is reported in the main table and saved).
        train, val: the data (see load_data); config: the engine's settings.
        args: the parsed flags (target, json, quiet).
        out: the run folder, or None to save nothing.
        preprocessor: the tokenizer or image processor saved with each model.
        manifests: name -> the subclone.json record of that candidate (training info is added).
        context: what the summary says about the run besides the results (command, parent, shape...).
    """
    start = time.perf_counter()
    progress = TrainingProgress(config.steps * len(candidates), enabled=not args.quiet and is_main_process())
    callbacks = [progress, *_trackers(args, out)]
    task = task_spec(context["task"])
    try:
        results = train_candidates(
            candidates, train, val, config, callbacks=callbacks,
            metrics_path=out / METRICS_FILE if out else None, save_dir=out, preprocessor=preprocessor,
            manifest_for=manifests.get, overwrite=args.overwrite,
            save_plan=save_plan(task.metric, higher_is_better=task.higher_is_better))
    finally:
        for callback in callbacks:
            callback.close()
    final = Path(args.out) if out is not None else None  # out may be the staged folder (prepare_output)
    summary = build_summary(results, config, args.target, context, final, time.perf_counter() - start)
    if not is_main_process():
        return 0
    if out is not None:
        relocate_paths(out / METRICS_FILE, out, final)
        (out / SUMMARY_FILE).write_text(json.dumps(json_safe(summary), indent=1, allow_nan=False))
        fault_point("run.after-summary")
    if args.json:
        print_json(summary)
    else:
        print(format_report(summary))
    return 0


def _trackers(args: argparse.Namespace, out: Path | None) -> list[TrackerCallback]:
    """The --report-to trackers, on the main process only (the engine calls callbacks only there)."""
    names = parse_report_to(args.report_to, out)
    if not names or not is_main_process():
        return []
    # named after the run folder the user gave (out may be its staged twin until the end)
    project = Path(args.out).name if args.out is not None else "subclone"
    return [TrackerCallback(names, out, project=project, baseline=BASELINE)]


def build_summary(results: dict[str, RunResult], config: TrainConfig, target: float | None,
                  context: dict[str, Any], out: Path | None, seconds: float) -> dict[str, Any]:
    """The JSON summary of a run: settings, the target, one row per candidate and the iso-loss speedups.

    A candidate trained at several learning rates is represented by its chosen run (training.sweep) in the
    rows and the iso-loss speedups; "sweep" lists every run of every candidate (None without a sweep).
    """
    task = task_spec(context["task"])
    runs = runs_from_results(results, task.metric, higher_is_better=task.higher_is_better)
    chosen = choose_runs(runs, higher_is_better=task.higher_is_better)
    picked = chosen_results(results, chosen)
    rows = speedup_table(picked, baseline=BASELINE, target=target)
    for row in rows:
        result = picked[row["name"]]
        row.update(run=result.name, strategy=result.strategy, lr=result.lr, weight_decay=result.weight_decay,
                   message=result.message, steps_done=result.steps_done, seen=result.seen,
                   saved_to=str(out / Path(result.saved_to).name) if result.saved_to and out else None)
    metric = rows[0]["metric"] if rows else "loss"
    tracks = {name: result_track(result, metric) for name, result in picked.items()}
    return {
        **context,
        "metric": metric,
        "target": rows[0]["target"] if rows else None,
        "target_from": "--target" if target is not None else ("random init's best" if BASELINE in picked else None),
        "config": config.to_dict(),
        "rows": rows,
        # the speedup at every level random init reached, and at 25/50/75/100% of its improvement
        "iso_loss": iso_loss_summary(tracks, higher_is_better=HIGHER_IS_BETTER[metric], baseline=BASELINE),
        "sweep": sweep_report(runs, chosen) if any(is_swept(r.run) for r in runs) else None,
        "out": str(out) if out else None,
        "metrics_file": str(out / METRICS_FILE) if out else None,
        "seconds": round(seconds, 1),
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    """Plain-text columns, left-aligned, with a rule under the header."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *body)]
    table = ["  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header, *body]]
    table.insert(1, "  ".join("-" * w for w in widths))
    return table


def _sweep_lines(summary: dict[str, Any]) -> list[str]:
    """The learning-rate sweep: every run of every candidate, the chosen ones starred, then edge notes."""
    sweep, metric = summary.get("sweep"), summary["metric"]
    if not sweep:
        return []
    direction = "highest" if task_spec(summary["task"]).higher_is_better else "lowest"
    body = [[c["candidate"], lr_text(r["lr"]) + (" *" if r["chosen"] else ""), _fmt(r["best"]), _fmt(r["final"]),
             r["status"]] for c in sweep for r in c["runs"]]
    title = f"learning-rate sweep: * = each candidate's chosen run ({direction} best {metric}), used above"
    notes = [f"note: {c['note']}" for c in sweep if c["note"]]
    return [title, *_table(["candidate", "lr", f"best {metric}", f"final {metric}", "status"], body), *notes]


def format_report(summary: dict[str, Any]) -> str:
    """The result table, any learning-rate sweep, the iso-loss table in plain text, then the target and any
    stopped candidate."""
    metric, rows = summary["metric"], summary["rows"]
    header = ["candidate", "lr", f"step-0 {metric}", f"final {metric}", f"best {metric}", "steps to target",
              "speedup", task_spec(summary["task"]).unit]
    body = [[r["name"], lr_text(r["lr"]), _fmt(r["start"]), _fmt(r["final"]), _fmt(r["best"]),
             r["steps_to_target_text"], r["speedup_text"], f"{r['throughput']:.0f}"] for r in rows]
    lines = [_headline(summary), *_table(header, body), *_sweep_lines(summary)]
    lines += format_iso_loss({name: v["drop"] for name, v in summary.get("iso_loss", {}).items()}, metric=metric)
    lines.append(_target_line(summary))
    lines += [f"{r['name']}: {r['status']}: {r['message']}" for r in rows if r["status"] != "done"]
    if summary["out"]:
        lines.append(f"metrics: {summary['metrics_file']}; models: {summary['out']}/<candidate>")
    return "\n".join(lines)


def _headline(summary: dict[str, Any]) -> str:
    """E.g. "SmolLM2... -> 6 blocks x 192, 3 heads / 1 KV, FFN 512; 200 steps of 8 x 128 tokens"."""
    shape, config = summary["shape"], summary["config"]
    task = task_spec(summary["task"])
    per_step = f"{config['batch_size']} x {summary['seq_len']} {task.unit_name}" if task.sequences \
        else f"{config['batch_size']} {task.unit_name}"
    accum = f" x {config['grad_accum']} micro-batches" if config["grad_accum"] > 1 else ""
    return (f"{summary['label']}: {shape['layers']} blocks x {shape['hidden']}, {shape['heads']} heads / "
            f"{shape['kv_heads']} KV, FFN {shape['ffn']}; {config['steps']} steps of {per_step}{accum}, "
            f"data {summary['data']}")


def _target_line(summary: dict[str, Any]) -> str:
    target, metric = summary["target"], summary["metric"]
    if target is None:
        return "no target: train a random-init baseline (--baseline random / --strategies ...,random) or give --target"
    return f"target: {metric} {target:.3f} ({summary['target_from']}); speedup = random init's steps / candidate's"
