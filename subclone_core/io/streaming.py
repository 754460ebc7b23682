"""Build a child from the parent's checkpoint files, one tensor at a time, never from a second copy in memory.

A child tensor depends only on its parent tensor and the selection (slicing.TensorSlicer), so the builder reads
each parent tensor from its safetensors file (`safetensors.safe_open`), slices it and lets it go: the parent's
tensors in memory are never touched, which is what lets a parent offloaded to disk (or spread over GPUs) give
a child at all, and keeps building's memory at the child's size. The same idea as mergekit's out-of-core merges.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

INDEX_NAME = "model.safetensors.index.json"


class CheckpointTensors(Mapping):
    """The parent's tensors by state_dict name, each read from its safetensors file when asked for.

    Iterating yields names; reading a value opens the file, reads that one tensor and casts it to ``dtype``
    (the dtype the parent was loaded in, so a child streamed from files equals one sliced in memory).

    Attributes:
        tied: whether the model's output head is its input embedding (slicing.is_tied reads this, as the
            tensors read from files never share storage).
    """

    def __init__(self, files: dict[str, Path], dtype: torch.dtype, *, aliases: dict[str, str], tied: bool,
                 keys: dict[str, str] | None = None) -> None:
        self.files, self.dtype, self.aliases, self.tied = files, dtype, aliases, tied
        self.keys = keys or {}  # model name -> the tensor's name in its file, where transformers renames it
        self.reads = 0  # tensors read so far (tests check one read per tensor)
        self.bytes_read = 0  # bytes of those tensors as stored in the files

    def __getitem__(self, name: str) -> Tensor:
        source = self.aliases.get(name, name)
        with safe_open(str(self.files[source]), framework="pt") as f:
            tensor = f.get_tensor(self.keys.get(source, source))
        self.reads += 1
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def __iter__(self) -> Iterator[str]:
        yield from self.files
        yield from self.aliases

    def __len__(self) -> int:
        return len(self.files) + len(self.aliases)


def tensor_files(folder: Path) -> dict[str, Path]:
    """Each tensor name of a folder's safetensors checkpoint and the file holding it (empty without one)."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return {name: folder / file for name, file in weight_map.items()}
    files: dict[str, Path] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            files.update(dict.fromkeys(f.keys(), path))
    return files


def checkpoint_tensors(model: nn.Module, folder: Path | None, *, renames: bool = False) -> CheckpointTensors | None:
    """The model's tensors as read from its checkpoint in ``folder``, or None when they cannot be: no folder,
    no safetensors files, or names that differ from the model's state_dict (a checkpoint transformers renamed
    or converted while loading), where only the model in memory has the right tensors.

    With ``renames``, a checkpoint whose names transformers only renames on loading (GPT-NeoX's embed_out,
    ViT's encoder.layer) is read under the model's names too.
    """
    files = tensor_files(folder) if folder is not None else {}
    if not files:
        return None
    names = set(model.state_dict())  # names only: an offloaded parent's tensors here are on the meta device
    keys: dict[str, str] = {}
    if renames and not set(files) <= names:
        keys = _renamed_keys(model, files)
        files = {name: files[key] for name, key in keys.items()} if keys else files
    ties = tied_names(model)
    aliases = {head: source for head, source in ties.items() if head not in files and source in files}
    if set(files) | set(aliases) != names:
        return None
    dtype = next(model.parameters()).dtype
    return CheckpointTensors(files, dtype, aliases=aliases, tied=bool(ties), keys=keys)


def _renamed_keys(model: nn.Module, files: dict[str, Path]) -> dict[str, str]:
    """Model name -> checkpoint name under transformers' own loading renames, or {} when its conversions do
    more than rename (merged or split tensors) or cannot be read."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
        if not all(isinstance(t, WeightRenaming) for t in transforms):
            return {}
        meta = model.state_dict()
        return {rename_source_key(key, transforms, [], model.base_model_prefix, meta)[0]: key for key in files}
    except Exception:  # noqa: BLE001 - private transformers API: without it, the names simply do not match
        return {}


def tied_names(model: nn.Module) -> dict[str, str]:
    """Tied tensor name -> the name it shares storage with, from transformers' own record.

    Not from comparing Parameter objects: accelerate's offload hooks swap a module's parameters during each
    forward pass, which unties them in memory while the model still ties them.
    """
    return dict(getattr(model, "all_tied_weights_keys", None) or {})


class PlacedTensors(Mapping):
    """A parent's tensors where accelerate placed them: those it holds in memory as they are (shared, not copied),
    the offloaded ones (on the meta device in the model) read from the checkpoint's files. A block-by-block pass
    over a parent loaded under --max-memory then holds the budget's part once, not twice.

    Attributes:
        files: the checkpoint's tensors (CheckpointTensors), which count what is read.
    """

    def __init__(self, memory: Mapping[str, Tensor], files: CheckpointTensors) -> None:
        self.memory, self.files = memory, files

    def __getitem__(self, name: str) -> Tensor:
        tensor = self.memory[name]
        return self.files[name] if tensor.is_meta else tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.memory)

    def __len__(self) -> int:
        return len(self.memory)

    @property
    def aliases(self) -> dict[str, str]:
        """Tied names (a tied head is its embedding: tied once loaded, never read twice)."""
        return self.files.aliases

    @property
    def reads(self) -> int:
        return self.files.reads

    @property
    def bytes_read(self) -> int:
        return self.files.bytes_read
