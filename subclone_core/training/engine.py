"""The training engine: several candidates, one data order, interleaved step by step.

Every candidate gets its own iterator over the training data built from the same seed, and its own
torch RNG stream (dropout) seeded the same way, so interleaving changes nothing: a candidate trains
exactly as it would alone, and a live chart shows all curves growing together. The same code runs on
CPU, on one GPU (bf16 autocast), and under ``torchrun`` either data-parallel (DDP through HF accelerate)
or sharded (``fsdp``: FSDP2, see subclone_core.training.parallel).
"""

from __future__ import annotations

import copy
import logging
import math
import threading
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from time import perf_counter
from typing import Any

import torch
from accelerate import Accelerator

from subclone_core.core.calibration import no_cache_kwargs
from subclone_core.core.errors import SubcloneError
from subclone_core.core.manifest import Manifest, TrainingInfo, json_safe
from subclone_core.io.devices import resolve_device
from subclone_core.io.model_card import model_card
from subclone_core.io.saving import check_output_dir, save_model_folder
from subclone_core.tasks import TaskSpec, perplexity, task_of_model
from subclone_core.training import batches as B
from subclone_core.training.config import Candidate, TrainConfig
from subclone_core.training.distill import distillation_loss
from subclone_core.training.evaluate import evaluate
from subclone_core.training.events import (
    CancelledEvent,
    CandidatePlan,
    DoneEvent,
    ErrorEvent,
    EvalEvent,
    StartEvent,
    StepEvent,
)
from subclone_core.training.interrupt import Interrupted, interruptible
from subclone_core.training.metrics_log import MetricsLog
from subclone_core.training.parallel import DataParallel, Sharded, clip_gradients, make_parallel
from subclone_core.training.results import EvalPoint, RunResult, SavePlan
from subclone_core.training.schedule import make_scheduler
from subclone_core.training.support import Callback, Emitter, RngSlot

logger = logging.getLogger(__name__)

