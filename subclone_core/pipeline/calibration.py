"""The two executors of calibration (and of block ablation), side by side: how the batches go through a
parent.

Both measure the same thing (core.calibration: the Recorder's hooks, their float64 Sums, the Importance they
make); they differ in how the parent is run (workflow.children.measure_importance chooses):

- ``calibrate``, in memory: every batch runs through the whole model, on the model's own devices and dtype
  (one device, several GPUs, or placed by accelerate with CPU or disk offload). The default: for a parent that
  its memory budget held, and for an offloaded one whose safetensors files cannot be read under the model's
  tensor names.
- ``calibrate_sequential``, block by block (pipeline.passes): the two loops are swapped, each block read once
  from the checkpoint's safetensors files (or taken from a parent in memory) and run on every batch's stored
  hidden states under the same hooks and float64 sums, the head's residual_read hook then reading the stream
  after the last block. Used for a parent loaded with a memory budget (--max-memory) that did not hold it, part
  of it offloaded to disk (workflow.children.needs_sequential), where accelerate's offload would read every
  offloaded weight once per batch; or when asked (--sequential). The result equals calibrate's on the same
  batches up to the order of float64 additions.

Block ablation (``ablate_sequential``) runs on the same pass with one stream of hidden states per model: the
intact parent and the parent without each block, each block read once and run on every stream that has
reached it; the head then scores each stream as training.evaluate would. Its in-memory counterpart is
analysis.probes.block_ablation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from subclone_core.core.archs import arch_of_model
from subclone_core.core.calibration import (
    TAYLOR_STATS,
    Importance,
    Progress,
    Recorder,
    Sums,
    input_device,
    no_cache_kwargs,
    real_token_mask,
    recording,
    taylor_channels,
)
from subclone_core.core.shape import Shape
from subclone_core.pipeline.passes import (
    Pass,
    activation_store,
    forward_block,
    head_on,
    loaded_block,
    model_inputs,
    open_pass,
)
from subclone_core.tasks import TaskSpec, task_of_model


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    *,
    max_tokens: int | None = None,
    progress: Progress | None = None,
    data: str = "",
    input_stats: bool = False,
    residual_cov: bool = False,
) -> Importance:
    """Measure importance on calibration batches, on the model's own devices and dtype.

    A model placed by accelerate (several GPUs, CPU offload, disk offload) is measured the same way: each hook
    reduces its values where they are computed and adds them into float64 sums on the CPU, so the same dtype
    on one device, split over devices, or offloaded gives the same kept indices.

    Args:
        model: the parent; it is not modified (hooks are removed on exit, even on error).
        batches: dicts of model inputs: input_ids and attention_mask, or pixel_values.
        max_tokens: stop once this many token positions were seen (for a ViT every patch and the
            cls token of every image count).
        progress: called with (token positions done, max_tokens or 0) after each batch.
        data: a description of the data, kept in the result.
        input_stats: also record INPUT_STATS (what wanda-sp, flap and minitron score by; strategies.
            needs_input_stats); off by default: their reductions took 15-30% of a calibration's time on a 2-core
            CPU (SmolLM2-sized model), wasted where no such strategy reads them.
        residual_cov: also record the residual stream's second moment (RESIDUAL_COV, (D, D) float64: what
            slicegpt rotates by; strategies.needs_residual_cov); off by default: D^2 per token and norm.
    """
    device = input_device(model)
    sums = Sums(Shape.of(model.config), torch.device("cpu"))
    extra = no_cache_kwargs(model)
    was_training = model.training
    model.eval()
    try:
        with recording(model, sums, input_stats=input_stats, residual_cov=residual_cov) as recorder:
            for batch in batches:
                mask = real_token_mask(batch)
                recorder.mask = None if mask is None else mask.to(device)
                model(**{k: v.to(device) for k, v in batch.items() if k != "labels"}, **extra)
                if progress:
                    progress(sums.tokens, max_tokens or 0)
                if max_tokens and sums.tokens >= max_tokens:
                    break
    finally:
        model.train(was_training)
    return sums.result(data)


def taylor_scores(model: nn.Module, batches: Iterable[dict[str, Tensor]], *, max_tokens: int | None = None,
                  progress: Progress | None = None) -> dict[str, Tensor]:
    """LLM-Pruner's first-order Taylor scores of every block's heads and FFN neurons (calibration.TAYLOR_STATS:
    "heads_taylor" (L, H x Dh), "ffn_taylor" (L, F)): the gradient of the loss summed over every scored token of
    the batches (the model's own loss from the batch's labels, as training computes it), then per block
    calibration.taylor_channels. The whole parent runs in memory with its gradients: a parent offloaded block by
    block cannot give them. Gradients go only to the block weights (the embedding and head still pass them on),
    and are let go after, as are the model's requires_grad flags restored.
    """
    arch, shape, task = arch_of_model(model), Shape.of(model.config), task_of_model(model)
    blocks = model.get_submodule(arch.blocks)
    wanted = {id(p) for p in blocks.parameters()}
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training, device, extra = model.training, input_device(model), no_cache_kwargs(model)
    model.eval()  # dropout off: the scores of the model as it is
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
            p.grad = None
        seen = 0
        with torch.enable_grad():
            for batch in batches:
                units = task.count_units(batch)
                loss = model(**{k: v.to(device) for k, v in batch.items()}, **extra).loss
                (loss * units).backward()  # a batch's mean loss x its units: the sum over every scored token
                seen += units
                if progress:
                    progress(seen, max_tokens or 0)
                if max_tokens and seen >= max_tokens:
                    break
        scores = [taylor_channels(arch, shape, block) for block in blocks]
        return {name: torch.stack([s[name] for s in scores]) for name in TAYLOR_STATS}
    finally:
        for p, flag in flags.items():
            p.grad = None
            p.requires_grad_(flag)
        model.train(was_training)


@torch.no_grad()
def calibrate_sequential(
    folder: str | Path | Mapping[str, Tensor],
    batches: Iterable[dict[str, Tensor]],
    *,
    config=None,
    model_class: type[nn.Module] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    max_tokens: int | None = None,
    progress: Progress | None = None,
    data: str = "",
    stats: dict | None = None,
    activation_memory: int | None = None, activation_root: str | Path | None = None,
    input_stats: bool = False, residual_cov: bool = False,
) -> Importance:
    """Measure importance like calibrate, one block at a time from the checkpoint's files.

    Args:
        folder: the parent's folder with its safetensors checkpoint (one file or sharded with an index), or its
            tensors (a state dict, or io.streaming.PlacedTensors: those in memory, the offloaded ones from files).
        batches: dicts of model inputs, as for calibrate.
        config: the parent's config (default: read from ``folder``).
        model_class: the transformers class to build (default: the Auto class of the config's task).
        device: where each block runs; its stored inputs stay on the CPU between blocks.
        dtype: the dtype the weights are cast to (default: the config's own).
        max_tokens, data, input_stats, residual_cov: as for calibrate.
        progress: called with (token-block passes done, token positions x blocks) after each block.
        stats: if given, filled with "bytes_read" and "tensors_read" from the checkpoint and
            "activation_bytes_on_disk" (hidden states the memory budget did not hold).
        activation_memory: bytes of stored hidden states kept in memory, the rest in files under
            ``activation_root`` (default: half of the memory available; see io.activations).

    Raises:
        SubcloneError: no safetensors checkpoint in ``folder`` whose tensor names match the model's.
    """
    with activation_store(activation_memory, activation_root) as store:
        p = open_pass(folder, batches, store, config=config, model_class=model_class, device=device, dtype=dtype,
                  max_tokens=max_tokens)
        sums = Sums(Shape.of(p.model.config), torch.device("cpu"))
        recorder = Recorder(p.model, arch_of_model(p.model), sums, input_stats=input_stats,
                             residual_cov=residual_cov)
        for i in range(len(p.blocks)):
            with loaded_block(p, i) as block:
                _calibrate_block(p, i, block, recorder)
            if progress:
                progress((i + 1) * p.tokens, len(p.blocks) * p.tokens)
        _read_head(p, recorder)
        if stats is not None:
            stats.update(p.stats())
    return sums.result(data)


def _calibrate_block(p: Pass, i: int, block: nn.Module, recorder: Recorder) -> None:
    """Every batch of the intact stream through block i under its calibration hooks."""
    recorder.attach_block(i, block)
    try:
        for b in range(len(p.batches)):
            recorder.mask = p.masks[b]
            forward_block(p, i, block, b, 0)
    finally:
        recorder.detach()


def _read_head(p: Pass, recorder: Recorder) -> None:
    """The head's calibration hooks (residual_read) over the intact stream."""
    recorder.attach_globals()
    try:
        with head_on(p, 0) as order:
            for b in order:
                recorder.mask = p.masks[b]
                p.model(**model_inputs(p.batches[b]), **p.extra)
    finally:
        recorder.detach()


@torch.no_grad()
def ablate_sequential(
    folder: str | Path,
    batches: Iterable[dict[str, Tensor]],
    *,
    config=None,
    model_class: type[nn.Module] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    progress: Progress | None = None,
    on_block: Callable[[int, dict], None] | None = None,
    stats: dict | None = None,
    activation_memory: int | None = None,
    activation_root: str | Path | None = None,
) -> dict:
    """The loss with each single block removed, as analysis.probes.block_ablation, each weight read once.

    One stream of hidden states per model: stream 0 the intact parent, stream i + 1 the parent without block
    i, which starts as stream 0's input to block i (a removed block passes its input on) and runs through every
    later block. Each block is read once and runs on every stream that has reached it, so the work is the
    in-memory ablation's (blocks x (blocks + 1) / 2 block passes per batch) and the stored hidden states grow
    to blocks + 1 times calibration's. The head then scores each stream with the task's loss.

    Args:
        folder, batches, config, model_class, device, dtype, stats, activation_memory, activation_root: as
            for calibrate_sequential (the batches carry their labels, as for evaluate).
        progress: called with (blocks done, blocks + 1) after each block and after the scoring.
        on_block: called with (i, metrics) for each model once scored (-1: the intact parent).

    Returns:
        As block_ablation: {"base", "losses"}, and for image classifiers "base_accuracy" and "accuracies".
    """
    with activation_store(activation_memory, activation_root) as store:
        p = open_pass(folder, batches, store, config=config, model_class=model_class, device=device, dtype=dtype,
                  max_tokens=None)
        layers = len(p.blocks)
        for i in range(layers):
            with loaded_block(p, i) as block:
                _ablate_block(p, i, block)
            if progress:
                progress(i + 1, layers + 1)
        task = task_of_model(p.model)
        results = _score_streams(p, task, on_block)
        if progress:
            progress(layers + 1, layers + 1)
        if stats is not None:
            stats.update(p.stats())
    return task.ablation_summary(results[0], results[1:])


def _ablate_block(p: Pass, i: int, block: nn.Module) -> None:
    """Start stream i + 1 (the model without block i) and run block i on every stream that has reached it."""
    for b in range(len(p.batches)):
        p.store[(i + 1, b)] = p.store[(0, b)]  # without block i: its input passes on unchanged
        for stream in range(i + 1):  # the intact model and those without an earlier block
            forward_block(p, i, block, b, stream)


def _score_streams(p: Pass, task: TaskSpec, on_block: Callable[[int, dict], None] | None) -> list[dict]:
    """Each stream's evaluation in turn (its hidden states dropped once scored)."""
    results = []
    for stream in range(len(p.blocks) + 1):
        results.append(_score(p, task, stream))
        p.store.discard_stream(stream)
        if on_block:
            on_block(stream - 1, results[-1])
    return results


def _score(p: Pass, task: TaskSpec, stream: int) -> dict:
    """The task's evaluation (as training.evaluate) of one stream: the head and loss on its stored outputs."""
    with head_on(p, stream) as order:
        return task.score(p.model, (p.batches[b] for b in order), **p.extra)
