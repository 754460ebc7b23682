"""The least-squares refit of a child, block by block, inside the memory budget, at any parent size.

Once calibration has fixed what the child keeps, a second pass over the parent (pipeline.passes: the model
built on the meta device, each block's weights onloaded in turn from memory or from the checkpoint's files, every
calibration batch run through it) accumulates, for each linear layer of a kept block whose input shrinks, only
what its refit reads: the kept columns G[:, k] of the Gram matrix of its input, summed on the compute device in
float64. Then that block's tensors are handed to the slicer (core.slicing.slice_items), which refits or slices
them at once, and the block and its sums are let go before the next block runs. The head's refit reads the
stream after the last block, as the head does.

Memory: one parent block, its sums (a kept-columns Gram per distinct input: for a 1.5B parent's FFN down
projection at 60% width, 8,960 x 5,376 float64, 0.4 GB) and the stored hidden states (io.activations); never
every Gram matrix of the parent at once. Reads: every parent weight once more than calibration (from memory when
the parent is in memory, from its files when it is offloaded).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from subclone_core.core.archs import arch_of_model
from subclone_core.core.calibration import Progress, optional_submodule
from subclone_core.core.errors import SubcloneError
from subclone_core.core.slicing import TensorSlicer
from subclone_core.pipeline.passes import (
    Pass,
    StopForward,
    activation_store,
    forward_block,
    head_on,
    loaded_block,
    model_inputs,
    module_tensor,
    open_pass,
    token_rows,
)
from subclone_core.pipeline.reconstruction import ParentRecord, reconstruct

ALL = slice(None)  # the kept columns of a hook that sums the whole Gram matrix of its layer's input
KeptInputs = Callable[[str, Tensor], "Tensor | None"]  # (weight name, weight) -> kept input indices or None
ChildItems = Iterator[tuple[str, Tensor, "Tensor | None"]]  # (parent name, parent tensor, G[:, k] or None)


class _KeptGrams:
    """Forward pre-hooks that sum x^T x[:, k] of each hooked linear layer's input over the real tokens, on the
    device where the layer runs, in float64. Layers that read one tensor (q, k and v; gate and up) share one sum:
    the tensors seen in a forward are held until it ends, so a later input can never reuse a held one's memory and
    be mistaken for it. With ``stop``, the forward ends once every hooked layer has read its input (the head's
    refit needs its input, not the logits over the vocabulary)."""

    def __init__(self, stop: bool = False) -> None:
        self.sums: dict[str, Tensor] = {}  # weight name -> (in, k) float64
        self.owner: dict[str, str] = {}  # weight name -> the name whose sum it shares
        self.seen: dict[tuple, tuple[str, Tensor]] = {}
        self.mask: Tensor | None = None
        self.handles: list = []
        self.stop, self.calls = stop, 0

    def attach(self, module: nn.Module, name: str, kept: Tensor | slice) -> None:
        self.handles.append(module.register_forward_pre_hook(self._hook(name, kept)))

    def _hook(self, name: str, kept: Tensor | slice):
        def hook(module, args):
            self._add(name, kept, args[0])
            self.calls += 1
            if self.stop and self.calls == len(self.handles):
                raise StopForward
        return hook

    def _add(self, name: str, kept: Tensor | slice, x: Tensor) -> None:
        key = (x.data_ptr(), tuple(x.shape), id(kept))  # one kept-index tensor per axis and block
        if key in self.seen:
            self.owner[name] = self.seen[key][0]
            return
        self.seen[key] = (name, x)
        rows = token_rows(x, self.mask)  # (N, in)
        gram = rows.T @ (rows if kept is ALL else rows.index_select(1, kept.to(rows.device)))  # (in, k) in float64
        if name in self.sums:
            self.sums[name] += gram
        else:
            self.sums[name] = gram.double()

    def end_batch(self) -> None:
        self.seen.clear()
        self.calls = 0

    def means(self, tokens: int) -> dict[str, Tensor]:
        """Weight name -> mean G[:, k] over the tokens; hooks removed."""
        for handle in self.handles:
            handle.remove()
        means = {name: total / max(tokens, 1) for name, total in self.sums.items()}
        return {**means, **{name: means[owner] for name, owner in self.owner.items()}}


def _hook_linears(root: nn.Module, prefix: str, paths: Iterable[str], kept_inputs: KeptInputs, *,
                  stop: bool = False) -> _KeptGrams:
    """Hooks on the linear layers under ``root`` whose inputs the child narrows."""
    grams = _KeptGrams(stop)
    for path in paths:
        if (module := optional_submodule(root, path)) is None:
            continue  # a table lists every variant's modules (a head this task has not)
        name = f"{prefix}{path}.weight"
        kept = kept_inputs(name, module.weight)
        if kept is not None:
            grams.attach(module, name, kept)
    return grams


def _block_items(p: Pass, i: int, block: nn.Module, kept_inputs: KeptInputs) -> ChildItems:
    """Run block i on every batch of the parent's stream while summing its refit statistics, then hand out the
    block's tensors with their Gram columns."""
    prefix = f"{arch_of_model(p.model).blocks}.{i}."
    grams = _hook_linears(block, prefix, arch_of_model(p.model).linear_modules[1], kept_inputs)
    for b in range(len(p.batches)):
        grams.mask = p.masks[b]
        forward_block(p, i, block, b, 0)
        grams.end_batch()
    means = grams.means(p.tokens)
    for name in p.block_names[i]:
        yield name, module_tensor(p.model, name), means.pop(name, None)


