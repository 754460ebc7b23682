"""The block-by-block ("layer-by-layer") pass over a parent: each weight read once, at any parent size.

accelerate's plain disk offload runs every batch through every layer, so it reads every offloaded weight once
per batch. Here the two loops are swapped, as llm-compressor's sequential onloading and ModelOpt's layerwise
calibration do: the model is built on the meta device from its config, and

1. the modules outside the blocks (embeddings, rotary embedding, final norm, head) are read from the
   checkpoint's safetensors files once and stay; every calibration batch runs up to the first block, where a
   stand-in forward of each block records the exact args and kwargs that block receives (attention masks,
   position ids, position embeddings) and a private exception stops the forward at the last block. Every
   block gets a stand-in, not only the first one a pre-hook would catch, since a block's kwargs may depend on
   its layer type (Gemma 3 passes sliding-window or full masks and position embeddings per layer);
2. each block in turn is read from the files (streaming.CheckpointTensors), or taken from a parent in memory
   (its state dict: pipeline.refitting's pass over an in-memory parent), onto the device, every batch's hidden
   states run through it (under the hooks of what the pass is for: calibration's, the refit's), its outputs
   (kept on the CPU, or on disk beyond a memory budget: io.activations) become the next block's inputs, and its
   weights go back to the meta device;
3. the model's forward runs once more per batch with stand-in blocks that hand back the last block's stored
   outputs, so the final norm and head read the stream exactly as in memory (head_on).

Memory: the modules outside the blocks, one block, and the stored block inputs, batches x tokens per batch x
hidden x bytes per element (4 in float32, 2 in bfloat16) -- 4,096 tokens of a 4,096-wide parent are 64 MiB in
float32 -- plus each block's recorded kwargs (masks and position embeddings, mostly shared between blocks).

What runs on this pass: sequential calibration and block ablation (pipeline.calibration), the least-squares
refit (pipeline.refitting) and its variant on the child's own inputs (pipeline.reconstruction).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import Tensor, nn
from transformers.initialization import no_init_weights

from subclone_core.core.archs import arch_of_model
from subclone_core.core.calibration import no_cache_kwargs, real_token_mask
from subclone_core.core.errors import SubcloneError
from subclone_core.io.activations import ActivationStore, default_budget
from subclone_core.io.devices import keeps_freed_memory, return_freed_memory
from subclone_core.io.streaming import CheckpointTensors, checkpoint_tensors, tied_names
from subclone_core.tasks import task_of_config


class StopForward(Exception):
    """Raised by the last block's stand-in to end a forward pass once every block's inputs are recorded."""


def _hidden(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _cast(value, dtype: torch.dtype):
    """``value`` with every floating tensor in it (nested in tuples, lists and dicts) in ``dtype``."""
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def skeleton(config, model_class: type[nn.Module] | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """The model built from its config with every parameter on the meta device (buffers computed in the
    constructor, such as rotary frequencies, are real), in eval mode; no initialization is run on the meta
    parameters (see core.building.empty_model)."""
    config = copy.deepcopy(config)
    build = task_of_config(config).auto_model().from_config if model_class is None else model_class._from_config
    kwargs = {"dtype": dtype} if dtype is not None else {}
    with init_empty_weights(), no_init_weights():
        model = build(config, **kwargs)
    return model.eval()


class _Loader:
    """Moves the skeleton's tensors between the checkpoint files and the device, counting what it reads."""

    def __init__(self, model: nn.Module, tensors: CheckpointTensors, device: torch.device) -> None:
        self.model, self.tensors, self.device = model, tensors, device
        self.names = list(model.state_dict())
        aliases = getattr(tensors, "aliases", {})  # tensors in memory (a state dict) list tied names twice
        self.ties = {head: source for head, source in tied_names(model).items() if head in aliases}

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


