"""Sequential ("layer-by-layer") calibration: a parent larger than memory, each weight read once.

accelerate's plain disk offload runs every batch through every layer, so it reads every offloaded weight once
per batch. Here the two loops are swapped, as llm-compressor's sequential onloading and ModelOpt's layerwise
calibration do: the model is built on the meta device from its config, and

1. the modules outside the blocks (embeddings, rotary embedding, final norm, head) are read from the
   checkpoint's safetensors files once and stay; every calibration batch runs up to the first block, where a
   stand-in forward of each block records the exact args and kwargs that block receives (attention masks,
   position ids, position embeddings) and a private exception stops the forward at the last block. Every
   block gets a stand-in, not only the first one a pre-hook would catch, since a block's kwargs may depend on
   its layer type (Gemma 3 passes sliding-window or full masks and position embeddings per layer);
2. each block in turn is read from the files (streaming.CheckpointTensors) onto the device, every batch's
   hidden states run through it under the same hooks and float64 sums as calibration.calibrate, its outputs
   (kept on the CPU) become the next block's inputs, and its weights go back to the meta device;
3. the model's forward runs once more per batch with stand-in blocks that hand back the last block's stored
   outputs, so the final norm and head read the stream exactly as in memory (the head's residual_read and
   Gram hooks).

Memory: the modules outside the blocks, one block, and the stored block inputs, batches x tokens per batch x
hidden x bytes per element (4 in float32, 2 in bfloat16) -- 4,096 tokens of a 4,096-wide parent are 64 MiB in
float32 -- plus each block's recorded kwargs (masks and position embeddings, mostly shared between blocks). The
result equals calibrate's on the same batches up to the order of float64 additions.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import Tensor, nn

from subclone_core.core.archs import arch_for, arch_of_model
from subclone_core.core.calibration import (
    Importance,
    Progress,
    _Recorder,
    _Sums,
    no_cache_kwargs,
    real_token_mask,
)
from subclone_core.core.errors import SubcloneError
from subclone_core.core.shape import Shape
from subclone_core.io.streaming import CheckpointTensors, checkpoint_tensors, tied_names
from subclone_core.tasks import task_of_config


class _Stop(Exception):
    """Raised by the last block's stand-in to end a forward pass once every block's inputs are recorded."""


def _hidden(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def skeleton(config, model_class: type[nn.Module] | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """The model built from its config with every parameter on the meta device (buffers computed in the
    constructor, such as rotary frequencies, are real), in eval mode."""
    config = copy.deepcopy(config)
    build = task_of_config(config).auto_model().from_config if model_class is None else model_class._from_config
    kwargs = {"dtype": dtype} if dtype is not None else {}
    with init_empty_weights():
        model = build(config, **kwargs)
    return model.eval()


class _Loader:
    """Moves the skeleton's tensors between the checkpoint files and the device, counting what it reads."""

    def __init__(self, model: nn.Module, tensors: CheckpointTensors, device: torch.device) -> None:
        self.model, self.tensors, self.device = model, tensors, device
        self.names = list(model.state_dict())
        self.ties = {head: source for head, source in tied_names(model).items() if head in tensors.aliases}

    def load(self, names: list[str]) -> None:
        for name in names:
            if name in self.ties:
                continue  # shares its source's tensor: tied after the source is loaded
            set_module_tensor_to_device(self.model, name, self.device, value=self.tensors[name])
        for head, source in self.ties.items():
            if head in names:
                module_path, _, leaf = head.rpartition(".")
                setattr(self.model.get_submodule(module_path), leaf, self.model.get_parameter(source))

    def free(self, names: list[str]) -> None:
        for name in names:
            set_module_tensor_to_device(self.model, name, "meta")


@torch.no_grad()
def calibrate_sequential(
    folder: str | Path,
    batches: Iterable[dict[str, Tensor]],
    *,
    config=None,
    model_class: type[nn.Module] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    max_tokens: int | None = None,
    progress: Progress | None = None,
    data: str = "",
    grams: bool = False,
    stats: dict | None = None,
) -> Importance:
    """Measure importance like calibration.calibrate, one block at a time from the checkpoint's files.

    Args:
        folder: the parent's folder with its safetensors checkpoint (one file or sharded with an index).
        batches: dicts of model inputs, as for calibrate.
        config: the parent's config (default: read from ``folder``).
        model_class: the transformers class to build (default: the Auto class of the config's task).
        device: where each block runs; its stored inputs stay on the CPU between blocks.
        dtype: the dtype the weights are cast to (default: the config's own).
        max_tokens, data, grams: as for calibrate.
        progress: called with (token-block passes done, token positions x blocks) after each block.
        stats: if given, filled with "bytes_read" and "tensors_read" from the checkpoint.

    Raises:
        SubcloneError: no safetensors checkpoint in ``folder`` whose tensor names match the model's.
    """
    model, blocks, loader, block_names = _prepare(folder, config, model_class, torch.device(device), dtype)
    device = loader.device
    sums = _Sums(Shape.of(model.config), torch.device("cpu"), grams={} if grams else None)
    recorder = _Recorder(model, arch_of_model(model), sums)
    extra = no_cache_kwargs(model)
    masks, calls, hidden, inputs = _record_block_inputs(model, blocks, batches, device, extra, max_tokens)
    tokens = sum(int(m.sum()) if m is not None else h.shape[0] * h.shape[1] for m, h in zip(masks, hidden))

    for i, block in enumerate(blocks):
        loader.load(block_names[i])
        _run_block(i, block, recorder, calls, masks, hidden, device)
        loader.free(block_names[i])
        if progress:
            progress((i + 1) * tokens, len(blocks) * tokens)
    _read_head(model, blocks, recorder, masks, hidden, inputs, extra, device)
    if stats is not None:
        stats.update(bytes_read=loader.tensors.bytes_read, tensors_read=loader.tensors.reads)
    return sums.result(data)


