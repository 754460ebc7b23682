"""Evaluate a model on batches: loss and perplexity (causal LMs), loss and accuracy (image classifiers)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from itertools import islice

import torch
import torch.nn.functional as F

from subclone_core.errors import SubcloneError

IGNORE_INDEX = -100  # label value that Hugging Face losses skip


def evaluate(model: torch.nn.Module, batches: Iterable[dict], *, max_batches: int | None = None) -> dict:
    """Mean loss over a set of batches, without changing the model.

    Text batches ({"input_ids", "labels", ...}) are scored as Hugging Face does: the logits at position t
    predict the label at t + 1, and labels equal to -100 are skipped. The loss is the mean over all
    scored tokens (not the mean of batch means). Image batches ({"pixel_values", "labels"}) are scored
    per image.

    Args:
        model: a causal LM or image classifier; run on its own device, in eval mode, with no gradients.
        batches: dicts of tensors as yielded by TokenData.batches or ImageData.batches.
        max_batches: stop after this many batches.

    Returns:
        {"loss", "perplexity", "tokens"} for text, {"loss", "accuracy", "images"} for images.
    """
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    sums = {"loss": 0.0, "count": 0, "correct": 0}
    image = None
    try:
        with torch.no_grad():
            for batch in islice(batches, max_batches):
                batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
                image = "pixel_values" in batch
                _accumulate(sums, *(_image_sums(model, batch) if image else _text_sums(model, batch)))
    finally:
        model.train(was_training)
    if image is None or sums["count"] == 0:
        raise SubcloneError("nothing to evaluate: the data gave no batches (or no labelled tokens)")
    loss = sums["loss"] / sums["count"]
    if image:
        return {"loss": loss, "accuracy": sums["correct"] / sums["count"], "images": sums["count"]}
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf, "tokens": sums["count"]}


def _accumulate(sums: dict, loss_sum: float, count: int, correct: int) -> None:
    sums["loss"] += loss_sum
    sums["count"] += count
    sums["correct"] += correct


def _text_sums(model: torch.nn.Module, batch: dict) -> tuple[float, int, int]:
    """Summed next-token cross-entropy and the number of scored tokens of one batch."""
    labels = batch.get("labels", batch["input_ids"])
    extra = (
        {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    )  # no KV cache
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), **extra
    ).logits  # (B, T, V)
    logits = logits[:, :-1].float()  # (B, T-1, V): position t predicts token t + 1
    targets = labels[:, 1:]  # (B, T-1)
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return float(loss), int((targets != IGNORE_INDEX).sum()), 0


def _image_sums(model: torch.nn.Module, batch: dict) -> tuple[float, int, int]:
    """Summed cross-entropy, images, and correct top-1 predictions of one batch."""
    logits = model(pixel_values=batch["pixel_values"]).logits.float()  # (B, num_labels)
    labels = batch["labels"]
    loss = F.cross_entropy(logits, labels, reduction="sum")
    return float(loss), int(labels.numel()), int((logits.argmax(-1) == labels).sum())
