"""Models that never exist whole in one process: built on the meta device, filled after they are placed.

A child too large for a full copy in every process (``--fsdp``) is built with its parameters on the meta
device (no memory; buffers such as the rotary frequencies or Gemma's embedding scale are computed for real,
they are small), sharded there, and only then given storage: each process allocates its own shards and fills
them, reading from the child's safetensors only the rows of each tensor that it holds (FSDP2 shards every
parameter along dim 0). A weight source says where the values come from:

- ``FolderWeights``: a saved model folder (the child being trained);
- ``RandomWeights``: a seeded random initialization by the model's own ``_init_weights`` (the random twin).
  Each group of parameters (one transformer block, or one module outside the blocks) is drawn whole on the
  CPU from a stream seeded by the run's seed and the group's name, and only the process's rows are kept: the
  same weights for any number of processes (one process included), never more than one block whole at a time.
  They are not the draw of ``type(model)(config)`` under the same seed (that builds the whole model), but they
  come from the same distribution.

The same code fills a plain (unsharded) model: every process then holds all rows.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn

from subclone_core.core.archs import arch_for
from subclone_core.core.errors import SubcloneError
from subclone_core.core.rng import seeded


class WeightSource(Protocol):
    """Where a model built on the meta device gets its values once each process has allocated its part."""

    def fill(self, model: nn.Module) -> None:
        """Write every parameter's local rows (the model's storage exists, its values are garbage)."""


@contextlib.contextmanager
def meta_init() -> Iterator[None]:
    """Build models inside with their parameters on the meta device and their buffers computed on the CPU.

    accelerate's empty init gives a tied head its own parameter object: ``tie_on_meta`` ties it again (the
    engine does, before it shards or places the model).
    """
    with init_empty_weights(include_buffers=False):
        yield


def is_meta(model: nn.Module) -> bool:
    """Whether any parameter of the model has no storage yet (built under ``meta_init``)."""
    return any(p.is_meta for p in model.parameters())


def tie_on_meta(model: nn.Module) -> None:
    """Tie the head to the embedding where the config says so, before sharding: FSDP2 then holds the shared
    parameter once, and filling the embedding fills the head."""
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def materialize(model: nn.Module, weights: WeightSource | None, device: torch.device) -> None:
    """Give a (possibly sharded) meta model storage on ``device`` and fill it from ``weights``.

    Raises:
        SubcloneError: no weight source for a model on the meta device.
    """
    if weights is None:
        raise SubcloneError(f"{type(model).__name__} is on the meta device and has no weight source to fill it "
                            "from (FolderWeights or RandomWeights)")
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}  # to_empty wipes them
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in buffers:
                buf.copy_(buffers[name])
        weights.fill(model)


def local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """The part of a parameter this process holds and the rows [start, stop) of the full tensor it holds.

    A plain tensor is held whole; an FSDP2 parameter is a DTensor sharded along dim 0 over a 1-D mesh, in
    ``torch.chunk`` pieces (ceil(rows / processes) each, the last ones shorter or empty).

    Raises:
        SubcloneError: a DTensor laid out otherwise (nothing else is written by this module's callers).
    """
    if not hasattr(param, "to_local"):
        return param.data, 0, param.shape[0] if param.dim() else 1
    local, placements = param.to_local(), tuple(param.placements)
    if len(placements) != 1 or not placements[0].is_shard(0):
        raise SubcloneError(f"a sharded parameter laid out as {placements}; expected (Shard(dim=0),) as FSDP2 makes")
    mesh = param.device_mesh
    rows, chunk = param.shape[0], -(-param.shape[0] // mesh.size())
    start = min(mesh.get_local_rank() * chunk, rows)
    stop = min(start + chunk, rows)
    if local.shape[0] != stop - start:
        raise SubcloneError(f"a shard of {local.shape[0]} rows where rows {start}:{stop} of {rows} were expected")
    return local, start, stop


@dataclass(frozen=True)
class FolderWeights:
    """The values of a saved model folder's safetensors files, each process reading only its own rows.

    Attributes:
        folder: the model folder (``model.safetensors`` or its numbered shards).
    """

    folder: Path

    def fill(self, model: nn.Module) -> None:
        """Copy every parameter's local rows, and any persistent buffer the files hold, from the files.

        Raises:
            SubcloneError: a parameter that no file of the folder holds, or a tensor of another shape.
        """
        where = self._index()
        with contextlib.ExitStack() as stack:
            handles = {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in set(where.values())}
            for name, param in model.named_parameters():  # a tied head is listed once, under the embedding
                if name not in where:
                    raise SubcloneError(f"{self.folder} holds no tensor {name!r} of {type(model).__name__}; "
                                        "save the child again, or train it without --fsdp")
                _copy_rows(param, handles[where[name]].get_slice(name), name)
            for name, buf in model.named_buffers():
                if name in where:
                    buf.copy_(handles[where[name]].get_tensor(name))

    def _index(self) -> dict[str, Path]:
        """Tensor name -> the file holding it."""
        files = sorted(Path(self.folder).glob("*.safetensors"))
        if not files:
            raise SubcloneError(f"{self.folder} has no .safetensors files to read the child's shards from")
        where: dict[str, Path] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                where.update(dict.fromkeys(handle.keys(), file))
        return where


def _copy_rows(param: torch.Tensor, source, name: str) -> None:
    """Copy this process's rows of one file tensor (a safetensors slice: only those rows are read)."""
    shape = tuple(source.get_shape())
    if shape != tuple(param.shape):
        raise SubcloneError(f"tensor {name!r} has shape {shape} in the files but {tuple(param.shape)} in the model")
    write_rows(param, lambda start, stop: source[start:stop] if shape else source[:])


def write_rows(param: torch.Tensor, rows: Callable[[int, int], torch.Tensor]) -> None:
    """Write this process's part of a parameter: ``rows(start, stop)`` gives those rows of the full tensor
    (a 0-d parameter is held whole: its one "row" is the value)."""
    local, start, stop = local_rows(param)
    if local.numel():
        local.copy_(rows(start, stop).reshape(local.shape))


@dataclass(frozen=True)
class RandomWeights:
    """A seeded random initialization by the model's own ``_init_weights``, drawn group by group.

    Attributes:
        seed: the run's seed; each group's stream is seeded by it and the group's name.
    """

    seed: int

    def fill(self, model: nn.Module) -> None:
        """Draw every group whole on the CPU and keep this process's rows of each parameter."""
        done: set[int] = set()
        for name, modules in _init_groups(model):
            # a tied head's weight is the embedding's, drawn already: its own init would draw it again
            modules = [m for m in modules if not _all_filled(m, done)]
            with seeded(zlib.crc32(f"{self.seed}:{name}".encode())), _full_params(modules, done):
                for module in modules:
                    model._init_weights(module)


def _init_groups(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """What is drawn at once: each transformer block whole (its modules children first, as ``Module.apply``
    visits them: GPT-2 rescales c_proj from its parent module), then each other module that has parameters."""
    blocks_path = arch_for(model.config.model_type).blocks
    groups = [(f"{blocks_path}.{i}", _post_order(block))
              for i, block in enumerate(model.get_submodule(blocks_path))]
    inside = {id(m) for _, modules in groups for m in modules}
    groups += [(name, [module]) for name, module in model.named_modules()
               if id(module) not in inside and any(True for _ in module.parameters(recurse=False))]
    return groups


def _all_filled(module: nn.Module, done: set[int]) -> bool:
    own = [id(p) for p in module.parameters(recurse=False)]
    return bool(own) and all(key in done for key in own)


def _post_order(module: nn.Module) -> list[nn.Module]:
    return [m for child in module.children() for m in _post_order(child)] + [module]


@contextlib.contextmanager
def _full_params(modules: list[nn.Module], done: set[int]) -> Iterator[None]:
    """Stand full CPU tensors in for the modules' parameters (one per shared parameter); on exit copy the local
    rows of each one not filled before into its parameter, and put the parameters back. A parameter filled
    before gets a stand-in too, thrown away after: an init never writes into a sharded parameter."""
    swapped: list[tuple[nn.Module, str, torch.Tensor]] = []
    full: dict[int, nn.Parameter] = {}
    for module in modules:
        for key, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in full:
                full[id(param)] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype), requires_grad=False)
            swapped.append((module, key, param))
            module._parameters[key] = full[id(param)]
    try:
        yield
        for _, _, param in swapped:
            if id(param) not in done:
                value = full[id(param)].data
                write_rows(param, lambda start, stop, value=value: value[start:stop] if value.dim() else value)
                done.add(id(param))
    finally:
        for module, key, param in swapped:
            module._parameters[key] = param