def _global_items(p: Pass, kept_inputs: KeptInputs) -> ChildItems:
    """The head's refit statistics on the stream after the last block, then every tensor outside the blocks."""
    grams = _hook_linears(p.model, "", arch_of_model(p.model).linear_modules[0], kept_inputs, stop=True)
    if grams.handles:
        with head_on(p, 0) as order:
            for b in order:
                grams.mask = p.masks[b]
                with contextlib.suppress(StopForward):
                    p.model(**model_inputs(p.batches[b]), **p.extra)
                grams.end_batch()
    means = grams.means(p.tokens)
    for name in p.global_names:
        yield name, module_tensor(p.model, name), means.get(name)


def _parent_items(p: Pass, kept_inputs: KeptInputs, progress: Progress | None) -> ChildItems:
    """Every block on the parent's own stream, then the globals."""
    layers = len(p.blocks)
    for i in range(layers):
        with loaded_block(p, i) as block:
            yield from _block_items(p, i, block, kept_inputs)
        if progress:
            progress(i + 1, layers + 1)
    yield from _global_items(p, kept_inputs)


@torch.no_grad()
def refit_items(
    source: str | Path | Mapping[str, Tensor],
    batches: Iterable[dict[str, Tensor]],
    slicer: TensorSlicer,
    *,
    config,
    child_config=None,
    model_class: type[nn.Module] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    block_dtype: torch.dtype | None = None,
    max_tokens: int | None = None,
    progress: Progress | None = None,
    stats: dict | None = None,
    activation_memory: int | None = None,
    activation_root: str | Path | None = None,
    record: ParentRecord | None = None,
) -> ChildItems:
    """Every parent tensor with, for a linear weight whose input the child narrows, the kept columns of its
    input's Gram matrix on the calibration batches: what core.slicing.slice_items makes the child of, block by
    block (a generator: block i's weights are onloaded when its tensors are asked for and let go after).

    Args:
        source: the parent's folder (its safetensors files) or its tensors in memory (its state dict).
        batches: the calibration batches (the calibration's: the refit fits the data the selection came from).
        slicer: the child's slicer: its kept_inputs say which weights are refit and on which input columns; its
            table's ``refit_inputs`` whose inputs they are fit on ("child": pipeline.reconstruction, which
            needs ``child_config`` to run the child beside the parent).
        config, model_class, device, dtype, max_tokens, activation_memory, activation_root: as for
            pipeline.calibration.calibrate_sequential.
        block_dtype: the dtype the blocks (the parent's and the child's) run in, where it differs from
            ``dtype`` (pipeline.passes.open_pass); the stream between blocks keeps ``dtype``.
        progress: called with (blocks done, blocks + 1) after each block and after the head.
        stats: if given, filled as calibrate_sequential's once the pass ends.
        record: a refit on the child's inputs records the parent's side there, or reads it where it is complete.
    """
    with activation_store(activation_memory, activation_root) as store:
        p = open_pass(source, batches, store, config=config, model_class=model_class, device=device, dtype=dtype,
                      max_tokens=max_tokens, block_dtype=block_dtype)
        if slicer.arch.refit_inputs == "child":
            if child_config is None:
                raise SubcloneError("the refit on the child's inputs runs the child: give child_config")
            with activation_store(activation_memory, activation_root) as child_store:
                yield from reconstruct(p, slicer, child_config, child_store, record, progress)
        else:
            yield from _parent_items(p, slicer.kept_inputs, progress)
        if progress:
            progress(len(p.blocks) + 1, len(p.blocks) + 1)
        if stats is not None:
            stats.update(p.stats())


