"""The steps users run, end to end: measure importance on a parent, make a child, save it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from subclone_core.core.calibration import Importance, Progress, calibrate, input_device
from subclone_core.core.errors import SubcloneError
from subclone_core.core.shape import Shape
from subclone_core.core.strategies import Child, needs_calibration, subclone_model
from subclone_core.io.model_card import model_card
from subclone_core.io.saving import DEFAULT_SHARD_SIZE, save_model_folder
from subclone_core.io.sequential import calibrate_sequential
from subclone_core.io.streaming import checkpoint_tensors
from subclone_core.sources import cache_dir, default_data_id, make_data
from subclone_core.sources.parents import Parent

CALIB_SEQ_LEN = 128
CALIB_BATCH = 8
CALIB_TOKENS = 4096  # default calibration budget (token positions)
# Gram matrices are recorded by default up to this size: a 1B parent's fit, a 7B parent's (~20 GB) do not
GRAM_BUDGET = 2 * 2**30


def measure_importance(parent: Parent, data_id: str | None = None, *, tokens: int = CALIB_TOKENS,
                       batch_size: int = CALIB_BATCH, progress: Progress | None = None,
                       grams: bool | None = None, sequential: bool | None = None,
                       activation_memory: int | None = None) -> Importance:
    """Calibrate the parent on the training split of a data set (None: the task's default), up to a
    budget of token positions (for a ViT, each patch and cls token of each image counts).

    Args:
        grams: record the Gram matrices a least-squares refit needs; None records them when they fit
            GRAM_BUDGET (gram_bytes), which the embedded parents do (about 0.4 GB each).
        sequential: calibrate one block at a time from the parent's safetensors files, each weight read once
            (io.sequential); None does so only when the parent's memory budget did not hold it
            (part of it offloaded to disk: see needs_sequential), where accelerate's offload would read every
            offloaded weight once per batch.
        activation_memory: bytes of hidden states a sequential pass keeps in memory, the rest on disk under
            the cache (default: half of the RAM available; io.activations).
    """
    data_id = data_id or default_data_id(parent.task)
    if grams is None:
        grams = gram_bytes(Shape.of(parent.model.config)) <= GRAM_BUDGET
    # an image yields at least one patch plus the cls token: never more images than tokens / 2
    data = make_data(parent, data_id, "train", seq_len=CALIB_SEQ_LEN, max_tokens=tokens,
                     max_images=max(1, tokens // 2))
    if sequential is None:
        sequential = needs_sequential(parent)
    if sequential:
        return calibrate_sequential(parent.source, data.batches(batch_size), max_tokens=tokens, progress=progress,
                                    data=data_id, grams=grams, **sequential_kwargs(parent, activation_memory))
    return calibrate(parent.model, data.batches(batch_size), max_tokens=tokens, progress=progress,
                     data=data_id, grams=grams)


def needs_sequential(parent: Parent) -> bool:
    """Whether calibration goes block by block by default: only for a parent loaded with a memory budget
    (--max-memory) that did not hold it, so that accelerate offloaded part of it to disk, and whose safetensors
    files can be read by the model's own tensor names."""
    if parent.placement.max_memory is None or parent.source is None:
        return False
    if "disk" not in set((getattr(parent.model, "hf_device_map", None) or {}).values()):
        return False
    return checkpoint_tensors(parent.model, parent.source, renames=True) is not None


def sequential_kwargs(parent: Parent, activation_memory: int | None = None) -> dict:
    """The arguments a block-by-block pass over the parent's files takes (io.sequential): its config, class,
    device and dtype, and where its hidden states go (in memory up to ``activation_memory``, then under the
    cache, on the disk that already holds parents).

    Raises:
        SubcloneError: the parent has no folder on disk.
    """
    if parent.source is None:
        raise SubcloneError(f"parent {parent.id!r} has no folder on disk to read block by block; "
                            "run it in memory (without --sequential)")
    return {"config": parent.model.config, "model_class": type(parent.model), "device": input_device(parent.model),
            "dtype": parent.dtype, "activation_memory": activation_memory,
            "activation_root": cache_dir() / "activations"}


def gram_bytes(shape: Shape) -> int:
    """About the memory of a calibration's Gram matrices (float32): per block the attention and FFN inputs
    (hidden^2 each), the heads (heads x head_dim)^2 and the FFN neurons ffn^2, plus the head's input."""
    attn = (shape.heads * shape.head_dim) ** 2
    return 4 * (shape.layers * (2 * shape.hidden**2 + attn + shape.ffn**2) + shape.hidden**2)


def make_child(
    parent: Parent,
    target: Shape,
    *,
    strategy: str = "subclone",
    drop: str | list[int] | None = None,
    scale: bool | None = None,
    untie_head: bool = False,
    importance: Importance | None = None,
    data_id: str | None = None,
    calib_tokens: int = CALIB_TOKENS,
    seed: int = 0,
    progress: Progress | None = None,
    residual_score: str | None = None,
    refit: bool | None = None,
    sequential: bool | None = None,
    activation_memory: int | None = None,
) -> Child:
    """Make a child of a loaded parent, calibrating first when the strategy needs importance.

    Args:
        parent: from sources.parents.load_parent; never modified.
        target: the child's shape (see strategies.plan_shape).
        strategy, drop, scale, untie_head, seed, residual_score, refit: as in strategies.subclone_model.
        importance: reuse an earlier calibration instead of measuring again.
        data_id, calib_tokens, progress: the calibration data, budget and progress callback.
        sequential, activation_memory: calibrate block by block from the parent's files (measure_importance).
    """
    if importance is None and needs_calibration(strategy, drop):
        importance = measure_importance(parent, data_id, tokens=calib_tokens, progress=progress,
                                        grams=refit, sequential=sequential, activation_memory=activation_memory)
    child = subclone_model(parent.model, target, strategy=strategy, importance=importance, drop=drop,
                           scale=scale, untie_head=untie_head, seed=seed, parent_tensors=parent_tensors(parent),
                           residual_score=residual_score, refit=refit)
    child.model.to(home_device(parent.model))
    child.manifest.parent = replace(child.manifest.parent, id=parent.id, label=parent.label,
                                    model_type=parent.model.config.model_type, weights_sha256=parent.weights_sha256(),
                                    licence=asdict(parent.licence) if parent.licence else None)
    child.preprocessor = parent.preprocessor
    return child


def parent_tensors(parent: Parent) -> Mapping[str, Tensor] | None:
    """The parent's tensors streamed from its safetensors files (the default's cache folder has them), or None
    for a model whose tensors only memory holds right (no files, or names transformers converted on loading).

    Raises:
        SubcloneError: the parent is partly offloaded (not in memory) and its files cannot be streamed.
    """
    tensors = checkpoint_tensors(parent.model, parent.source)
    if tensors is None and any(p.is_meta for p in parent.model.parameters()):
        raise SubcloneError(f"parent {parent.id!r} is offloaded to disk but its checkpoint's tensor names differ "
                            "from the model's, so a child cannot be read from its files; load it without "
                            "--max-memory")
    return tensors


def home_device(model: nn.Module) -> torch.device:
    """Where a child of this parent goes: the parent's device when all of it is on one, else the CPU."""
    devices = {p.device for p in model.parameters()}
    return devices.pop() if len(devices) == 1 and next(iter(devices)).type != "meta" else torch.device("cpu")


def save_child(child: Child, out_dir: str | Path, *, task: str, overwrite: bool = False,
               max_shard_size: str | int = DEFAULT_SHARD_SIZE) -> Path:
    """Save a child as a plain Hugging Face folder with its tokenizer or image processor, card and manifest;
    weights larger than ``max_shard_size`` are written in shards with an index file."""
    return save_model_folder(child.model, out_dir, preprocessor=child.preprocessor, manifest=child.manifest,
                             model_card=model_card(child.manifest, task), overwrite=overwrite,
                             max_shard_size=max_shard_size)
