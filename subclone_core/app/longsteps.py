"""The app's steps that can take more than a second, as work for a BackgroundJob, and their estimates.

Each builder returns ``work(emit, cancel)``: it reports ``progress`` events (done, total, stage) that the
page turns into a progress bar, stops at the next progress report once Cancel is pressed (JobCancelled),
and returns the step's result. Results depend only on ids and settings (``result_key``), so the page can
keep them for every session of the server. No Streamlit here.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from subclone_core.analysis.explore import EVAL_TOKENS, REFIT_TOKENS, candidate_shapes, explore_shapes
from subclone_core.analysis.inspector import Unit, inspect_units
from subclone_core.analysis.probes import (
    ablate_parent,
    evaluate_shared,
    exclusive,
    generate_text,
    validation_sample,
)
from subclone_core.app.jobs import BlockEvent, Emit, JobCancelled, ProgressEvent, Work, cancellable
from subclone_core.app.sizing import matrix_weights
from subclone_core.app.steps import make_children
from subclone_core.core.archs import arch_of_model
from subclone_core.core.calibration import Importance, Progress
from subclone_core.core.errors import SubcloneError
from subclone_core.core.shape import Shape
from subclone_core.core.strategies import refit_table
from subclone_core.sources import Parent, default_data_id, vit_pretrain
from subclone_core.tasks import task_spec
from subclone_core.training.evaluate import evaluate
from subclone_core.workflow.children import (
    measure_importance,
    refit_dtype_for,
    refit_pass,
    shared_refit_source,
)
from subclone_core.workflow.jobs import CandidateSettings
from subclone_core.workflow.plan import Plan

STEP0_TOKENS = 2048  # the Parent page's default validation budget: the parent's score is reused
SAMPLE_TOKENS = 30  # new tokens of each step-0 sample
# Each step's seconds over a validation pass of the parent on as many tokens (forward_rate), measured with the
# app's defaults on both embedded parents on 2 idle cores (bench_app): calibration 1.05 (SmolLM2-135M) and 0.83
# (Gemma 3 270M, whose validation pays a loss over a 262k-token vocabulary that calibration does not), the
# inspector 1.05 and 0.82, each evaluation without one block (128 tokens) 0.97 and 1.09 (blocks replayed)
CALIB_OVERHEAD = 0.95
INSPECT_OVERHEAD = 0.93
ABLATION_REPLAYED = 1.03
# The explorer's refit seconds and Generate's over a pass of the parent's blocks alone (blocks_rate: the refit runs
# no output layer) on the refit's tokens, all with float32 refits. The explorer's (explorer_refit_cost; its scores come
# on top, as validation passes of models of their sizes): from one shared pass of Gram matrices, per parent depth of
# each width's deepest shape, measured on 2 Zen 4 cores at 7.0 on Gemma 3 270M (8 shapes at its starting budget),
# 5.9 in a faster hour, at most 5.9 on 2 Zen 2 cores; refit on each child's own inputs, one pass of the parent (a
# recorded one: 1.0) and per parent depth of each narrowed shape 3.5, measured on 2 Intel Xeon cores (AVX-512, no
# bfloat16) on SmolLM2-135M's 4 narrowed shapes (3.46-3.58). Generate's refit alone (its scores and samples come on
# top, as for the explorer): 2.58 on SmolLM2-135M (the child's inputs) and 2.06 on Gemma 3 270M (the parent's) on
# 2 Zen 2 cores before the child's batches ran at once; 2.46-2.64 and 2.77-3.32 on the Xeon after.
EXPLORE_REFIT = 6.3
EXPLORE_CHILD = 3.5
GENERATE_REFIT = 2.6
# A sampled token of Generate's samples costs about this many positions of the model's validation pass (one position
# at a time through every weight: 36 for SmolLM2-135M's starting child, 20 for Gemma 3 270M's, on 2 Zen 2 cores)
SAMPLE_POSITIONS = 25
# Where the refit's blocks run in bfloat16 on a CPU that multiplies it (children.refit_dtype_for), the share of
# those float32 seconds a float32 parent's step takes, by whose inputs its family refits on, measured in turns on
# 2 Zen 4 cores: the child's, whose stream the refit runs block after block (SmolLM2-135M: Generate 23.0 s against
# 34.9, the explorer 26.4 against 38.0), and the parent's (Gemma 3 270M: Generate 39.9 against 47.4; the scores
# over its 262k-token vocabulary stay float32). One pass shared by the explorer's shapes, Gram sums and solves,
# took as long in either (37.9 s).
BFLOAT16_SHARE = {"child": 0.67, "parent": 0.84}


def data_key(data_id: str | None) -> tuple[str, int]:
    """The data id and, for a local file or folder, its modification time (a changed file is new data)."""
    if data_id and os.path.exists(data_id):
        return data_id, os.stat(data_id).st_mtime_ns
    return data_id or "default", 0


def result_key(kind: str, parent_id: str, data_id: str | None, *settings: Any) -> tuple:
    """The key a step's result is kept under: ids and settings, never model objects."""
    return (kind, parent_id, data_key(data_id), *settings)


