"""Evaluate a model on batches: loss and perplexity (causal LMs), loss and accuracy (image classifiers)."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

import torch

from subclone_core.core.calibration import input_device, no_cache_kwargs
from subclone_core.tasks import task_of_model


def evaluate(model: torch.nn.Module, batches: Iterable[dict], *, max_batches: int | None = None) -> dict:
    """Mean loss over a set of batches, without changing the model.

    The model's task (subclone_core.tasks) scores each batch: text as Hugging Face does (the logits at
    position t predict the label at t + 1, labels equal to -100 skipped), images per image. The loss is
    the mean over all scored tokens or images (not the mean of batch means).

    Args:
        model: a causal LM or image classifier; run on its own device, in eval mode, with no gradients.
        batches: dicts of tensors as yielded by TokenData.batches or ImageData.batches.
        max_batches: stop after this many batches.

    Returns:
        {"loss", "perplexity", "tokens"} for text, {"loss", "accuracy", "images"} for images.
    """
    task, extra = task_of_model(model), no_cache_kwargs(model)
    was_training = model.training
    device = input_device(model)  # a parent placed by accelerate may have its first weights on disk
    model.eval()
    on_device = ({k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
                 for batch in islice(batches, max_batches))
    try:
        with torch.no_grad():
            return task.score(model, on_device, **extra)
    finally:
        model.train(was_training)
