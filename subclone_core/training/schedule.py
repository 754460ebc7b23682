"""Learning-rate schedule: linear warmup, then cosine decay (the paper trains with a cosine schedule)."""

from __future__ import annotations

import math
from functools import partial

import torch


def lr_factor(step: int, *, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based).

    Warmup rises linearly to 1 over ``warmup`` steps, counting the first step as 1/warmup so that no
    step is wasted at lr 0; the cosine then falls from 1 at step ``warmup`` to ``min_ratio`` at the
    last step ``total - 1``.

    Args:
        step: 0-based optimizer step.
        total: number of optimizer steps.
        warmup: warmup length in steps (0 for none).
        min_ratio: the final multiplier.

    Returns:
        The multiplier, in [min_ratio, 1] after warmup.
    """
    if step < warmup:
        return (step + 1) / warmup
    decay_steps = max(1, total - 1 - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, *, total: int, warmup: int, min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over ``optimizer`` that follows lr_factor; call ``.step()`` once per optimizer step."""
    factor = partial(lr_factor, total=total, warmup=warmup, min_ratio=min_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