def ticking(batches: Iterable[dict], progress: Progress | None, total: int) -> Iterator[dict]:
    """The batches, reporting (batches done, total) after each one is consumed."""
    for done, batch in enumerate(batches, start=1):
        yield batch
        if progress:
            progress(done, total)


def evaluate_parent(parent: Parent, data_id: str | None, tokens: int,
                    progress: Progress | None = None) -> dict:
    """The parent's validation metrics on about ``tokens`` tokens, plus the seconds the forward passes took
    (the estimates of the longer steps are scaled from it), timed after one example has run through once."""
    batches = validation_sample(parent, data_id, tokens)
    if batches:  # the first forward after loading pays the weights' first touch (SmolLM2-135M's ran 25% slower)
        evaluate_shared(parent.model, [{key: value[:1] for key, value in batches[0].items()}])
    return timed_metrics(parent, lambda: evaluate_shared(parent.model, ticking(batches, progress, len(batches))))


def timed_metrics(parent: Parent, score: Callable[[], dict]) -> dict:
    """``score()``'s validation metrics plus the seconds it took and the tokens (or images) a second it ran."""
    start = time.perf_counter()
    metrics = score()
    seconds = time.perf_counter() - start
    units = metrics[task_spec(parent.task).unit_name]  # tokens, or images
    return {**metrics, "seconds": seconds, "forward_rate": units / seconds if seconds > 0 else None}


def forward_rate(metrics: dict | None) -> float | None:
    """Tokens (or images) per second of the parent's forward pass, from ``evaluate_parent``'s result."""
    return metrics["forward_rate"] if metrics else None


def estimate_seconds(kind: str, tokens: int, rate: float | None, blocks: int = 0) -> float | None:
    """Seconds a step should take, scaled from the parent's measured forward rate (None: not measured yet).

    Args:
        kind: "validation", "calibration", "inspector", "ablation" (one evaluation per block plus the intact
            parent), "explore" (the explorer's refits after calibration) or "generate" (the refit of Generate's
            child after calibration).
        tokens: the step's token budget (for ablation: per evaluation; for explore: the refit tokens times
            explorer_refit_cost; for generate: the refit's).
        rate: ``forward_rate`` of the parent; for explore and generate its ``blocks_rate``.
        blocks: the parent's blocks (ablation only).
    """
    if not rate:
        return None
    # ablation: one evaluation per block plus the intact one, the blocks before the removed one replayed
    factor = {"validation": 1.0, "calibration": CALIB_OVERHEAD, "inspector": INSPECT_OVERHEAD,
              "ablation": 1 + ABLATION_REPLAYED * blocks, "explore": 1.0,
              "generate": GENERATE_REFIT}[kind]
    return factor * tokens / rate


def blocks_rate(model: nn.Module, rate: float | None) -> float | None:
    """Positions per second through the parent's blocks alone: ``forward_rate`` without the output layer's share
    of the products (a quarter of SmolLM2-135M's, two thirds of Gemma 3 270M's with its 262k-token vocabulary)."""
    head = model.get_output_embeddings()
    total = matrix_weights(model)
    head_weights = head.weight.numel() if isinstance(head, nn.Linear) else 0
    return rate * total / max(1, total - head_weights) if rate else None


def explorer_seconds(parent: Parent, metrics: dict | None, budget: int, calib_tokens: int,
                     calibrated: bool) -> float | None:
    """Seconds the explorer should take at this budget (the refit of its candidate shapes on REFIT_TOKENS, each
    shape and the random reference scored on EVAL_TOKENS), the calibration first where none is known; None
    before the parent's validation speed is measured."""
    rate = forward_rate(metrics)
    candidates = candidate_shapes(parent.model, budget)
    tokens = min(calib_tokens, REFIT_TOKENS)
    passes = refit_pass(parent, tokens)
    cost = explorer_refit_cost(parent.model, [shape for shape, _ in candidates], passes)
    seconds = estimate_seconds("explore", cost * tokens, blocks_rate(parent.model, rate))
    if seconds is None:
        return None
    if passes != "shared":  # a shared pass took as long in bfloat16
        inputs = refit_table(arch_of_model(parent.model), "subclone").refit_inputs
        seconds *= bfloat16_share(parent.dtype, refit_dtype_for(parent), inputs)
    # a score costs a validation pass of a model that size: the candidates and the random one (the smallest)
    sizes = [params for _, params in candidates]
    parent_size = sum(p.numel() for p in parent.model.parameters())
    seconds += estimate_seconds("validation", EVAL_TOKENS * (sum(sizes) + min(sizes)) / parent_size, rate)
    return seconds if calibrated else seconds + estimate_seconds("calibration", calib_tokens, rate)