@dataclass
class Pass:
    """A sequential pass once every batch has run up to the blocks: the skeleton and its loader, the blocks and
    each block's tensor names, and per batch its real-token mask, the (args, kwargs) each block receives (the
    hidden states left out) and the batch itself on the device; the real token positions (or patches and cls
    tokens) over all batches; the store holds stream 0, each batch's input to the next block of the intact
    model."""

    model: nn.Module
    blocks: nn.ModuleList
    loader: _Loader
    block_names: list[list[str]]
    extra: dict
    masks: list[Tensor | None]
    calls: list[list[tuple[tuple, dict]]]
    batches: list[dict[str, Tensor]]
    tokens: int
    store: ActivationStore
    block_dtype: torch.dtype | None = None

    @property
    def device(self) -> torch.device:
        return self.loader.device

    @property
    def reads_files(self) -> bool:
        """Whether blocks' weights are read from the checkpoint's files (an offloaded parent), not from memory."""
        return _reads_files(self.loader)

    @property
    def global_names(self) -> list[str]:
        """The state-dict names outside the blocks (embeddings, final norm, head), in the model's order."""
        return _outside(self.loader.names, self.block_names)

    def stats(self) -> dict[str, int]:
        tensors = self.loader.tensors
        return {"bytes_read": getattr(tensors, "bytes_read", 0), "tensors_read": getattr(tensors, "reads", 0),
                "activation_bytes_on_disk": self.store.bytes_written}


def _reads_files(loader: _Loader) -> bool:
    """Whether the loader reads blocks' weights from the checkpoint's files (PlacedTensors or a folder's reader)."""
    return hasattr(loader.tensors, "bytes_read")


def open_pass(source: str | Path | Mapping[str, Tensor], batches: Iterable[dict[str, Tensor]],
              store: ActivationStore, *, config, model_class, device, dtype, max_tokens: int | None,
              block_dtype: torch.dtype | None = None) -> Pass:
    """Run every batch up to the blocks over the parent from ``source`` (its folder, or its tensors in memory):
    the pass that then goes block by block. With ``block_dtype``, each block's weights are cast to it as they
    are loaded and each block runs in it, while the stream between blocks and everything outside the blocks
    keep ``dtype`` (the embedding and head are not copied: a float32 block of a bfloat16 parent costs one
    block's float32 weights)."""
    model, blocks, loader, block_names = _prepare(source, config, model_class, torch.device(device), dtype)
    if torch.device(device).type == "cpu" and (_reads_files(loader) or not keeps_freed_memory()):
        # each block's buffers are allocated and freed in turn: where memory is bounded (an offloaded parent), or
        # the process has not chosen to keep freed memory, keep the heap from growing
        return_freed_memory()
    if block_dtype is not None:
        blocks.to(block_dtype)  # on the meta device: each tensor loaded later is cast to its parameter's dtype
    extra = no_cache_kwargs(model)
    masks, calls, kept, tokens = _record_block_inputs(model, blocks, batches, loader.device, extra, max_tokens,
                                                      store)
    return Pass(model, blocks, loader, block_names, extra, masks, calls, kept, tokens, store, block_dtype)


def activation_store(budget: int | None, root: str | Path | None) -> ActivationStore:
    """The store of a pass's hidden states: ``budget`` bytes in memory (None: io.activations.default_budget),
    the rest in a temporary folder under ``root`` (None: the system's)."""
    return ActivationStore(default_budget() if budget is None else budget, root)


@contextlib.contextmanager
def loaded_block(p: Pass, i: int) -> Iterator[nn.Module]:
    """Block i with its weights read from the files onto the device, back on the meta device afterwards."""
    p.loader.load(p.block_names[i])
    try:
        yield p.blocks[i]
    finally:
        p.loader.free(p.block_names[i])


def block_inputs(p: Pass, i: int, b: int, hidden: Tensor) -> tuple[tuple, dict]:
    """The (args, kwargs) of block i on batch b with ``hidden`` as its input, on the device, everything in the
    pass's block dtype where it has one."""
    args, kwargs = with_hidden(*p.calls[b][i], hidden.to(p.device))
    return (args, kwargs) if p.block_dtype is None else (_cast(args, p.block_dtype), _cast(kwargs, p.block_dtype))


def forward_block(p: Pass, i: int, block: nn.Module, b: int, stream: int) -> None:
    """Batch b of a stream through block i: its stored input is replaced by the block's output (on the CPU, in
    the stream's dtype)."""
    hidden = p.store[(stream, b)]
    args, kwargs = block_inputs(p, i, b, hidden)
    y = block(*args, **kwargs)
    p.store[(stream, b)] = (y[0] if isinstance(y, tuple) else y).to("cpu", hidden.dtype)