def _run_block(i: int, block: nn.Module, recorder: _Recorder, calls, masks, hidden: list[Tensor], device) -> None:
    """Every batch's stored inputs through block i under its hooks; its outputs replace them (on the CPU)."""
    recorder.attach_block(i, block)
    try:
        for b, x in enumerate(hidden):
            recorder.mask = masks[b]
            args, kwargs = _with_hidden(*calls[b][i], x.to(device))
            y = block(*args, **kwargs)
            hidden[b] = (y[0] if isinstance(y, tuple) else y).to("cpu")
            recorder.seen.clear()
    finally:
        recorder.detach()


def _prepare(folder, config, model_class, device: torch.device, dtype):
    """The skeleton with everything outside the blocks loaded on ``device``, its loader, its blocks and each
    block's tensor names."""
    if config is None:
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(folder)
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    arch = arch_for(config.model_type)
    model = skeleton(config, model_class, dtype)
    tensors = checkpoint_tensors(model, Path(folder), renames=True)
    if tensors is None:
        raise SubcloneError(f"sequential calibration of a {arch.name} parent reads its safetensors files, but "
                            f"{folder} has none whose tensor names match the model's; calibrate it in memory "
                            "(without --sequential)")
    tensors.dtype = dtype
    loader = _Loader(model, tensors, device)
    blocks = model.get_submodule(arch.blocks)
    block_names = [[n for n in loader.names if n.startswith(f"{arch.blocks}.{i}.")] for i in range(len(blocks))]
    in_blocks = {n for names in block_names for n in names}
    for name, buffer in list(model.named_buffers()):
        if not buffer.is_meta:  # computed in a constructor (rotary frequencies, embedding scales)
            set_module_tensor_to_device(model, name, device)
    loader.load([n for n in loader.names if n not in in_blocks])
    return model, blocks, loader, block_names


def _record_block_inputs(model, blocks, batches, device, extra, max_tokens):
    """Run each batch up to the blocks; return per batch its real-token mask, the (args, kwargs) each block
    receives, the first block's input (on the CPU) and the model inputs (for the head's pass)."""
    masks, calls, hidden, inputs = [], [], [], []
    current: list = []

    def stand_in(i: int):
        def forward(*args, **kwargs):
            current.append((args, kwargs))
            if i == len(blocks) - 1:
                raise _Stop
            return _hidden(args, kwargs)
        return forward

    seen = 0
    for i, block in enumerate(blocks):
        block.forward = stand_in(i)
    try:
        for batch in batches:
            mask = real_token_mask(batch)
            model_inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            current = []
            try:
                model(**model_inputs, **extra)
            except _Stop:
                pass
            else:
                raise SubcloneError("sequential calibration: the forward pass never reached the last block")
            first_args, first_kwargs = current[0]
            x = _hidden(first_args, first_kwargs)
            calls.append([_with_hidden(a, k, None) for a, k in current])  # hidden states are kept apart
            hidden.append(x.to("cpu"))
            masks.append(None if mask is None else mask.to(device))
            inputs.append(model_inputs)
            seen += int(mask.sum()) if mask is not None else x.shape[0] * x.shape[1]
            if max_tokens and seen >= max_tokens:
                break
    finally:
        for block in blocks:
            del block.forward
    return masks, calls, hidden, inputs


def _read_head(model, blocks, recorder, masks, hidden, inputs, extra, device) -> None:
    """Run the model once more per batch with stand-in blocks, the last handing back its stored output, so the
    modules after the blocks read the stream as in memory, under the head's hooks."""
    last = len(blocks) - 1
    stored: list[Tensor] = []

    def stand_in(i: int):
        def forward(*args, **kwargs):
            return stored[0] if i == last else _hidden(args, kwargs)
        return forward

    for i, block in enumerate(blocks):
        block.forward = stand_in(i)
    recorder.attach_globals()
    try:
        for b, model_inputs in enumerate(inputs):
            recorder.mask = masks[b]
            stored[:] = [hidden[b].to(device)]
            model(**model_inputs, **extra)
            recorder.seen.clear()
    finally:
        recorder.detach()
        for block in blocks:
            del block.forward