def bfloat16_share(dtype: torch.dtype, refit_dtype: torch.dtype, refit_inputs: str | None) -> float:
    """The share of its float32 seconds a float32 parent's refit takes with its blocks in ``refit_dtype``
    (BFLOAT16_SHARE by whose inputs it refits on); 1 for any other pair of dtypes."""
    native = (dtype, refit_dtype) == (torch.float32, torch.bfloat16)
    return BFLOAT16_SHARE.get(refit_inputs, 1.0) if native else 1.0


def explorer_refit_cost(model: nn.Module, shapes: Sequence[Shape], passes: str) -> float:
    """The explorer's refits in passes of the parent's blocks over the refit's tokens, by how its shapes share the
    parent's pass (workflow.children.REFIT_PASSES). A shape as wide as the parent drops blocks only (no refit).
    From one shared pass of Gram matrices the shapes of one width share the refit of the blocks they all keep, so
    each width costs its deepest shape's blocks, EXPLORE_REFIT a parent depth; a refit on the child's inputs costs
    a pass of the parent (one in all where it is recorded, else one a shape) and EXPLORE_CHILD a parent depth of
    each shape."""
    parent = Shape.of(model.config)
    depths: dict[tuple, list[int]] = {}
    for shape in shapes:
        width = (shape.hidden, shape.heads, shape.ffn)
        if width != (parent.hidden, parent.heads, parent.ffn):
            depths.setdefault(width, []).append(shape.layers)
    if passes == "shared":
        return EXPLORE_REFIT * sum(max(d) for d in depths.values()) / parent.layers
    narrowed = [depth for widths in depths.values() for depth in widths]
    parent_passes = min(1, len(narrowed)) if passes == "recorded" else len(narrowed)
    return parent_passes + EXPLORE_CHILD * sum(narrowed) / parent.layers


def generate_seconds(parent: Parent, metrics: dict | None, plan: Plan, child_params: int,
                     calibrated: bool) -> float | None:
    """Seconds Generate should take for a refit child of ``child_params`` parameters (without a refit it takes a
    few seconds and no estimate is given): the refit, scores of the child and its twin on STEP0_TOKENS (the
    parent's score is the Parent page's), their samples, and the calibration first where none is known."""
    rate = forward_rate(metrics)
    seconds = estimate_seconds("generate", plan.calib_tokens, blocks_rate(parent.model, rate)) if plan.refit else None
    if seconds is None:
        return None
    seconds *= bfloat16_share(parent.dtype, plan.refit_torch_dtype, plan.refit_inputs)
    share = child_params / sum(p.numel() for p in parent.model.parameters())  # a model that size runs this much
    seconds += estimate_seconds("validation", share * (2 * STEP0_TOKENS + 2 * SAMPLE_POSITIONS * SAMPLE_TOKENS), rate)
    if calibrated or not plan.calibrate:
        return seconds
    return seconds + estimate_seconds("calibration", plan.calib_tokens, rate)


def calibration_work(parent: Parent, data_id: str | None, tokens: int) -> Work:
    """Calibrate the shared parent (under its lock) on ``tokens`` positions; returns the Importance."""

    def work(emit: Emit, cancel: threading.Event) -> Importance:
        with exclusive(parent.model):
            return measure_importance(parent, data_id, tokens=tokens, progress=cancellable(cancel, emit))

    return work


def ablation_work(parent: Parent, data_id: str | None, tokens: int) -> Work:
    """The parent's loss with each block removed; each block's loss is emitted as a ``block`` event as soon
    as it is known, so the page fills the bars in while the rest run."""

    def work(emit: Emit, cancel: threading.Event) -> dict:
        progress = cancellable(cancel, emit)

        def on_block(index: int, metrics: dict) -> None:
            emit(BlockEvent(index=index, loss=metrics["loss"]))

        return ablate_parent(parent, data_id, tokens, progress=progress, on_block=on_block)

    return work