class _EveryInput:
    """What refit_items reads as a slicer to sum the whole input Gram of every linear layer on the parent's
    inputs."""

    def __init__(self, arch) -> None:
        self.arch = replace(arch, refit_inputs="parent")

    def kept_inputs(self, name: str, weight: Tensor) -> slice:
        return ALL


class SharedGrams:
    """A refit source (core.strategies.RefitItems) for many children of one parent, each refit on the parent's
    inputs: on first use one pass of ``items`` sums the whole input Gram matrix of every linear layer, which is
    kept with the parent's tensors, so every further child costs its solves only (the explorer's candidates), and
    a child takes the previous child's refit of every tensor the two refit alike (TensorSlicer.reuse: children
    of one width share every block both keep, and the head). Each child reads the kept columns of the same sums as
    refit_items gives it alone: the same child, up to float32 rounding in the sums. Memory: every Gram at once
    (about 1 GB in float64 for SmolLM2-135M or Gemma 3 270M, gram_bytes), the parent's tensors as the pass hands
    them out (the parent's own where it is in memory) and the previous child's refit tensors. ``check`` runs
    before each tensor a child refits: from one pass a child's solves run no module (where a Cancel is felt),
    a few seconds of them on a 262k-word head (training.interrupt.check stops them there)."""

    def __init__(self, items: Callable[[object, object], ChildItems], check: Callable[[], None] | None = None) -> None:
        self.items, self.check = items, check
        self.measured: list[tuple[str, Tensor, Tensor | None]] | None = None
        self.refits: dict[tuple, Tensor] = {}  # the previous child's refit tensors (TensorSlicer.reuse)

    def __call__(self, slicer: TensorSlicer, child_config=None) -> ChildItems:
        if slicer.arch.refit_inputs != "parent":  # a Gram matrix cannot stand for the child's own inputs
            raise SubcloneError("shared Gram matrices refit on the parent's inputs; this child refits on its own")
        if self.measured is None:
            self.measured = list(self.items(_EveryInput(slicer.arch), None))
        earlier, self.refits = self.refits, {}
        slicer.reuse(earlier, self.refits)
        for name, tensor, gram in self.measured:
            refit = gram is not None and slicer.kept_inputs(name, tensor) is not None
            if refit and self.check:
                self.check()
            yield name, tensor, gram if refit else None


def gram_bytes(model: nn.Module) -> int:
    """The float64 bytes of the whole input Gram of every linear layer that refit_items hooks (inputs read by
    several layers counted once per layer: an upper bound)."""
    arch = arch_of_model(model)
    layers = [optional_submodule(model, path) for path in arch.linear_modules[0]]
    layers += [optional_submodule(block, path) for block in model.get_submodule(arch.blocks)
               for path in arch.linear_modules[1]]
    return sum(8 * _fan_in(layer) ** 2 for layer in layers if layer is not None)


def record_bytes(model: nn.Module, tokens: int, dtype: torch.dtype) -> int:
    """The bytes of a pipeline.reconstruction.ParentRecord of this parent over ``tokens`` tokens in ``dtype``: every
    block layer's input and the stream (inputs read by several layers counted once per layer: an upper bound)."""
    arch = arch_of_model(model)
    widths = sum(_fan_in(layer) for block in model.get_submodule(arch.blocks) for path in arch.linear_modules[1]
                 if (layer := optional_submodule(block, path)) is not None)
    return tokens * (widths + model.config.hidden_size) * dtype.itemsize


def _fan_in(layer: nn.Module) -> int:
    """The width of a linear layer's input (an nn.Linear's in_features; GPT-2's Conv1D keeps (in, out))."""
    return getattr(layer, "in_features", None) or layer.weight.shape[0]
