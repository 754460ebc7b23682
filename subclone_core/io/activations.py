"""The hidden states a sequential pass keeps between blocks: in memory up to a byte budget, the rest on disk.

A sequential pass (pipeline.passes) holds every calibration batch's hidden states while it works through the
blocks: batches x tokens per batch x hidden x bytes per element per stream (one stream for calibration, one
per block plus the intact one for block ablation). A large calibration budget or a block ablation of a deep
parent may not fit in memory; what the budget does not hold goes to safetensors files in a temporary folder,
which the store removes when it is closed. The folder's name records its owner
(``activations-<pid>-<host>-<random>``), so that one left by a killed pass is removed by the next store.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Self

from safetensors.torch import load_file, save_file
from torch import Tensor

from subclone_core.core.errors import SubcloneError
from subclone_core.io.atomic import fault_point, owned_folder
from subclone_core.io.devices import available_bytes

Key = tuple[int, int]  # (stream, batch)
FOLDER_PREFIX = "activations-"


def default_budget() -> int:
    """Half of the RAM available now: the rest is for the block's weights and the forward's temporaries."""
    return available_bytes("cpu") // 2


class ActivationStore:
    """Tensors by (stream, batch): in memory while their total stays within ``budget`` bytes (None: no limit),
    else each in its own safetensors file in a temporary folder under ``root`` (default: the system's)."""

    def __init__(self, budget: int | None = None, root: str | Path | None = None) -> None:
        self.budget, self.root = budget, root
        self.memory: dict[Key, Tensor] = {}
        self.on_disk: set[Key] = set()
        self.bytes_in_memory = 0
        self.bytes_written = 0  # everything ever written to disk, for reports
        self._folder: Path | None = None

    def __setitem__(self, key: Key, tensor: Tensor) -> None:
        self.discard(key)
        size = tensor.numel() * tensor.element_size()
        if self.budget is None or self.bytes_in_memory + size <= self.budget:
            self.memory[key] = tensor
            self.bytes_in_memory += size
            return
        save_file({"x": tensor.detach().contiguous()}, self._path(key))
        self.on_disk.add(key)
        self.bytes_written += size

    def __getitem__(self, key: Key) -> Tensor:
        if key in self.memory:
            return self.memory[key]
        if key in self.on_disk:
            return load_file(self._path(key))["x"]
        raise KeyError(key)

    def __contains__(self, key: Key) -> bool:
        return key in self.memory or key in self.on_disk

    def discard(self, key: Key) -> None:
        """Forget one tensor, wherever it is."""
        tensor = self.memory.pop(key, None)
        if tensor is not None:
            self.bytes_in_memory -= tensor.numel() * tensor.element_size()
        if key in self.on_disk:
            self.on_disk.remove(key)
            self._path(key).unlink(missing_ok=True)

    def discard_stream(self, stream: int) -> None:
        """Forget every batch of one stream."""
        for key in [k for k in (*self.memory, *self.on_disk) if k[0] == stream]:
            self.discard(key)

    def close(self) -> None:
        """Drop everything and remove the folder."""
        self.memory.clear()
        self.on_disk.clear()
        self.bytes_in_memory = 0
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _path(self, key: Key) -> Path:
        if self._folder is None:
            try:
                self._folder = owned_folder(self.root or tempfile.gettempdir(), FOLDER_PREFIX)
            except OSError as e:
                raise SubcloneError(f"cannot keep hidden states on disk under {self.root or tempfile.gettempdir()}"
                                    f": {e.strerror or e}") from e
            fault_point("activations.after-create")
        return self._folder / f"{key[0]}-{key[1]}.safetensors"