def explorer_work(parent: Parent, importance: Importance | None, data_id: str | None, calib_tokens: int,
                  budget: int) -> Work:
    """Calibrate when needed, then subclone and score every shape near the budget; (importance, exploration)."""

    def work(emit: Emit, cancel: threading.Event) -> tuple[Importance, Any]:
        measured = importance
        if measured is None:
            measured = calibration_work(parent, data_id, calib_tokens)(staged(emit, "calibrating"), cancel)
        batches = validation_sample(parent, data_id, EVAL_TOKENS)
        progress = cancellable(cancel, staged(emit, "subcloning and scoring shapes"))
        # each shape refit on fewer tokens than Generate's (the same ranking, measured: explore.REFIT_TOKENS)
        refit, _ = shared_refit_source(parent, data_id or default_data_id(parent.task),
                                       min(calib_tokens, REFIT_TOKENS))
        with exclusive(parent.model):  # the refit runs the shared parent on calibration batches
            return measured, explore_shapes(parent.model, measured, budget, batches, progress=progress,
                                            refit_items=refit)

    return work


def inspector_work(parent: Parent, units: Sequence[Unit], data_id: str | None, tokens: int) -> Work:
    """The strongest activations of each unit over the calibration sample."""

    def work(emit: Emit, cancel: threading.Event) -> dict:
        return inspect_units(parent, units, data_id, tokens=tokens, progress=cancellable(cancel, emit))

    return work


VIT_BUILD_MINUTES = (9, 14)  # pretrain-vit on 2 CPU cores: idle, and with other work on the machine


def vit_build_work() -> Work:
    """Pretrain the self-pretrained ViT parent into the cache (minutes); Cancel stops it and saves nothing.

    Returns the cache folder.
    """

    def work(emit: Emit, cancel: threading.Event) -> Any:
        def progress(event: dict) -> None:
            if "loss" in event:  # the training steps; the final accuracy event needs no bar
                emit(ProgressEvent(done=event["step"], total=event["steps"], time=time.time()))

        try:
            return vit_pretrain.pretrain_vit(progress=progress, cancel=cancel)
        except SubcloneError:
            if cancel.is_set():
                raise JobCancelled from None
            raise

    return work


def staged(emit: Emit, stage: str) -> Emit:
    """An emit that labels progress events with the stage they belong to."""
    return lambda event: emit(replace(event, stage=stage) if isinstance(event, ProgressEvent) else event)


def child_work(parent: Parent, target: Shape, settings: CandidateSettings, importance: Importance | None,
               parent_metrics: dict | None, prompt: str, parent_text: str | None) -> Work:
    """Make the child and its random twin, score all three before training and sample text from them.

    The parent's score (the Parent page's, on the same tokens) and its continuation of the prompt are
    reused when given.
    Returns {"child", "twin", "importance", "step0", "samples"}.
    """

    def work(emit: Emit, cancel: threading.Event) -> dict:
        progress = cancellable(cancel, staged(emit, "calibrating the parent"))
        refit = cancellable(cancel, staged(emit, "refitting the child block by block"))
        child, twin = make_children(parent, target, settings, importance=importance, progress=progress,
                                    refit_progress=refit)
        batches = validation_sample(parent, settings.data_id, STEP0_TOKENS)
        tick = cancellable(cancel, staged(emit, "scoring the child, its twin and the parent"))
        # the child's speed, timed here, sizes the Train page's first run (app.sizing)
        scored = ticking(batches, tick, len(batches))
        step0 = {"subclone": timed_metrics(parent, lambda: evaluate(child.model, scored)),
                 "random": evaluate(twin.model, batches)}
        step0["parent"] = parent_metrics or evaluate_shared(parent.model, batches)
        samples = {}
        if parent.task_spec.sequences:
            models = {"subclone": child.model, "random": twin.model}
            samples = sample_texts(parent, models, prompt, parent_text,
                                   cancellable(cancel, staged(emit, "sampling text")))
        return {"child": child, "twin": twin, "importance": child.importance or importance,
                "step0": step0, "samples": samples}

    return work


def sample_texts(parent: Parent, models: dict, prompt: str, parent_text: str | None,
                 progress: Progress) -> dict[str, str]:
    """Each model's greedy continuation of the prompt (the parent's reused when known)."""
    texts = {"parent": parent_text}
    if parent_text is None:
        texts["parent"] = generate_text(parent.model, parent.preprocessor, prompt, SAMPLE_TOKENS)
    for done, (name, model) in enumerate(models.items(), start=1):
        texts[name] = generate_text(model, parent.preprocessor, prompt, SAMPLE_TOKENS)
        progress(done, len(models))
    return {"prompt": prompt, **texts}