@dataclass
class _Context:
    """Run-wide state shared by every candidate."""

    accelerator: Accelerator
    config: TrainConfig
    emit: Emitter
    val_batches: list[dict]  # this process's share of the fixed validation set
    idle_batches: list[dict]  # run unscored, so that a sharded forward finds every process (see parallel.py)
    bf16: bool
    task: TaskSpec
    parallel: DataParallel | Sharded

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def autocast(self):
        """bf16 autocast where enabled, else a no-op context (fp32)."""
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: norm gains and biases (1-D) are not pulled to zero (as HF Trainer, nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def _float32_weights(model: torch.nn.Module) -> torch.nn.Module:
    """The model with float32 parameters (in place): a child of a bf16 or fp16 parent trains with float32
    weights and optimizer state, and reaches bf16 speed through autocast where the device has it."""
    if any(p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters()):
        model.float()
    return model


class _Runner:
    """One candidate's model, optimizer, schedule, data stream and result."""

    def __init__(self, cand: Candidate, ctx: _Context, train_data: Any, teacher: Any) -> None:
        cfg = ctx.config
        lr, wd = cand.hparams()
        self.cand, self.ctx, self.teacher = cand, ctx, teacher
        self.plain_class = type(cand.model)  # what the trained model is gathered into (sharding renames it)
        self.model = ctx.parallel.wrap(_float32_weights(cand.model), cand.weights)
        self.extra = no_cache_kwargs(ctx.parallel.inner(self.model))
        self.teacher_extra = no_cache_kwargs(teacher) if teacher is not None else {}
        self.optimizer = torch.optim.AdamW(_param_groups(self.model, wd), lr=lr)
        self.scheduler = make_scheduler(
            self.optimizer, total=cfg.steps, warmup=cfg.warmup_steps(), min_ratio=cfg.min_lr_ratio
        )
        # Same seed for every candidate: identical batches in identical order.
        self.batches = B.training_batches(train_data, cfg.batch_size, cfg.seed)
        self.rng = RngSlot(cfg.seed, ctx.device)
        self.result = RunResult(cand.name, cand.strategy or cand.name, lr, wd, unit=ctx.task.unit,
                                metric=ctx.task.metric)
        self.model.train()  # children often arrive in eval mode; dropout (if any) belongs to training
        self.train_time = 0.0

    @property
    def active(self) -> bool:
        return self.result.status == "running"

    def train_step(self, step: int) -> None:
        """One optimizer step (grad_accum micro-batches); stops the candidate on a non-finite value."""
        start = perf_counter()
        with self.rng:
            stats = self._accumulate(step)
            if stats is None:
                return
            grad_norm = self._clip()
            if not math.isfinite(grad_norm):
                self.stop(step, f"non-finite gradient norm ({grad_norm}) at step {step}; lower the learning rate "
                          f"(was {self.result.lr:g})")
                return
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.train_time += perf_counter() - start
        self._record_step(step, stats, lr, grad_norm)

    def _accumulate(self, step: int) -> dict[str, float] | None:
        """Forward and backward over grad_accum micro-batches; the mean stats over them and all processes."""
        acc, cfg = self.ctx.accelerator, self.ctx.config
        totals: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            global_batch = B.next_batch(self.batches, cfg.batch_size)
            self.result.seen += self.ctx.task.count_units(global_batch)
            batch = B.to_device(B.shard(global_batch, acc.process_index, acc.num_processes), self.ctx.device)
            # Gradients are all-reduced only on the last micro-batch of the step.
            sync = micro == cfg.grad_accum - 1
            with nullcontext() if sync else self.ctx.parallel.no_sync(self.model):
                with self.ctx.autocast():
                    loss, parts = self._loss(batch)
                keys = list(parts)
                means = acc.reduce(torch.stack([parts[k] for k in keys]).float(), reduction="mean")
                if not bool(torch.isfinite(means).all()):
                    self.stop(step, f"non-finite training loss ({means[0].item()}) at step {step}; lower the "
                              f"learning rate (was {self.result.lr:g}) or check the model's weights")
                    return None
                acc.backward(loss / cfg.grad_accum)
            for key, value in zip(keys, means.tolist()):
                totals[key] = totals.get(key, 0.0) + value / cfg.grad_accum
        return totals

    def _loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss and its detached parts ("loss" first; "ce", "kl" when distilling)."""
        out = self.model(**batch, **self.extra)
        if self.teacher is None:
            return out.loss, {"loss": out.loss.detach()}
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs, **self.teacher_extra).logits
        loss, kl = distillation_loss(
            out.loss, out.logits, teacher_logits, batch.get("labels"),
            alpha=self.cand.distill_alpha, temperature=self.cand.distill_temperature,
        )
        return loss, {"loss": loss.detach(), "ce": out.loss.detach(), "kl": kl.detach()}

    def _clip(self) -> float:
        """Clip the gradients (already reduced over the processes); returns the norm before clipping."""
        max_norm = self.ctx.config.max_grad_norm or float("inf")
        return clip_gradients(list(self.model.parameters()), max_norm)

    def _record_step(self, step: int, stats: dict[str, float], lr: float, grad_norm: float) -> None:
        self.result.steps_done = step
        self.result.train_loss.append((step, stats["loss"]))
        self.result.throughput = self.result.seen / max(self.train_time, 1e-9)
        if step % self.ctx.config.log_every == 0 or step == self.ctx.config.steps:
            self.ctx.emit(StepEvent(
                candidate=self.cand.name, step=step, lr=lr, grad_norm=grad_norm, seen=self.result.seen,
                throughput=round(self.result.throughput, 2), unit=self.ctx.task.unit, **stats,
            ))

    def evaluate(self, step: int) -> None:
        """Validate on the fixed set (this process's share, summed over processes) and emit an event."""
        sums = torch.zeros(3, dtype=torch.float64, device=self.ctx.device)  # loss_sum, count, correct
        model = self.ctx.parallel.inner(self.model)
        if self.ctx.idle_batches:
            with self.ctx.autocast():
                evaluate(model, self.ctx.idle_batches)
        if self.ctx.val_batches:  # with more processes than batches a process may hold none
            with self.ctx.autocast():
                stats = evaluate(model, self.ctx.val_batches)
            count = stats[self.ctx.task.unit_name]
            sums += torch.tensor([stats["loss"] * count, count, self.ctx.task.correct(stats)],
                                 dtype=torch.float64, device=self.ctx.device)
        loss_sum, count, correct = self.ctx.accelerator.reduce(sums, reduction="sum").tolist()
        loss = loss_sum / max(count, 1.0)
        point = EvalPoint(step=step, seen=self.result.seen, loss=loss)
        if self.ctx.task.higher_is_better:
            point.accuracy = correct / max(count, 1.0)
        else:
            point.perplexity = perplexity(loss)
        self.result.evals.append(point)
        self.ctx.emit(EvalEvent.of(self.cand.name, point))

    def release_optimizer(self) -> None:
        """Free the gradients and the optimizer state: the candidate never steps again."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer = None

    def stop(self, step: int, message: str) -> None:
        """Stop this candidate for good (the others go on) and say why."""
        self.result.status, self.result.message = "stopped", message
        self.release_optimizer()
        logger.warning("%s: %s", self.cand.name, message)
        self.ctx.emit(ErrorEvent(candidate=self.cand.name, step=step, message=message))


def _make_accelerator(config: TrainConfig) -> Accelerator:
    """An Accelerator for the requested device; under torchrun it joins the process group (gloo on CPU)."""
    cpu = resolve_device(config.device).type == "cpu"
    try:
        # Mixed precision stays off in accelerate (we autocast ourselves): its setting is process-wide
        # and would make a second run in the same process with another setting fail.
        return Accelerator(cpu=cpu, mixed_precision="no")
    except ValueError as err:
        raise SubcloneError(f"cannot train on {config.device!r} in this process after a run on another "
                            f"device; restart the process ({err})") from err


def _validation_batches(val_data: Any, config: TrainConfig) -> list[dict]:
    """The fixed validation batches: the first eval_batches, unshuffled."""
    size = config.eval_batch_size or config.batch_size
    found = []
    for batch in val_data.batches(size, shuffle=False, seed=0, epochs=1):
        found.append(batch)
        if len(found) == config.eval_batches:
            break
    if not found:
        raise SubcloneError("the validation data gave no batches; is the validation split empty?")
    return found


def _teacher_on(teacher: Any, device: torch.device, cache: dict[int, Any]) -> Any:
    """The teacher ready for inference on ``device``, without touching the caller's model.

    The parent is often shared (the app caches one per parent id), so it is copied when it would have to
    move or change mode; one copy serves every candidate that names the same teacher.
    """
    key = id(teacher)
    if key not in cache:
        if next(teacher.parameters()).device != device or teacher.training:
            teacher = copy.deepcopy(teacher).to(device).eval()
        cache[key] = teacher
    return cache[key]


def _check_candidates(candidates: Sequence[Candidate]) -> None:
    if not candidates:
        raise SubcloneError("no candidates to train")
    names = [c.name for c in candidates]
    for cand in candidates:
        cand.validate()
        if names.count(cand.name) > 1:
            raise SubcloneError(f"candidate name {cand.name!r} is used twice; names must be unique")
    if len({id(c.model) for c in candidates}) < len(candidates):
        raise SubcloneError("two candidates share one model object; give each its own copy")


def _check_folders(candidates: Sequence[Candidate], save_dir: str | Path | None, plan: SavePlan,
                   overwrite: bool) -> None:
    """Refuse, before any training, a save folder that exists (unless overwrite) for any run the plan may save."""
    if save_dir is None:
        return
    for folder in dict.fromkeys(plan.folder(c.name) for c in candidates):
        check_output_dir(Path(save_dir) / folder, overwrite=overwrite)


def _checked_plan(candidates: Sequence[Candidate], save_dir: str | Path | None, plan: SavePlan,
                  overwrite: bool) -> SavePlan:
    """The save plan, once the candidates and every folder it may write are checked (before any training)."""
    _check_candidates(candidates)
    _check_folders(candidates, save_dir, plan, overwrite)
    return plan


def _cancel_requested(cancel: threading.Event | None, acc: Accelerator) -> bool:
    """Whether to stop; under several processes the main process decides for all (no rank hangs)."""
    flag = bool(cancel is not None and cancel.is_set())
    if acc.num_processes == 1:
        return flag
    from accelerate.utils import broadcast

    return bool(broadcast(torch.tensor([float(flag)], device=acc.device), from_process=0).item())


def _loop(runners: list[_Runner], ctx: _Context, cancel: threading.Event | None) -> int | None:
    """Train round-robin, one step of each active candidate per round; the step cancelled at, or None.

    In one process a cancel also interrupts the step or validation under way (training.interrupt): one
    step of a large model on a few CPU cores can take half a minute, and a Stop must be felt at once. Under
    several processes it is read between rounds only, where every process stops at the same point.
    """
    try:
        with interruptible(cancel if ctx.accelerator.num_processes == 1 else None):
            return _rounds(runners, ctx, cancel)
    except Interrupted:  # the models keep their last finished step; the step under way is dropped
        return 1 + min((r.result.steps_done for r in runners if r.active), default=0)


def _rounds(runners: list[_Runner], ctx: _Context, cancel: threading.Event | None) -> int | None:
    """Step 0's validation, then the rounds; the step cancelled at (checked between rounds), or None."""
    eval_steps = set(ctx.config.eval_steps())
    for runner in runners:
        runner.evaluate(0)
    for step in range(1, ctx.config.steps + 1):
        if _cancel_requested(cancel, ctx.accelerator):
            return step
        active = [r for r in runners if r.active]
        if not active:
            break
        for runner in active:
            runner.train_step(step)
            if runner.active and step in eval_steps:
                runner.evaluate(step)
    return None


def _training_info(runner: _Runner, ctx: _Context) -> TrainingInfo:
    """What goes into the saved manifest's "training" entry."""
    result, cand = runner.result, runner.cand
    return TrainingInfo(**json_safe({
        "engine": "subclone_core.training",
        "strategy": result.strategy,
        "lr": result.lr,
        "weight_decay": result.weight_decay,
        "schedule": "linear warmup + cosine (AdamW)",
        "config": ctx.config.to_dict(),
        "steps_done": result.steps_done,
        "seen": result.seen,
        "unit": ctx.task.unit_name,
        "world_size": ctx.accelerator.num_processes,
        "parallel": ctx.parallel.name,
        "device": ctx.device.type,
        "bf16_autocast": ctx.bf16,
        "distill": {"alpha": cand.distill_alpha, "temperature": cand.distill_temperature}
        if cand.teacher is not None else None,
        "evals": [asdict(p) for p in result.evals],
    }))


def _save(runner: _Runner, ctx: _Context, folder: Path, preprocessor: Any, base: Manifest | None,
          overwrite: bool) -> Path:
    """Save one finished candidate as a complete model folder (written atomically by saving.py)."""
    manifest = replace(base or Manifest(), training=_training_info(runner, ctx))
    card = model_card(manifest, ctx.task.name) if manifest.is_child else None
    return Path(save_model_folder(runner.result.model, folder, preprocessor=preprocessor,
                                  manifest=manifest, model_card=card, overwrite=overwrite))


def _settle(runners: list[_Runner], ctx: _Context, cancelled_at: int | None) -> None:
    """Every candidate's final status and its model: unwrapped (gathered, when sharded, into the main
    process; None elsewhere), in eval mode. Every process calls this."""
    if cancelled_at is not None:
        message = f"cancelled before step {cancelled_at}; metrics so far are kept, no model was saved"
        ctx.emit(CancelledEvent(step=cancelled_at, message=message))
    for runner in runners:
        result = runner.result
        if result.status == "running":
            result.status = "done" if cancelled_at is None else "cancelled"
            result.message = None if cancelled_at is None else message
        runner.release_optimizer()  # before a sharded model is gathered: its full copy needs the room
        model = ctx.parallel.gather(runner.model, runner.plain_class)
        result.model = model.eval() if model is not None else None


def _finish(runners: list[_Runner], ctx: _Context, cancelled_at: int | None, save_dir: Path | None,
            preprocessor: Any, manifest_for: Callable[[str], Manifest | None] | None, overwrite: bool,
            plan: SavePlan) -> None:
    """Settle every candidate's status, save the finished ones the plan chooses (main process only) and
    emit "done"."""
    acc = ctx.accelerator
    _settle(runners, ctx, cancelled_at)
    chosen = set(plan.choose({r.result.name: r.result for r in runners})) if save_dir is not None else set()
    for runner in runners:
        result = runner.result
        if save_dir is not None and result.status == "done" and result.name in chosen:
            folder = save_dir / plan.folder(result.name)
            if acc.is_main_process:
                base = manifest_for(runner.cand.name) if manifest_for else None
                _save(runner, ctx, folder, preprocessor, base, overwrite)
            result.saved_to = folder
        acc.wait_for_everyone()  # other ranks return only once the folder exists
        ctx.emit(DoneEvent(candidate=result.name, step=result.steps_done, status=result.status,
                           message=result.message, final=result.evals[-1] if result.evals else None,
                           saved_to=str(result.saved_to) if result.saved_to else None))


def _context(acc: Accelerator, config: TrainConfig, emit: Emitter, val_data: Any, task: TaskSpec) -> _Context:
    """The run-wide state: this process's share of the validation set, autocast, the task, replicas or shards."""
    all_val = _validation_batches(val_data, config)
    # this process's share; with more processes than batches a process may hold none
    val_batches = all_val[acc.process_index :: acc.num_processes]
    bf16 = config.mixed_precision == "bf16" or (config.mixed_precision == "auto" and acc.device.type == "cuda")
    parallel = make_parallel(acc, config.fsdp)
    idle = parallel.idle_batches(all_val, len(val_batches))
    return _Context(acc, config, emit, val_batches, idle, bf16, task, parallel)


def _start(candidates: Sequence[Candidate], ctx: _Context, train_data: Any) -> list[_Runner]:
    """One runner per candidate (teachers shared), and the "start" event."""
    teachers: dict[int, Any] = {}
    runners = [_Runner(c, ctx, train_data,
                       None if c.teacher is None else _teacher_on(c.teacher, ctx.device, teachers))
               for c in candidates]
    ctx.emit(StartEvent(candidates=[CandidatePlan(r.result.name, r.result.strategy, r.result.lr,
                                                  r.result.weight_decay, r.teacher is not None) for r in runners],
                        config=ctx.config.to_dict(), world_size=ctx.accelerator.num_processes,
                        parallel=ctx.parallel.name, device=ctx.device.type, unit=ctx.task.unit,
                        metric=ctx.task.metric, higher_is_better=ctx.task.higher_is_better))
    return runners


def train_candidates(candidates: Sequence[Candidate], train_data: Any, val_data: Any, config: TrainConfig, *,
                     callbacks: Iterable[Callback] = (), metrics_path: str | Path | None = None,
                     cancel: threading.Event | None = None, save_dir: str | Path | None = None,
                     preprocessor: Any = None, manifest_for: Callable[[str], Manifest | None] | None = None,
                     overwrite: bool = False, save_plan: SavePlan | None = None) -> dict[str, RunResult]:
    """Train candidates of one child shape side by side on the identical data order and seed.

    One optimizer step of every running candidate per round (AdamW, linear warmup + cosine, gradient
    accumulation and clipping); validation at step 0, every ``eval_every`` steps and at the end, on the
    same fixed batches for all. A non-finite loss or gradient stops that candidate alone; cancellation (at
    the next module; between rounds under torchrun) keeps the metrics and saves no model. Under ``torchrun``
    every process runs this call on its slice of every batch; only the main process writes, calls callbacks
    and saves. With ``config.fsdp`` a candidate is sharded (FSDP2); only the main process's result holds it.

    Args:
        candidates: the models to train (trained in place), with unique names.
        train_data: an object with ``batches(batch_size, *, shuffle, seed, epochs)`` (TokenData, ImageData).
        val_data: the same protocol; its first ``eval_batches`` batches are the validation set.
        config: steps, batch size, schedule, evaluation, device.
        callbacks: called with every event (subclone_core.training.events names the kinds).
        metrics_path: a JSONL file the events are appended to, one flushed line each.
        cancel: set it (from another thread) to stop at the next module's forward or backward (see _loop).
        save_dir: when given, each finished candidate is saved to ``save_dir/<name>`` (complete or absent).
        preprocessor: tokenizer or image processor saved with each model.
        manifest_for: name -> the candidate's manifest (e.g. Child.manifest); "training" is added to it.
        overwrite: replace existing model folders under save_dir.
        save_plan: which finished candidates to save, under which names (e.g. a sweep's chosen runs).

    Returns:
        {name: RunResult} in the order of ``candidates``; SubcloneError for bad settings, names or data.
    """
    plan = _checked_plan(candidates, save_dir, save_plan or SavePlan(), overwrite)
    acc = _make_accelerator(config)
    config.validate(acc.num_processes)
    log = MetricsLog(metrics_path) if metrics_path is not None and acc.is_main_process else None
    emit = Emitter(callbacks, log, acc.is_main_process)
    try:
        ctx = _context(acc, config, emit, val_data, task_of_model(candidates[0].model))
        runners = _start(candidates, ctx, train_data)
        cancelled_at = _loop(runners, ctx, cancel)
        _finish(runners, ctx, cancelled_at, Path(save_dir) if save_dir is not None else None,
                preprocessor, manifest_for, overwrite, plan)
    except Exception as err:
        emit(ErrorEvent(message=f"{type(err).__name__}: {err}"))
        raise
    finally:
        if log is not None:
            log.close()
    return {r.result.name: r.result for r in runners}
