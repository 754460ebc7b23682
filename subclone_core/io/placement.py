"""Where a parent's weights live and in which dtype: one rule for the command line, the app and the library.

Placement is accelerate's big-model machinery, not a home-made one: a device map spreads the modules over
GPUs and the CPU (`device_map="auto"`), a memory budget (`max_memory`) caps each device, and what does not
fit is offloaded to disk, read back from the checkpoint's own safetensors files during each forward pass.
"""

from __future__ import annotations

import re
import shutil
import weakref
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import convert_file_size_to_int
from torch import nn

from subclone_core.core.errors import SubcloneError
from subclone_core.io.atomic import fault_point, owned_folder
from subclone_core.io.devices import DEVICE_CHOICES, resolve_device

DTYPES: dict[str, torch.dtype | None] = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
                                         "float16": torch.float16}
MEMORY_EXAMPLE = "a size like 12GiB or 500MB, or per device like cuda:0=20GiB,cpu=30GiB"
OFFLOAD_PREFIX = "parent-"
_MEMORY_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|\d+)$")


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """The torch dtype a name stands for; None for "auto" (the checkpoint's own).

    Raises:
        SubcloneError: a name that is not one of DTYPES.
    """
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise SubcloneError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_size(text: str, what: str = "--max-memory") -> int:
    """Bytes in a size like "12GiB", "500MB" or "1048576".

    Raises:
        SubcloneError: not a positive size.
    """
    try:
        size = convert_file_size_to_int(int(text) if text.strip().isdigit() else text.strip())
    except (ValueError, AttributeError):
        size = -1
    if size <= 0:
        raise SubcloneError(f"{what} {text!r} is not a size; use {MEMORY_EXAMPLE}")
    return size


def parse_max_memory(text: str | None, device: str) -> dict[int | str, int] | None:
    """accelerate's max_memory dict from a budget: one size caps every device the parent may use (the
    chosen GPU or every visible GPU for "auto", and the CPU); "cuda:0=20GiB,cpu=30GiB" names each.

    Raises:
        SubcloneError: a malformed size or device name.
    """
    if text is None:
        return None
    if "=" not in text:
        size = parse_size(text)
        return {**dict.fromkeys(_gpus_for(device), size), "cpu": size}
    budget: dict[int | str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        if not _MEMORY_DEVICE.match(name):
            raise SubcloneError(f"--max-memory device {name!r} is not cpu, cuda, cuda:N or N; use {MEMORY_EXAMPLE}")
        budget[_memory_key(name)] = parse_size(value)
    return budget


def _memory_key(name: str) -> int | str:
    """accelerate's key for a device name: "cpu", or the GPU's index (refused when that GPU is not there)."""
    if name == "cpu":
        return "cpu"
    index = int(name) if name.isdigit() else int(name.partition(":")[2] or 0)
    resolve_device(f"cuda:{index}")
    return index


def _gpus_for(device: str) -> list[int]:
    """The GPU indices a device name may use."""
    if device == "auto":
        return list(range(torch.cuda.device_count()))
    resolved = resolve_device(device)
    return [resolved.index or 0] if resolved.type == "cuda" else []


@dataclass(frozen=True)
class Placement:
    """How to load a parent: device name, dtype name and an optional memory budget (all as the user wrote them).

    Attributes:
        device: "auto" (every visible GPU through device_map="auto", else the CPU), "cpu", "cuda" or "cuda:N".
        dtype: "auto" (the checkpoint's own), "float32", "bfloat16" or "float16".
        max_memory: None (everything in memory on the device) or a budget (see parse_max_memory).
    """

    device: str = "cpu"
    dtype: str | torch.dtype = "auto"
    max_memory: str | None = None

    def validate(self) -> Placement:
        """Check every field now, before any loading; returns self.

        Raises:
            SubcloneError: naming the bad value and the valid ones.
        """
        if not isinstance(self.device, str):
            raise SubcloneError(f"device {self.device!r} is not one of {DEVICE_CHOICES}")
        resolve_device(self.device)
        parse_dtype(self.dtype)
        parse_max_memory(self.max_memory, self.device)
        return self

    @property
    def torch_dtype(self) -> torch.dtype | str:
        """The dtype for from_pretrained: a torch dtype, or "auto"."""
        return parse_dtype(self.dtype) or "auto"

    def load_kwargs(self, offload_root: Path) -> dict:
        """from_pretrained's placement arguments: device_map, max_memory and, when accelerate places the
        modules, a new offload folder under ``offload_root`` (the caller removes it: see remove_with)."""
        budget = parse_max_memory(self.max_memory, self.device)
        gpus = _gpus_for(self.device)
        if budget is None and not gpus:
            return {}  # plain CPU load: no hooks, exactly as before placement existed
        if budget is None and self.device != "auto":
            return {"device_map": {"": gpus[0]}}
        return {"device_map": "auto", "max_memory": budget, "offload_folder": str(offload_folder(offload_root))}


def offload_folder(root: Path) -> Path:
    """A fresh folder under ``root`` for weights accelerate must rewrite to disk (safetensors checkpoints are
    read in place and need none). Its name records its owner (``parent-<pid>-<host>-<random>``): the
    folders that killed processes left under ``root`` are removed here."""
    folder = owned_folder(root, OFFLOAD_PREFIX)
    fault_point("offload.after-create")
    return folder


def remove_with(owner: object, folder: str | Path) -> None:
    """Remove ``folder`` once ``owner`` is garbage-collected, or at the latest when the process exits."""
    weakref.finalize(owner, shutil.rmtree, str(folder), ignore_errors=True)


def memory_by_device(model: nn.Module) -> dict[str, int]:
    """Bytes of parameters and buffers per place ("cpu", "cuda:0", "disk"), from accelerate's device map.

    A model loaded without a device map counts everything on its tensors' own devices.
    """
    placement = getattr(model, "hf_device_map", None) or {}
    out: dict[str, int] = defaultdict(int)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        out[_place_of(name, placement, tensor)] += tensor.numel() * tensor.element_size()
    return dict(out)


def _place_of(name: str, placement: dict, tensor: torch.Tensor) -> str:
    """The place of one tensor: the longest module prefix in the device map, else its own device."""
    best = max((k for k in placement if k == "" or name == k or name.startswith(k + ".")), key=len, default=None)
    if best is None:
        return str(tensor.device)
    where = placement[best]
    return f"cuda:{where}" if isinstance(where, int) else str(where)
