"""Where computation runs: one rule for the command line, the app, training and pretraining."""

from __future__ import annotations

import re

import torch

from subclone_core.core.errors import SubcloneError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(name: str = "auto") -> torch.device:
    """The device a name stands for: "auto" is the first GPU when one is visible, else the CPU.

    Raises:
        SubcloneError: a name that is not a device, or a GPU that is not there.
    """
    if not isinstance(name, str) or not _DEVICE.match(name):
        raise SubcloneError(f"device {name!r} is not one of {DEVICE_CHOICES}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise SubcloneError(f"device {name!r} was requested but no CUDA GPU is visible; use auto or cpu")
        if device.index is not None and device.index >= count:
            raise SubcloneError(f"device {name!r}: only {count} GPU(s) are visible (cuda:0 to cuda:{count - 1})")
    return device


def available_bytes(device: torch.device | str | None = None) -> int:
    """Free memory on a device: the GPU's, or the machine's available RAM."""
    if torch.device(device or "cpu").type == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    import psutil  # an accelerate dependency

    return int(psutil.virtual_memory().available)
