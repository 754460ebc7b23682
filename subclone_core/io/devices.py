"""Where computation runs: one rule for the command line, the app, training and pretraining."""

from __future__ import annotations

import ctypes
import functools
import re
from pathlib import Path

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


BFLOAT16_FLAGS = {"avx512_bf16", "amx_bf16"}  # x86 instructions that multiply bfloat16 in hardware
CPUINFO = Path("/proc/cpuinfo")  # Linux's; elsewhere absent


@functools.cache
def cpu_multiplies_bfloat16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX-BF16, read from /proc/cpuinfo; False
    where that file is absent). Where it has, a bfloat16 matrix product runs about 2.5x faster than float32 (346
    against 129 GFLOP/s on 2 Zen 4 cores); where not, bfloat16 is emulated and ran 6x slower than float32 on
    AVX2 machines."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return False
    flags = next((line.partition(":")[2].split() for line in text.splitlines() if line.startswith("flags")), [])
    return bool(BFLOAT16_FLAGS & set(flags))


M_MMAP_THRESHOLD, MMAP_THRESHOLD = -3, 1 << 20  # glibc's mallopt parameter, and the size we fix it at


def return_freed_memory() -> bool:
    """Serve every CPU allocation of 1 MiB or more from its own mapping, given back to the system when freed
    (glibc's malloc; elsewhere nothing changes). Returns whether it took effect.

    Work that allocates and frees block-sized buffers over and over (FSDP2's weights and gradients at every
    forward and backward; a block-by-block pass's weights, hidden states and moments) fragments the heap once
    glibc has raised its mmap threshold to the largest block freed so far (up to 32 MiB): the freed space stays
    in the process. A sharded 0.5B child's processes held about 4 bytes per parameter more than was live
    (bench_fsdp.py); an offloaded 1B parent's refit pass grew by 40 MB a block, to 1.69 GiB instead of 1.18
    (bench_scale.py). A fixed threshold keeps the process at what it uses, for some more CPU time in page faults.
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator is left as it is
        return False
