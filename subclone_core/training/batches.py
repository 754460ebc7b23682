"""Batch plumbing for training: sharding across processes, device moves, the endless training stream."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import torch

from subclone_core.core.errors import SubcloneError


def shard(batch: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """This process's contiguous slice of a global batch: rows [rank * B/W, (rank + 1) * B/W)."""
    if world == 1:
        return batch
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.dim() > 0:
            rows = value.shape[0] // world
            value = value[rank * rows : (rank + 1) * rows]
        out[key] = value
    return out


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move every tensor of a batch to ``device``."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def training_batches(data: Any, batch_size: int, seed: int) -> Iterator[dict[str, Any]]:
    """An endless, seeded, shuffled stream of full training batches.

    Full batches only (drop_last where the data object offers it): a short last batch would give
    some process of a data-parallel run no rows at all, and the steps of one run unequal weight.
    """
    extra = {"drop_last": True} if "drop_last" in inspect.signature(data.batches).parameters else {}
    return iter(data.batches(batch_size, shuffle=True, seed=seed, epochs=None, **extra))


def next_batch(iterator: Iterator[dict[str, Any]], batch_size: int) -> dict[str, Any]:
    """The next training batch; the stream repeats forever, so running out means too little data."""
    try:
        return next(iterator)
    except StopIteration:
        raise SubcloneError(
            f"the training data gave no batches: it needs at least batch_size ({batch_size}) sequences or images"
        ) from None
