"""Learning-rate schedule: linear warmup, then cosine decay (the paper trains with a cosine schedule), from
transformers' ``get_cosine_with_min_lr_schedule_with_warmup``."""

from __future__ import annotations

import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup


def make_scheduler(
    optimizer: torch.optim.Optimizer, *, total: int, warmup: int, min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over ``optimizer``; call ``.step()`` once per optimizer step.

    Warmup rises linearly to the peak over ``warmup`` steps, the first step at peak / warmup (not at 0: no
    step is wasted); the cosine then falls to ``min_ratio`` x peak at the last step, ``total - 1``.
    transformers' warmup starts at lr 0, so with a warmup the schedule starts one step in, as a resumed one.

    Args:
        optimizer: its param groups' ``lr`` is the peak.
        total: number of optimizer steps.
        warmup: warmup length in steps (0 for none).
        min_ratio: the final multiplier.
    """
    start = 1 if warmup else 0
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])  # the peak a resumed schedule scales
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, warmup, total - 1 + start, last_epoch=start - 1, min_lr_rate=min_ratio
    )