def _prepare(source, config, model_class, device: torch.device, dtype):
    """The skeleton with everything outside the blocks loaded on ``device``, its loader, its blocks and each
    block's tensor names. ``source``: the parent's folder (its safetensors files) or its tensors in memory (a
    state dict: each block's tensors are then shared, not copied, while it runs on their own device)."""
    if config is None:
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(source)
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = skeleton(config, model_class, dtype)
    tensors = source if isinstance(source, Mapping) else _file_tensors(model, Path(source), dtype)
    loader = _Loader(model, tensors, device)
    path = arch_of_model(model).blocks
    blocks = model.get_submodule(path)
    block_names = [[n for n in loader.names if n.startswith(f"{path}.{i}.")] for i in range(len(blocks))]
    for name, buffer in list(model.named_buffers()):
        if not buffer.is_meta:  # computed in a constructor (rotary frequencies, embedding scales)
            set_module_tensor_to_device(model, name, device)
    loader.load(_outside(loader.names, block_names))
    return model, blocks, loader, block_names


def _file_tensors(model: nn.Module, folder: Path, dtype: torch.dtype) -> CheckpointTensors:
    """The skeleton's tensors as read from the safetensors files in ``folder``, cast to ``dtype``."""
    tensors = checkpoint_tensors(model, folder, renames=True)
    if tensors is None:
        arch = arch_of_model(model)
        raise SubcloneError(f"sequential calibration of a {arch.name} parent reads its safetensors files, but "
                            f"{folder} has none whose tensor names match the model's; calibrate it in memory "
                            "(without --sequential)")
    tensors.dtype = dtype
    return tensors


def _record_block_inputs(model, blocks, batches, device, extra, max_tokens, store: ActivationStore):
    """Run each batch up to the blocks; return per batch its real-token mask, the (args, kwargs) each block
    receives, the batch on the device, and the real token positions seen; the store gets each batch's input to
    the first block (stream 0)."""
    masks, calls, kept = [], [], []
    current: list = []

    def stand_in(i: int):
        def forward(*args, **kwargs):
            current.append((args, kwargs))
            if i == len(blocks) - 1:
                raise StopForward
            return _hidden(args, kwargs)
        return forward

    seen = 0
    for i, block in enumerate(blocks):
        block.forward = stand_in(i)
    try:
        for batch in batches:
            mask = real_token_mask(batch)
            batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
            current = []
            try:
                model(**model_inputs(batch), **extra)
            except StopForward:
                pass
            else:
                raise SubcloneError("sequential calibration: the forward pass never reached the last block")
            x = _hidden(*current[0])
            calls.append([with_hidden(a, k, None) for a, k in current])  # hidden states are kept apart
            store[(0, len(kept))] = x.to("cpu")
            masks.append(None if mask is None else mask.to(device))
            kept.append(batch)
            seen += int(mask.sum()) if mask is not None else x.shape[0] * x.shape[1]
            if max_tokens and seen >= max_tokens:
                break
    finally:
        for block in blocks:
            del block.forward
    return masks, calls, kept, seen


def _outside(names: list[str], block_names: list[list[str]]) -> list[str]:
    in_blocks = {n for names_ in block_names for n in names_}
    return [n for n in names if n not in in_blocks]


def token_rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """(B, T, ..., width) -> (N, width) real-token rows, at least float32 (bf16/fp16 products in float32, a
    float64 model's in float64), for moments summed in float64."""
    rows = x.reshape(-1, x.shape[-1]) if mask is None else x[mask.to(x.device)]  # (N, width)
    return rows.double() if rows.dtype == torch.float64 else rows.float()


def module_tensor(model: nn.Module, name: str) -> Tensor:
    """The parameter or buffer at a dotted state-dict name, detached."""
    module, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(module) if module else model, leaf).detach()


def model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


@contextlib.contextmanager
def head_on(p: Pass, stream: int) -> Iterator[Iterator[int]]:
    """Stand-in blocks, the last handing back the stream's stored output of the current batch, so a forward of
    the whole model runs the modules after the blocks on that stream exactly as in memory. Yields the batch
    indices in order; each becomes the current batch as it is yielded."""
    last = len(p.blocks) - 1
    stored: list[Tensor] = []

    def stand_in(i: int):
        def forward(*args, **kwargs):
            return stored[0] if i == last else _hidden(args, kwargs)
        return forward

    def order() -> Iterator[int]:
        for b in range(len(p.batches)):
            stored[:] = [p.store[(stream, b)].to(p.device)]
            yield b

    for i, block in enumerate(p.blocks):
        block.forward = stand_in(i)
    try:
        yield order()
    finally:
        for block in p.blocks:
            del block.forward


