"""Where computation runs: one rule for the command line, the app, training and pretraining."""

from __future__ import annotations

import ctypes
import functools
import os
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


# glibc's mallopt parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -3, -4, -8
MMAP_THRESHOLD = 1 << 20  # the size return_freed_memory fixes the mmap threshold at
MMAP_MAX, TRIM_THRESHOLD = 65536, 128 * 1024  # glibc's defaults, which return_freed_memory puts back
# keep_freed_memory's settings as environment variables, which glibc reads when a process starts: `make run` starts
# the app with them (its steps run in threads whose malloc arenas exist before any of its Python code runs)
KEEP_FREED = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, loaded once; None where there is none (macOS, musl), whose allocator is left as it is."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _mallopt(*settings: tuple[int, int]) -> bool:
    """Each (parameter, value) set by glibc's mallopt; False where there is no glibc."""
    libc = _glibc()
    return libc is not None and all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)


def keep_freed_memory() -> bool:
    """Keep freed CPU memory in the process for the next allocation (glibc's malloc: one arena, no allocation in
    its own mapping, at most 1 GiB free at the top of the heap before it goes back to the system): what KEEP_FREED
    sets for a process started with it, for one already running (threads started before this call keep their own
    arenas). Returns whether it took effect; a process whose environment sets a MALLOC_ variable of its own is left
    as it is.

    Handing each big buffer back to the system when it is freed makes the next one fault in and zero fresh pages:
    the app's explorer on Gemma 3 270M spent 13 of its 51 CPU seconds in the kernel (6.7M page faults). Kept, it
    took 28 s instead of 40 (in a thread, as the app runs it) and a tiny model's training step a quarter less
    time, for a higher peak: +20% for the explorer, +44% for the training (1.6 -> 2.3 GiB), since the heap keeps
    its largest working set. So `make run` starts the app with KEEP_FREED (lessons on small parents, where time
    matters more), while the command line keeps glibc's defaults unless started with KEEP_FREED itself (README,
    "Settings for a shared server"); a pass that reads an offloaded parent's files, whose memory is bounded, gives
    it back (return_freed_memory) either way."""
    if any(name.startswith("MALLOC_") for name in os.environ) and not keeps_freed_memory():
        return False
    kept = _mallopt((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, int(KEEP_FREED["MALLOC_TRIM_THRESHOLD_"])))
    if kept:
        os.environ.update(KEEP_FREED)  # the process's policy, read by keeps_freed_memory and inherited by children
    return kept


def keeps_freed_memory() -> bool:
    """Whether this process keeps freed memory (keep_freed_memory, or started with its environment)."""
    return all(os.environ.get(name) == value for name, value in KEEP_FREED.items())


def return_freed_memory() -> bool:
    """Serve every CPU allocation of 1 MiB or more from its own mapping, given back to the system when freed, and
    give back what a process that kept freed memory holds (glibc's malloc; elsewhere nothing changes). Returns
    whether it took effect.

    Work that allocates and frees block-sized buffers over and over (FSDP2's weights and gradients at every
    forward and backward; a block-by-block pass's weights, hidden states and moments) fragments the heap once
    glibc has raised its mmap threshold to the largest block freed so far (up to 32 MiB): the freed space stays
    in the process. A sharded 0.5B child's processes held about 4 bytes per parameter more than was live
    (bench_fsdp.py); an offloaded 1B parent's refit pass grew by 40 MB a block, to 1.69 GiB instead of 1.18
    (bench_scale.py). A fixed threshold keeps the process at what it uses, for some more CPU time in page faults.
    """
    kept = keeps_freed_memory()
    returned = _mallopt((M_MMAP_MAX, MMAP_MAX), (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if returned and kept:
        for name in KEEP_FREED:
            os.environ.pop(name, None)
        _glibc().malloc_trim(0)  # what the kept heap holds goes back now, not at its next free
    return returned
